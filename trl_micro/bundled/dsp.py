r"""
DSP, Domain-Specific Preference (Cheng et al., "Everyone Deserves A Reward: Learning Customized Human Preferences",
arXiv 2309.03126; CC BY-NC 4.0), read from the data directory (`catalog.resolve_data_dir`): 661 Alpaca queries, each
answered in four domain styles (academy, business, entertainment, literature) and with the original short answer
("normal").

Under the context of domain d, the d-styled answer is preferred to each of the four others, so a query gives 4 pairs
per context and 16 in all, from 5 distinct responses. Any two domains reverse exactly between their contexts (the same
prompt and pair, opposite labels); the pairs whose rejected answer is "normal" are agreed: no context prefers it.

Rows are conversational (the query as the user turn, each answer as the assistant turn), with columns `prompt`,
`chosen`, `rejected`, `context_id` (the domain), `context` (a description of what that domain's reader wants, one of
several wordings), `query_id`, `chosen_style`, `rejected_style` and `agreed` (rejected is "normal"). Every domain has
`len(SEEN_WORDINGS[d])` wordings for training and adaptation and `len(HELD_OUT_WORDINGS[d])` that only the
`test_unseen_wordings` split uses, to measure routing of contexts worded in ways adaptation never saw.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Sequence

from datasets import Dataset, DatasetDict

from .data_dir import resolve_data_dir

logger = logging.getLogger(__name__)

DSP_FILE = "dsp/domain_specific_preference.test.json.gz"
DOMAINS = ("academy", "business", "entertainment", "literature")
NORMAL = "normal"
STYLES = (*DOMAINS, NORMAL)

SEEN_WORDINGS = {
    "academy": (
        "I am an academic researcher; I want answers written in a scholarly, rigorous style.",
        "Answer as in a university lecture: precise terminology, structured reasoning and references to research.",
        "I read scientific papers all day and appreciate formal, evidence-based explanations.",
    ),
    "business": (
        "I work in business; give me answers with a professional, practical, results-oriented tone.",
        "Respond like a consultant briefing an executive: clear, pragmatic and focused on value.",
        "I run a company and care about efficiency, strategy and the bottom line.",
    ),
    "entertainment": (
        "I like fun, lively answers with humor and a casual, enthusiastic tone.",
        "Answer like an entertaining talk-show host: energetic, playful and engaging.",
        "Make it entertaining! I enjoy jokes, excitement and a chatty style.",
    ),
    "literature": (
        "I love literature; I prefer answers in poetic, vivid, expressive language.",
        "Respond as a novelist would, with imagery, metaphors and a beautiful narrative voice.",
        "I am a poet at heart, so write elegantly and creatively.",
    ),
}
HELD_OUT_WORDINGS = {
    "academy": (
        "Write the way a professor explains a subject to graduate students.",
        "Keep the tone academic, with careful definitions and an analytical structure.",
    ),
    "business": (
        "Talk to me the way a colleague would in a corporate meeting.",
        "Frame the answer for managers: professional and to the point about costs and benefits.",
    ),
    "entertainment": (
        "Keep me amused: a light-hearted, upbeat answer is what I want.",
        "Write the way a popular entertainer would chat with fans.",
    ),
    "literature": (
        "Give me a lyrical answer, as if it were a passage from a classic book.",
        "I enjoy prose that reads like storytelling, rich in figurative language.",
    ),
}
DEFAULT_QUERY_FRACTIONS = (0.6, 0.2, 0.2)


def load_dsp_queries(data_dir: str | os.PathLike | None = None) -> list[dict]:
    """The file's items, `{"query": str, "responses": {style: str}}`, checked; errors name the item and the field."""
    path = resolve_data_dir(data_dir) / DSP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"DSP data file {str(path)!r} does not exist (expected under the data directory).")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            items = json.load(handle)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"DSP data file {str(path)!r} is not a gzipped JSON list: {error}.") from error
    if not isinstance(items, list) or not items:
        raise ValueError(f"DSP data file {str(path)!r} must hold a non-empty JSON list of queries.")
    for index, item in enumerate(items):
        where = f"{path}: item {index}"
        if not isinstance(item, dict) or not isinstance(item.get("query"), str) or not item["query"].strip():
            raise ValueError(f"{where} has no non-empty text `query`.")
        responses = item.get("responses")
        if not isinstance(responses, dict):
            raise ValueError(f"{where} has no `responses` mapping (style -> answer).")
        for style in STYLES:
            if not isinstance(responses.get(style), str):
                raise ValueError(f"{where}: `responses.{style}` is missing or not text.")
    return items


def dsp_pairs(
    items: Sequence[dict],
    query_ids: Sequence[int],
    wordings: dict[str, Sequence[str]] | None = None,
    domains: Sequence[str] = DOMAINS,
    seed: int = 0,
) -> Dataset:
    """
    The preference pairs of the queries `query_ids` (indices into `items`) under the contexts `domains`, each pair's
    context worded by a seeded draw from `wordings[domain]` (default `SEEN_WORDINGS`). Pairs with an empty answer, or
    whose two answers are the same text, carry no preference: they are skipped and counted in the log.
    """
    wordings = SEEN_WORDINGS if wordings is None else wordings
    rng = random.Random(seed)
    rows, skipped = [], Counter()
    for query_id in query_ids:
        item = items[query_id]
        prompt = [{"role": "user", "content": item["query"]}]
        for domain in domains:
            context = rng.choice(list(wordings[domain]))
            chosen = item["responses"][domain]
            for other in STYLES:
                rejected = item["responses"][other]
                if other == domain:
                    continue
                if not chosen.strip() or not rejected.strip():
                    skipped["empty answer"] += 1
                    continue
                if chosen.strip() == rejected.strip():
                    skipped["identical answers"] += 1
                    continue
                rows.append(
                    {
                        "prompt": prompt,
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}],
                        "context_id": domain,
                        "context": context,
                        "query_id": int(query_id),
                        "chosen_style": domain,
                        "rejected_style": other,
                        "agreed": other == NORMAL,
                    }
                )
    if skipped:
        logger.info("DSP: skipped %d pairs (%s).", sum(skipped.values()), dict(skipped))
    return Dataset.from_list(rows)


def split_queries(num_queries: int, fractions: Sequence[float] = DEFAULT_QUERY_FRACTIONS, seed: int = 0):
    """Seeded (train, adaptation, test) lists of query indices: DSP is split by query, never by pair."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three numbers >= 0 summing to 1, got {list(fractions)}.")
    order = list(range(num_queries))
    random.Random(seed).shuffle(order)
    num_adaptation, num_test = round(num_queries * fractions[1]), round(num_queries * fractions[2])
    num_train = num_queries - num_adaptation - num_test
    parts = order[:num_train], order[num_train : num_train + num_adaptation], order[num_train + num_adaptation :]
    return tuple(sorted(part) for part in parts)


def load_dsp(
    data_dir: str | os.PathLike | None = None,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_QUERY_FRACTIONS,
) -> DatasetDict:
    """
    `trl-micro/dsp`: splits `train`, `adaptation` and `test` by query (seeded), contexts worded with
    `SEEN_WORDINGS`, and `test_unseen_wordings`, the test queries with contexts worded with `HELD_OUT_WORDINGS`.
    """
    items = load_dsp_queries(data_dir)
    train, adaptation, test = split_queries(len(items), fractions, seed)
    return DatasetDict(
        train=dsp_pairs(items, train, seed=seed),
        adaptation=dsp_pairs(items, adaptation, seed=seed + 1),
        test=dsp_pairs(items, test, seed=seed + 2),
        test_unseen_wordings=dsp_pairs(items, test, HELD_OUT_WORDINGS, seed=seed + 3),
    )
