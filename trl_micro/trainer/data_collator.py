"""
What the Stage 1 trainer batches with, beside it as TRL keeps its collators: the `latent_group` column (pairs that
share one latent head in the mixture loss), a sampler that keeps each group in one batch, and the collator on TRL's
preference collator that adds the prompt lengths and the per-pair labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.reward_trainer import DataCollatorForPreference

from ..data_utils import pair_labels
from ..value_checks import normalize_user_id


def latent_groups(keys: Sequence) -> list[int]:
    """
    The `latent_group` column: pairs with equal keys (the tokenized chosen sequence, i.e. the same prompt with its
    context and the same chosen response) get the same group id, numbered in order of first appearance.
    """
    ids: dict = {}
    return [ids.setdefault(tuple(key) if isinstance(key, list) else key, len(ids)) for key in keys]


def user_latent_groups(user_ids: Sequence, fallback_keys: Sequence, column: str = "user_id") -> list[int]:
    """
    The `latent_group` column of `latent_groups="user"`: pairs with the same user id share a group (one user's
    comparisons follow one latent head); a pair without an id (`None` or empty text) falls back to grouping by its
    `fallback_keys` entry (the tokenized chosen sequence, as `latent_groups` does). Numbered in order of first
    appearance. Ids are text or integers (`17` and `"17"` are one user); another type is a `TypeError` naming the row.
    """
    if len(user_ids) != len(fallback_keys):
        raise ValueError(f"{len(user_ids)} user ids for {len(fallback_keys)} pairs.")
    keys = []
    for row, (user, fallback) in enumerate(zip(user_ids, fallback_keys)):
        if user is None or (isinstance(user, str) and not user.strip()):
            keys.append(("pair", tuple(fallback) if isinstance(fallback, list) else fallback))
        else:
            keys.append(("user", normalize_user_id(user, f"{column}[{row}]")))
    return latent_groups(keys)


class GroupedBatchSampler(torch.utils.data.Sampler):
    """
    Batches of whole latent groups: every epoch shuffles the groups (seeded by `seed` and the epoch) and puts
    `groups_per_batch` of them in each batch, chosen so batches hold about `batch_size` pairs on average. A group's
    pairs are never split across batches, so a per-group likelihood sees all of them at once.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True):
        self.members: dict[int, list[int]] = {}
        for row, group in enumerate(groups):
            self.members.setdefault(int(group), []).append(row)
        self.order = list(self.members)
        self.groups_per_batch = max(1, round(batch_size * len(self.order) / max(1, len(groups))))
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.order) // self.groups_per_batch)

    def __iter__(self):
        order = list(self.order)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = [order[i] for i in torch.randperm(len(order), generator=generator).tolist()]
        self.epoch += 1
        for start in range(0, len(order), self.groups_per_batch):
            yield [row for group in order[start : start + self.groups_per_batch] for row in self.members[group]]


@dataclass
class MiCRoPreferenceCollator(DataCollatorForPreference):
    """
    TRL's preference collator (rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected ones, right-padded, with
    `margin` when the data has it) plus `prompt_lengths` for every row and `context_index` when the data has it.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().torch_call(examples)
        prompt_lengths = [example["chosen_prompt_length"] for example in examples] + [
            example["rejected_prompt_length"] for example in examples
        ]
        batch["prompt_lengths"] = torch.tensor(prompt_lengths, dtype=torch.long)
        batch.update(pair_labels(examples))
        return batch
