"""
Prompt sets for training a policy on personalized rewards (GRPO, RLOO, PPO): prompts with a context column.

`synthetic_prompt_dataset` is every distinct prompt of `trl_micro.bundled.synthetic` paired with every
subpopulation's context, with columns `prompt`, `context` and `context_id`, so every context sees the same prompts.
"""

from __future__ import annotations

from datasets import Dataset

from .synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences

SYNTHETIC_NAMES = ("synthetic", "trl-micro/synthetic")


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
