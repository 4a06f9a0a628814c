"""
Stage 2: adapt the router of a Stage 1 MiCRo checkpoint to contexts (users, criteria, personas) from a few
context-labelled pairs. The backbone and heads stay frozen; only the router trains, on cached backbone features.

    python recipes/adapt_router.py \
        --model_name_or_path outputs/micro-rm --dataset_name data/user_pairs.jsonl \
        --output_dir outputs/micro-rm-adapted

    # 32 pairs per context from the adaptation split of a built-in dataset:
    python recipes/adapt_router.py \
        --model_name_or_path outputs/micro-rm --dataset_name trl-micro/hh_relabeled \
        --pairs_per_context 32 --output_dir outputs/micro-rm-adapted

`--model_name_or_path` is a Stage 1 MiCRo checkpoint (from recipes/train_micro_rm.py). `--dataset_name` is a local
file or directory (json, jsonl, parquet, csv, `save_to_disk`) or a trl-micro built-in (see trl_micro.sources). Each
row is a preference pair (`prompt`, `chosen`, `rejected`) with its context text in `--context_column` (default
`context`). The `adaptation` split is used when the dataset has one, else `train`; `--dataset_train_split` picks
another. The adapted model and its tokenizer are saved to `--output_dir`.
"""

from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser

from trl_micro.data_utils import take_per_context
from trl_micro.bundled.catalog import load_named_dataset, resolve_model_path
from trl_micro.trainer import RouterAdaptationConfig, RouterAdaptationTrainer


@dataclass
class AdaptationScriptArguments(ScriptArguments):
    dataset_name: str | None = field(default=None, metadata={"help": "Local path or built-in name (required)."})
    dataset_train_split: str | None = field(
        default=None, metadata={"help": "Split to adapt on; default `adaptation` when present, else `train`."}
    )
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the real data (default ../shared/data)."})
    pairs_per_context: int | None = field(
        default=None, metadata={"help": "Adapt on this many pairs drawn (seeded) from every context; all when unset."}
    )


def main(script_args, training_args, model_args):
    if script_args.dataset_name is None:
        raise ValueError("--dataset_name is required: a local file or directory, or a trl-micro built-in.")
    if model_args.dtype not in (None, "auto"):
        training_args.model_init_kwargs = {"dtype": model_args.dtype, **(training_args.model_init_kwargs or {})}
    dataset = load_named_dataset(script_args.dataset_name, script_args.dataset_config, script_args.data_dir,
                                 seed=training_args.seed)
    split = script_args.dataset_train_split or ("adaptation" if "adaptation" in dataset else "train")
    train_dataset = dataset[split]
    if script_args.pairs_per_context is not None:
        train_dataset = take_per_context(train_dataset, script_args.pairs_per_context,
                                         context_column=training_args.context_column, seed=training_args.seed)
    eval_dataset = dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None

    trainer = RouterAdaptationTrainer(
        model=resolve_model_path(model_args.model_name_or_path),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Adapted MiCRo reward model saved to {training_args.output_dir}")
    if hasattr(trainer, "end"):
        trainer.end()


if __name__ == "__main__":
    parser = TrlParser((AdaptationScriptArguments, RouterAdaptationConfig, ModelConfig))
    main(*parser.parse_args_and_config())
