"""
Stage 1: train a MiCRo reward model (K Bradley-Terry heads + router) on preference pairs.

    accelerate launch recipes/train_micro_rm.py \
        --model_name_or_path embedded --dataset_name trl-micro/synthetic \
        --num_heads 4 --freeze_backbone --output_dir outputs/micro-rm

    # LoRA on the backbone, DeepSpeed ZeRO-3 (GPU config as is; on CPU add --mixed_precision no --num_processes 2
    # to accelerate and --ddp_backend gloo to the script):
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/train_micro_rm.py \
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name data/prefs.jsonl \
        --use_peft --lora_r 16 --output_dir outputs/micro-rm-lora

`--model_name_or_path` is a backbone (wrapped with fresh heads) or a MiCRo checkpoint; `embedded` is the bundled
SmolLM2-135M-Instruct. `--dataset_name` is a local file/directory or a trl-micro built-in (see trl_micro.sources).
"""

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_micro import MiCRoRewardConfig, MiCRoRewardTrainer
from trl_micro.bundled.catalog import load_named_dataset, resolve_model_path
from trl_micro.trainer import build_micro_model


@dataclass
class MiCRoScriptArguments(ScriptArguments):
    dataset_name: str | None = field(default="trl-micro/synthetic", metadata={"help": "Local path or built-in name."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the real data (default ../shared/data)."})
    max_train_pairs: int | None = field(default=None, metadata={"help": "Use at most this many training pairs."})


def main(script_args, training_args, model_args):
    model_init_kwargs = {"dtype": model_args.dtype} if model_args.dtype not in (None, "auto") else {}
    training_args.model_init_kwargs = {**model_init_kwargs, **(training_args.model_init_kwargs or {})}
    dataset = load_named_dataset(script_args.dataset_name, script_args.dataset_config, script_args.data_dir,
                                 seed=training_args.seed)
    train_dataset = dataset[script_args.dataset_train_split]
    if script_args.max_train_pairs is not None:
        train_dataset = train_dataset.select(range(min(script_args.max_train_pairs, len(train_dataset))))
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = dataset[script_args.dataset_test_split]

    trainer = MiCRoRewardTrainer(
        model=build_micro_model(resolve_model_path(model_args.model_name_or_path), training_args),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"MiCRo reward model saved to {training_args.output_dir}")
    if hasattr(trainer, "end"):
        trainer.end()


if __name__ == "__main__":
    parser = TrlParser((MiCRoScriptArguments, MiCRoRewardConfig, ModelConfig))
    main(*parser.parse_args_and_config())
