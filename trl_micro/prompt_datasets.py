"""
Prompt datasets for training a policy on personalized rewards (GRPO, RLOO, PPO): prompts with a context column.

A dataset is a local file or directory (read as `trl_micro.sources` reads them) or the built-in `"synthetic"` (also
`"trl-micro/synthetic"`) one: every distinct prompt of
`trl_micro.synthetic` paired with every subpopulation's context, with columns `prompt`, `context` and `context_id`.
With `show_context_to_policy`, the context also joins the prompt the policy reads (the system message of a
conversation, or text in front of a plain prompt, through the reward model's context template), so the policy can
tell the users apart; the reward model then reads it from the prompt once, not twice (see `trl_micro.rewards`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from datasets import Dataset

from .data import join_context
from .sources import load_local_dataset
from .synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences

SYNTHETIC_NAMES = ("synthetic", "trl-micro/synthetic")


@dataclass
class PromptDatasetArguments:
    """
    Where the prompts come from (the recipes' dataset arguments).

    Args:
        prompt_dataset: `"synthetic"` or a local file / directory.
        prompt_split: split of a local dataset with several.
        context_column: column with each prompt's context.
        show_context_to_policy: join the context to the prompt the policy reads.
        num_subpopulations: synthetic only: how many subpopulations (contexts).
        num_prompts: synthetic only: distinct prompts per context (all 240 when unset).
        conversational: synthetic only: chat messages instead of plain text.
        prompt_seed: synthetic only: seed of the prompt sample.
    """

    prompt_dataset: str = field(default="synthetic", metadata={"help": "'synthetic' or a local file or directory."})
    prompt_split: str = field(default="train", metadata={"help": "Split of a local dataset with several."})
    context_column: str = field(default="context", metadata={"help": "Column with each prompt's context."})
    show_context_to_policy: bool = field(
        default=True, metadata={"help": "Join the context to the prompt the policy reads (as its system message)."}
    )
    num_subpopulations: int = field(default=2, metadata={"help": "Synthetic: number of contexts."})
    num_prompts: int | None = field(default=None, metadata={"help": "Synthetic: distinct prompts per context."})
    conversational: bool = field(default=True, metadata={"help": "Synthetic: chat messages instead of plain text."})
    prompt_seed: int = field(default=0, metadata={"help": "Synthetic: seed of the prompt sample."})


def synthetic_prompt_dataset(
    num_subpopulations: int = 2, num_prompts: int | None = None, conversational: bool = True, seed: int = 0
) -> Dataset:
    """
    The prompts of `generate_synthetic_preferences` (a pool of `num_prompts`, all 240 when unset), each once per
    subpopulation with its `context` and `context_id`, so every context sees the same prompts.
    """
    pool_size = num_prompts or 240
    preferences = generate_synthetic_preferences(
        SyntheticPreferenceConfig(
            num_subpopulations=num_subpopulations,
            num_pairs_per_subpopulation=4 * pool_size,
            num_prompts=num_prompts,
            conversational=conversational,
            seed=seed,
        )
    )
    contexts = sorted({(row["context_id"], row["context"]) for row in preferences})
    distinct_prompts = list({str(prompt): prompt for prompt in preferences["prompt"]}.values())
    rows = [
        {"prompt": prompt, "context": context, "context_id": context_id}
        for prompt in distinct_prompts
        for context_id, context in contexts
    ]
    return Dataset.from_list(rows)


def load_prompt_dataset(args: PromptDatasetArguments, context_template: str = "{context}\n\n") -> Dataset:
    """The prompts `args` describe, checked for `prompt` and the context column, the context shown if asked."""
    if args.prompt_dataset in SYNTHETIC_NAMES:
        dataset = synthetic_prompt_dataset(
            args.num_subpopulations, args.num_prompts, args.conversational, args.prompt_seed
        )
    else:
        splits = load_local_dataset(args.prompt_dataset)
        if args.prompt_split not in splits:
            raise ValueError(f"The prompt dataset {args.prompt_dataset!r} has no split {args.prompt_split!r}: {list(splits)}.")
        dataset = splits[args.prompt_split]
    missing = [column for column in ("prompt", args.context_column) if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The prompt dataset {args.prompt_dataset!r} has no column(s) {missing} (it has {dataset.column_names}). "
            "It needs `prompt` and a context column (`--context_column`)."
        )
    if args.show_context_to_policy:
        dataset = show_context_to_policy(dataset, args.context_column, context_template)
    return dataset


def show_context_to_policy(dataset: Dataset, context_column: str, context_template: str) -> Dataset:
    """Join each row's context to its prompt (rows without a context keep their prompt)."""

    def join(example):
        return {"prompt": join_context(example["prompt"], example[context_column], context_template)}

    return dataset.map(join, desc="Showing the context to the policy")


def hold_out_per_context(dataset: Dataset, num_per_context: int, group_column: str) -> tuple[Dataset, Dataset | None]:
    """(train, held_out): the last `num_per_context` rows of every group are held out; `(dataset, None)` for 0."""
    if num_per_context <= 0:
        return dataset, None
    groups = dataset[group_column]
    held_out, counts = set(), {}
    for index in reversed(range(len(dataset))):
        if counts.get(groups[index], 0) < num_per_context:
            held_out.add(index)
            counts[groups[index]] = counts.get(groups[index], 0) + 1
    train = dataset.select([index for index in range(len(dataset)) if index not in held_out])
    return train, dataset.select(sorted(held_out))
