"""
Probe a policy's personalized reward: sample completions for held-out prompts and average the MiCRo reward per
context. The recipes run it before and after training, so a run shows, per context, whether the policy moved toward
what that context's reward prefers, on prompts it did not train on.
"""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .rewards import MiCRoReward


@torch.no_grad()
def reward_per_context(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    reward: MiCRoReward,
    prompts: Dataset,
    group_column: str = "context_id",
    max_new_tokens: int = 48,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """
    Mean reward of one sampled completion per row of `prompts` (a prompt dataset as the recipes build it: `prompt`
    already showing the context, and `group_column`), per group; the reward's per-user state applies to the rows of
    its `user_column`. Sampling uses the policy's generation config.
    """
    torch.manual_seed(seed)
    was_training = policy.training
    policy.eval()
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    completions = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]["prompt"]
            conversational = isinstance(batch[0], list)
            texts = (
                [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
                if conversational
                else batch
            )
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=not conversational)
            inputs = inputs.to(policy.device)
            output = policy.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=True)
            decoded = tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            completions += [[{"role": "assistant", "content": text}] if conversational else text for text in decoded]
    finally:
        tokenizer.padding_side = padding_side
        policy.train(was_training)
    users = prompts[reward.user_column] if reward.user_column in prompts.column_names else None
    rewards = reward.score(prompts["prompt"], completions, users=users)["rewards"].tolist()
    totals: dict[str, list[float]] = {}
    for group, value in zip(prompts[group_column], rewards):
        totals.setdefault(str(group), []).append(value)
    return {group: sum(values) / len(values) for group, values in sorted(totals.items())}
