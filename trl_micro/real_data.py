r"""
Loaders for the real preference data that sits beside the project (`../shared/data`, never copied into it).

Both loaders return TRL's explicit-prompt *standard* preference format, one row per pair:

    prompt     "Human: ...\n\nAssistant: ...\n\nHuman: ...\n\nAssistant:"   (the shared conversation)
    chosen     " <preferred final assistant turn>"
    rejected   " <other final assistant turn>"
    context_id "helpful" or "harmless"                                       (the rater's criterion)
    context    "Prefer the most helpful response." / "Prefer the most harmless response."

Whitespace convention: the prompt ends with the marker `"\n\nAssistant:"` and each response keeps the separator that
follows the marker in the transcript (a leading space), so `prompt + chosen` is exactly the preferred transcript and
`prompt + rejected` the other one. The only normalization is that HH-RLHF transcripts lose their leading `"\n\n"`, so
every prompt starts with `"Human:"` in both datasets.

Pairs whose two responses are empty or identical (after stripping whitespace) carry no preference; they are skipped,
counted and logged, as are HH-RLHF pairs whose transcripts do not differ only in their final assistant turn.

`split_by_context` and `take_per_context` cut a loaded dataset into seeded train / adaptation / test parts and
few-shot subsets, stratified by the context column.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

DATA_DIR_ENV_VAR = "TRL_MICRO_DATA_DIR"
ASSISTANT_MARKER = "\n\nAssistant:"
HUMAN_MARKER = "\n\nHuman:"

HELPFUL_CONTEXT = "Prefer the most helpful response."
HARMLESS_CONTEXT = "Prefer the most harmless response."
CONTEXT_TEXTS = {"helpful": HELPFUL_CONTEXT, "harmless": HARMLESS_CONTEXT}

HH_RELABELED_FILE = "hh_relabeled/both_test.jsonl.gz"
HH_RLHF_SPLITS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")
HH_RLHF_SPLIT_CONTEXTS = {
    "harmless-base": "harmless",
    "helpful-base": "helpful",
    "helpful-online": "helpful",
    "helpful-rejection-sampled": "helpful",
}

DEFAULT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
SPLIT_NAMES = ("train", "adaptation", "test")


def default_data_dir() -> Path:
    """`<project root>/../shared/data`, where the project's tests and benchmarks expect the data."""
    project_root = Path(__file__).resolve().parent.parent
    return project_root.parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """
    The data directory: `data_dir` if given, else the `TRL_MICRO_DATA_DIR` environment variable, else
    `<project root>/../shared/data`. Raises `FileNotFoundError` naming the path tried and the environment variable.
    """
    if data_dir is not None:
        path, origin = Path(data_dir), "the data_dir argument"
    elif os.environ.get(DATA_DIR_ENV_VAR):
        path, origin = Path(os.environ[DATA_DIR_ENV_VAR]), f"the {DATA_DIR_ENV_VAR} environment variable"
    else:
        path, origin = default_data_dir(), "the default location <project root>/../shared/data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"Preference data directory {str(path)!r} (from {origin}) does not exist. Pass data_dir=... or set the "
            f"{DATA_DIR_ENV_VAR} environment variable to the folder holding hh_relabeled/ and hh_rlhf/."
        )
    return path


def _read_jsonl_gz(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"Preference data file {str(path)!r} does not exist.")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _skip_reason(chosen: str, rejected: str) -> str | None:
    if not chosen.strip() or not rejected.strip():
        return "empty response"
    if chosen.strip() == rejected.strip():
        return "identical responses"
    return None


def _log_skipped(name: str, kept: int, skipped: Counter) -> None:
    if skipped:
        details = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        logger.info("%s: kept %d pairs, skipped %d (%s).", name, kept, sum(skipped.values()), details)
    else:
        logger.info("%s: kept %d pairs, skipped none.", name, kept)


def _sample_rows(rows: list[dict], max_pairs: int | None, seed: int) -> list[dict]:
    """At most `max_pairs` rows drawn uniformly without replacement (seeded), kept in file order."""
    if max_pairs is None or max_pairs >= len(rows):
        return rows
    if max_pairs < 0:
        raise ValueError(f"max_pairs must be >= 0 or None, got {max_pairs}.")
    picked = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_pairs, replace=False))
    return [rows[i] for i in picked]


def load_hh_relabeled(
    data_dir: str | os.PathLike | None = None, max_pairs: int | None = None, seed: int = 0
) -> Dataset:
    r"""
    HH-RLHF test pairs relabelled for one objective each (`hh_relabeled/both_test.jsonl.gz`, 4,043 pairs).

    The file's `prompt` is the conversation without the final `"\n\nAssistant:"`; its `responses` are the two final
    assistant turns without the leading space, and `label` indexes the preferred one. They are turned into
    `prompt = file prompt + "\n\nAssistant:"`, `chosen = " " + responses[label]`,
    `rejected = " " + responses[1 - label]`, so that `prompt + chosen` equals the file's `chosen` transcript exactly.

    Columns: `prompt`, `chosen`, `rejected`, `context_id` (the objective, "helpful" or "harmless"), `context`
    ([`HELPFUL_CONTEXT`] / [`HARMLESS_CONTEXT`]), `data_subset` (the HH-RLHF subset the prompt came from),
    `original_label` (HH-RLHF's own preferred index into `responses`), `matches_original_label` (whether the
    objective's label agrees with HH-RLHF's; about 59% do) and `source_index` (the file's `Index`).

    Args:
        data_dir: folder holding `hh_relabeled/`; see [`resolve_data_dir`].
        max_pairs: keep at most this many pairs, drawn uniformly (seeded) after skipping, in file order.
        seed: seed of that draw.
    """
    path = resolve_data_dir(data_dir) / HH_RELABELED_FILE
    records = _read_jsonl_gz(path)
    rows, skipped = [], Counter()
    for record in records:
        label = int(record["label"])
        responses = record["responses"]
        chosen, rejected = " " + responses[label], " " + responses[1 - label]
        reason = _skip_reason(chosen, rejected)
        if reason is not None:
            skipped[reason] += 1
            continue
        objective = record["objective"]
        rows.append(
            {
                "prompt": record["prompt"] + ASSISTANT_MARKER,
                "chosen": chosen,
                "rejected": rejected,
                "context_id": objective,
                "context": CONTEXT_TEXTS[objective],
                "data_subset": record["data_subset"],
                "original_label": int(record["original_label"]),
                "matches_original_label": int(record["original_label"]) == label,
                "source_index": int(record["Index"]),
            }
        )
    _log_skipped(str(path), len(rows), skipped)
    return Dataset.from_list(_sample_rows(rows, max_pairs, seed))


def split_transcripts(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    r"""
    Split two full transcripts into `(prompt, chosen_response, rejected_response)`.

    The prompt is the longest common prefix of the two transcripts cut back to its last `"\n\nAssistant:"` marker
    (marker included). Returns `None` when there is no such marker, or when a remaining response still holds a
    `"\n\nAssistant:"` or `"\n\nHuman:"` turn (the transcripts then differ before their final assistant turn).
    """
    cut = chosen.rfind(ASSISTANT_MARKER)
    while cut >= 0 and not rejected.startswith(chosen[: cut + len(ASSISTANT_MARKER)]):
        cut = chosen.rfind(ASSISTANT_MARKER, 0, cut)
    if cut < 0:
        return None
    prompt_end = cut + len(ASSISTANT_MARKER)
    chosen_response, rejected_response = chosen[prompt_end:], rejected[prompt_end:]
    for response in (chosen_response, rejected_response):
        if ASSISTANT_MARKER in response or HUMAN_MARKER in response:
            return None
    return chosen[:prompt_end], chosen_response, rejected_response


def load_hh_rlhf(
    data_dir: str | os.PathLike | None = None,
    splits: Sequence[str] = HH_RLHF_SPLITS,
    max_pairs_per_split: int | None = None,
    seed: int = 0,
) -> Dataset:
    r"""
    The four Anthropic HH-RLHF test splits (`hh_rlhf/<split>_test.jsonl.gz`, 8,552 pairs), the split being the
    context: "harmless" for harmless-base, "helpful" for the helpful-* splits.

    Each pair's transcripts are split by [`split_transcripts`] (leading whitespace stripped first, so prompts start
    with `"Human:"`); `prompt + chosen` equals the chosen transcript without its leading `"\n\n"`. Pairs that cannot be
    split there, or whose responses are empty or identical, are skipped, counted and logged.

    Columns: `prompt`, `chosen`, `rejected`, `context_id`, `context`, `split`, `source_index` (line number in the
    split's file).

    Args:
        data_dir: folder holding `hh_rlhf/`; see [`resolve_data_dir`].
        splits: which of [`HH_RLHF_SPLITS`] to load.
        max_pairs_per_split: keep at most this many pairs per split, drawn uniformly (seeded) after skipping.
        seed: seed of those draws.
    """
    unknown = [split for split in splits if split not in HH_RLHF_SPLIT_CONTEXTS]
    if unknown:
        raise ValueError(f"Unknown HH-RLHF split(s) {unknown}; available: {list(HH_RLHF_SPLITS)}.")
    root = resolve_data_dir(data_dir) / "hh_rlhf"
    all_rows = []
    for split_number, split in enumerate(splits):
        path = root / f"{split}_test.jsonl.gz"
        records = _read_jsonl_gz(path)
        context_id = HH_RLHF_SPLIT_CONTEXTS[split]
        rows, skipped = [], Counter()
        for line_number, record in enumerate(records):
            parts = split_transcripts(record["chosen"].lstrip(), record["rejected"].lstrip())
            if parts is None:
                skipped["not split at a final assistant turn"] += 1
                continue
            prompt, chosen, rejected = parts
            reason = _skip_reason(chosen, rejected)
            if reason is not None:
                skipped[reason] += 1
                continue
            rows.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "context_id": context_id,
                    "context": CONTEXT_TEXTS[context_id],
                    "split": split,
                    "source_index": line_number,
                }
            )
        _log_skipped(str(path), len(rows), skipped)
        all_rows.extend(_sample_rows(rows, max_pairs_per_split, seed + split_number))
    return Dataset.from_list(all_rows)


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
