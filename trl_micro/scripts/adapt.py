r"""
`trl-micro adapt`, Stage 2: adapt the router of a Stage 1 MiCRo checkpoint to contexts (users, criteria, personas)
from a few context-labelled pairs. The backbone and heads stay frozen; only the router trains, on cached features.

    trl-micro adapt --model_name_or_path outputs/micro-rm --dataset_name data/user_pairs.jsonl \
        --output_dir outputs/micro-rm-adapted

    # 32 pairs per context from the adaptation split of a built-in dataset:
    trl-micro adapt --model_name_or_path outputs/micro-rm --dataset_name trl-micro/hh_relabeled \
        --pairs_per_context 32 --output_dir outputs/micro-rm-adapted

`--model_name_or_path` is a Stage 1 MiCRo checkpoint (`trl-micro train`), local or a Hub id. `--dataset_name` is a
local file or directory (json, jsonl, parquet, csv, `save_to_disk`), a Hub dataset id, or a trl-micro built-in. Each
row is a preference pair (`prompt`, `chosen`, `rejected`) with its context text in `--context_column` (default
`context`). The `adaptation` split is used when the dataset has one, else `train`; `--dataset_train_split` picks
another. The adapted model (with its code and model card) and its tokenizer are saved to `--output_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from ..bundled.catalog import load_named_dataset
from ..splits import take_per_context
from ..trainer import RouterAdaptationConfig, RouterAdaptationTrainer
from .train import finish, model_init_kwargs, required_model


@dataclass
class AdaptationScriptArguments(ScriptArguments):
    dataset_name: str | None = field(
        default=None, metadata={"help": "Local path, Hub dataset id or trl-micro built-in (required)."}
    )
    dataset_train_split: str | None = field(
        default=None, metadata={"help": "Split to adapt on; default `adaptation` when present, else `train`."}
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "Folder of the built-ins' real data (default: $TRL_MICRO_DATA_DIR)."}
    )
    pairs_per_context: int | None = field(
        default=None, metadata={"help": "Adapt on this many pairs drawn (seeded) from every context; all when unset."}
    )


def main(script_args: AdaptationScriptArguments, training_args: RouterAdaptationConfig, model_args: ModelConfig):
    if script_args.dataset_name is None:
        raise ValueError("--dataset_name is required: a local file or directory, a Hub dataset id or a built-in.")
    model_path = required_model(model_args, "a Stage 1 MiCRo checkpoint")
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    dataset = load_named_dataset(
        script_args.dataset_name, script_args.dataset_config, script_args.data_dir, seed=training_args.seed
    )
    split = script_args.dataset_train_split or ("adaptation" if "adaptation" in dataset else "train")
    train_dataset = dataset[split]
    if script_args.pairs_per_context is not None:
        train_dataset = take_per_context(
            train_dataset,
            script_args.pairs_per_context,
            context_column=training_args.context_column,
            seed=training_args.seed,
        )
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None

    trainer = RouterAdaptationTrainer(
        model=model_path, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    finish(trainer, training_args, script_args.dataset_name, "Adapted MiCRo reward model")


def make_parser(prog: str | None = None) -> TrlParser:
    return TrlParser((AdaptationScriptArguments, RouterAdaptationConfig, ModelConfig), prog=prog)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
