"""
Seeded splits of preference data stratified by context: `train` / `adaptation` / `test` parts per context
(`split_by_context`), `n` pairs from every context (`take_per_context`, nested across `n`), and the last rows of every
group held out (`hold_out_per_context`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from datasets import Dataset, DatasetDict

DEFAULT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_NAMES = ("train", "adaptation", "test")


def _context_values(dataset: Dataset, context_column: str) -> list:
    if context_column not in dataset.column_names:
        raise ValueError(
            f"Context column {context_column!r} is not in the dataset; columns present: {dataset.column_names}."
        )
    return list(dataset[context_column])


def _indices_per_context(contexts: Iterable) -> dict:
    groups: dict = {}
    for index, context in enumerate(contexts):
        groups.setdefault(context, []).append(index)
    return {context: groups[context] for context in sorted(groups, key=str)}


def _per_context_sizes(count: int, fractions: Sequence[float]) -> list[int]:
    """Sizes of the later parts rounded to the nearest pair; the first part takes the rest (each within 1 pair)."""
    later = [int(round(count * fraction)) for fraction in fractions[1:]]
    return [count - sum(later), *later]


def split_by_context(
    dataset: Dataset,
    context_column: str = "context_id",
    fractions: Sequence[float] | None = DEFAULT_SPLIT_FRACTIONS,
    sizes_per_context: Sequence[int] | None = None,
    seed: int = 0,
) -> DatasetDict:
    """
    Seeded split into `train`, `adaptation` and `test`, stratified by `context_column`.

    Give either `fractions` (three non-negative numbers summing to 1, applied within every context; each context's
    adaptation and test parts are its share rounded to the nearest pair and train takes the rest, so every part is
    within one pair of the requested share) or `sizes_per_context` (three pair counts taken from every context; the
    rest of each context is left out). Rows keep their order in `dataset` within each part.

    Raises `ValueError` when the context column is missing, the fractions are invalid, or a context has fewer pairs
    than `sizes_per_context` asks for.
    """
    contexts = _context_values(dataset, context_column)
    if sizes_per_context is not None:
        sizes_per_context = [int(size) for size in sizes_per_context]
        if len(sizes_per_context) != 3 or min(sizes_per_context) < 0:
            raise ValueError(f"sizes_per_context must be three counts >= 0, got {sizes_per_context}.")
    else:
        if fractions is None or len(fractions) != 3 or min(fractions) < 0:
            raise ValueError(f"fractions must be three numbers >= 0 (train, adaptation, test), got {fractions}.")
        if abs(sum(fractions) - 1.0) > 1e-6:
            raise ValueError(f"fractions must sum to 1, got {list(fractions)} (sum {sum(fractions)}).")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    for context, indices in _indices_per_context(contexts).items():
        if sizes_per_context is not None:
            if sum(sizes_per_context) > len(indices):
                raise ValueError(
                    f"Context {context!r} has {len(indices)} pairs but sizes_per_context asks for "
                    f"{sum(sizes_per_context)} ({sizes_per_context})."
                )
            sizes = sizes_per_context
        else:
            sizes = _per_context_sizes(len(indices), fractions)
        shuffled = np.asarray(indices)[rng.permutation(len(indices))]
        start = 0
        for part, size in zip(parts, sizes):
            part.extend(shuffled[start : start + size].tolist())
            start += size
    return DatasetDict({name: dataset.select(sorted(part)) for name, part in zip(SPLIT_NAMES, parts)})


def take_per_context(dataset: Dataset, n: int, context_column: str = "context_id", seed: int = 0) -> Dataset:
    """
    `n` pairs from every context, drawn without replacement (seeded), in the dataset's order.

    For one seed the draws are nested: the pairs taken with a smaller `n` are among those taken with a larger one,
    so adaptation curves (8, 32, 128 pairs) grow one subset. Raises `ValueError` when the context column is missing or
    a context has fewer than `n` pairs.
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}.")
    contexts = _context_values(dataset, context_column)
    rng = np.random.default_rng(seed)
    taken = []
    for context, indices in _indices_per_context(contexts).items():
        if len(indices) < n:
            raise ValueError(
                f"Context {context!r} has only {len(indices)} pairs in column {context_column!r}, "
                f"but {n} pairs per context were asked for."
            )
        taken.extend(np.asarray(indices)[rng.permutation(len(indices))[:n]].tolist())
    return dataset.select(sorted(taken))


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
