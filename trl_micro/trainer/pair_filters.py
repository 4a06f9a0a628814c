"""
Dropping preference pairs a reward model cannot learn from before training: pairs over `max_length` tokens (as TRL
does) and pairs whose two sides are identical. A `Dataset` reports what it lost and refuses to lose everything; a
streaming `IterableDataset` filters as it streams.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from datasets import Dataset

logger = logging.getLogger(__name__)


def drop_overlong(dataset, max_length: int | None, dataset_name: str):
    """Pairs with a sequence over `max_length` tokens are dropped (as in TRL), and the count is reported."""
    if max_length is None:
        return dataset
    return drop_pairs(
        dataset,
        lambda example: len(example["chosen_ids"]) <= max_length and len(example["rejected_ids"]) <= max_length,
        dataset_name,
        f"longer than max_length={max_length} tokens",
        "raise `max_length` or shorten the texts",
    )


def drop_identical_pairs(dataset, dataset_name: str, chosen: str, rejected: str):
    """`drop_pairs` of the pairs whose `chosen` and `rejected` columns are equal: they carry no preference."""
    return drop_pairs(
        dataset,
        lambda example: example[chosen] != example[rejected],
        dataset_name,
        f"identical (`{chosen}` == `{rejected}`)",
        "such a pair carries no preference; fix or drop it",
    )


def drop_pairs(dataset, keep: Callable, dataset_name: str, what: str, fix: str):
    """
    The pairs `keep` accepts. A `Dataset` reports how many pairs were dropped and refuses to lose them all; a
    streaming `IterableDataset` filters as it streams and warns at the first pair it drops.
    """
    if not isinstance(dataset, Dataset):
        warned = False

        def keep_and_warn(example):
            nonlocal warned
            kept = keep(example)
            if not kept and not warned:
                warned = True
                logger.warning(f"Dropping {dataset_name} pairs {what} as they stream: {fix}.")
            return kept

        return dataset.filter(keep_and_warn)
    before = len(dataset)
    dataset = dataset.filter(keep, desc=f"Dropping {dataset_name} pairs {what}")
    if len(dataset) == 0:
        raise ValueError(f"Every pair of the {dataset_name} dataset is {what}: {fix}.")
    if len(dataset) < before:
        logger.warning(f"Dropped {before - len(dataset)} of {before} {dataset_name} pairs {what}: {fix}.")
    return dataset
