r"""
`trl-micro train`, Stage 1: train a MiCRo reward model (K Bradley-Terry heads + router) on preference pairs.

    trl-micro train --model_name_or_path embedded --dataset_name trl-micro/synthetic \
        --num_heads 4 --freeze_backbone --output_dir outputs/micro-rm

    # LoRA on the backbone, DeepSpeed ZeRO-3 (the GPU config as shipped; on CPU add --mixed_precision no
    # --num_processes 2 and, for the script, --ddp_backend gloo --use_cpu):
    trl-micro train --accelerate_config zero3 \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name data/prefs.jsonl \
        --use_peft --lora_r 16 --output_dir outputs/micro-rm-lora

`--model_name_or_path` is a backbone (wrapped with fresh heads) or a MiCRo checkpoint, local or a Hub id; `embedded` is
the bundled SmolLM2-135M-Instruct. `--dataset_name` is a local file or directory, a Hub dataset id (with
`--dataset_config`), or a trl-micro built-in (`trl_micro.bundled.catalog`). The saved checkpoint carries its modeling
code and its model card (one card per head); `--push_to_hub` pushes it as TRL's scripts do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from ..bundled.catalog import load_named_dataset, resolve_model_path
from ..trainer import MiCRoRewardConfig, MiCRoRewardTrainer


@dataclass
class MiCRoScriptArguments(ScriptArguments):
    dataset_name: str | None = field(
        default="trl-micro/synthetic", metadata={"help": "Local path, Hub dataset id or trl-micro built-in."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder of the built-ins' real data (default: $TRL_MICRO_DATA_DIR)."}
    )
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})


def model_init_kwargs(model_args: ModelConfig, training_args) -> dict:
    """
    What TRL's reward script loads the model with, from TRL's ModelConfig (`--dtype`, `--attn_implementation`,
    `--model_revision`; `auto` and unset values left out), joined to (and overridden by) the config's own
    `model_init_kwargs`.
    """
    from_model_args = {
        "dtype": model_args.dtype if model_args.dtype != "auto" else None,
        "attn_implementation": model_args.attn_implementation,
        "revision": model_args.model_revision if model_args.model_revision != "main" else None,
    }
    given = {key: value for key, value in from_model_args.items() if value is not None}
    return {**given, **(training_args.model_init_kwargs or {})}


def finish(trainer, training_args, dataset_name: str | None, what: str) -> None:
    """Save (checkpoint, code, card naming the data), push when asked, close: the end of every trainer script."""
    trainer.save_model(training_args.output_dir)
    trainer.create_model_card(dataset_name=dataset_name)
    trainer.accelerator.print(f"{what} saved to {training_args.output_dir}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
        trainer.accelerator.print(f"Pushed to https://huggingface.co/{trainer.hub_model_id}")
    if hasattr(trainer, "end"):
        trainer.end()


def required_model(model_args: ModelConfig, what: str) -> str:
    if not model_args.model_name_or_path:
        raise ValueError(f"--model_name_or_path is required: {what} (a local path or a Hub id).")
    return resolve_model_path(model_args.model_name_or_path)


def main(script_args: MiCRoScriptArguments, training_args: MiCRoRewardConfig, model_args: ModelConfig) -> None:
    model_path = required_model(model_args, "a backbone, a MiCRo checkpoint, or `embedded`")
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    dataset = load_named_dataset(
        script_args.dataset_name, script_args.dataset_config, script_args.data_dir, seed=training_args.seed
    )
    train_dataset = dataset[script_args.dataset_train_split]
    if script_args.max_train_pairs is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_pairs, len(train_dataset))))
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None

    trainer = MiCRoRewardTrainer(
        model=model_path,  # the trainer loads it with `model_init_kwargs` and `quantization_config`
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish(trainer, training_args, script_args.dataset_name, "MiCRo reward model")


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((MiCRoScriptArguments, MiCRoRewardConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
