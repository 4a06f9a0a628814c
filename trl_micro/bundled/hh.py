r"""
Loaders of HH-RLHF and its helpful / harmless relabelling, read from the data directory (`catalog.resolve_data_dir`).

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
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from datasets import Dataset

from .data_dir import resolve_data_dir

logger = logging.getLogger(__name__)

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
