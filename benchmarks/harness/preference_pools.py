"""
The benchmark's preference pools: which pairs each benchmark draws its train / adaptation / test splits from.

- `hh_relabeled`: HH-RLHF test pairs relabelled per objective; context = objective (helpful / harmless).
- `hh_rlhf`: the four HH-RLHF test splits; context = harmless (harmless-base) or helpful (the helpful-* splits).
- `dsp`: DSP's four domain contexts (academy, business, entertainment, literature) over queries answered in every
  style; each domain's answer wins under its own context, so any two domains reverse exactly between their contexts.
  Queries, never pairs, are split: `train_queries` of them train, the rest are evaluation queries, whose pairs carry a
  seen wording of their context (`context`) and a held-out one (`unseen_context`). Queries whose longest sequence
  (context included) exceeds `max_length` tokens are left out first.
- `synthetic`: the synthetic generator with its M = 8 designed subpopulations; the M = 2 and M = 4 benchmarks use the
  rows of the first M subpopulations only, so one feature cache serves the three mixtures. With
  `train_rater_follows_topic`, a training pair's rater is the subpopulation that owns the prompt's topic
  (`trl_micro.synthetic.rated_by_topic_owner`: who rates depends on the prompt, as in HH-RLHF), while evaluation pairs
  mix every topic, so at test time only the context says who rates.

Real pairs are filtered to those whose longer sequence, context included, fits in `max_length` tokens of the
backbone's tokenizer, then `pairs_per_context` are drawn per context (seeded). The filter and the draw are recorded in
the report.

Each pool is ordered evaluation pairs first, training pairs last (`train_per_context` of every context, drawn with the
pool's seed): only evaluation pairs are ever scored with their context, so only they need the backbone's second pass
(see `benchmarks.harness.pair_pool`). Every seed of the benchmark re-draws which evaluation pairs adapt and which test.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedTokenizerBase

from trl_micro.bundled.dsp import HELD_OUT_WORDINGS, dsp_pairs, load_dsp_queries
from trl_micro.bundled.hh import load_hh_relabeled, load_hh_rlhf
from trl_micro.bundled.synthetic import SyntheticPreferenceConfig, generate_synthetic_preferences, rated_by_topic_owner
from trl_micro.data_utils import tokenize_pairs
from trl_micro.splits import split_by_context, take_per_context

from .pair_pool import UNSEEN_CONTEXT_COLUMN, longest_sequence_lengths

POOL_SEED = 0


@dataclass(frozen=True)
class PoolSpec:
    """
    How a pool is drawn.

    Args:
        source: "hh_relabeled", "hh_rlhf", "dsp" or "synthetic".
        pairs_per_context: pairs drawn per context (per subpopulation for the synthetic generator).
        train_per_context: of those, the training pairs; the others are evaluation (adaptation and test) pairs.
        max_length: real pairs whose longer sequence (context included) exceeds this many tokens are left out.
        candidate_pairs: real pairs read before filtering (a seeded uniform sample; None reads every pair); for dsp,
            queries read.
        num_subpopulations: M of the synthetic generator.
        train_rater_follows_topic: synthetic training pairs are rated by the subpopulation owning the prompt's topic.
        train_queries: dsp: queries whose pairs train (the other kept queries are evaluation queries).
    """

    source: str
    pairs_per_context: int
    train_per_context: int
    max_length: int = 256
    candidate_pairs: int | None = None
    num_subpopulations: int = 8
    train_rater_follows_topic: bool = False
    train_queries: int = 0

    def describe(self) -> str:
        """One sentence of the report: where the pool's pairs come from and how they split."""
        if self.source == "dsp":
            return (
                f"DSP: queries whose every sequence fits in {self.max_length} tokens (context included), "
                f"{self.train_queries} of them training queries (seed {POOL_SEED}), the rest evaluation queries; 16 "
                "pairs per query (4 per domain context)"
            )
        if self.source == "synthetic":
            raters = (
                "; training pairs rated by the subpopulation owning the prompt's topic" * self.train_rater_follows_topic
            )
            return (
                f"synthetic generator, M={self.num_subpopulations} subpopulations, {self.pairs_per_context} pairs each "
                f"(generator seed {POOL_SEED}){raters}; {self._split()}"
            )
        read = "all pairs" if self.candidate_pairs is None else f"a seeded sample of {self.candidate_pairs} pairs"
        return (
            f"{self.source}: {read}, kept those <= {self.max_length} tokens (context included), then "
            f"{self.pairs_per_context} per context (seed {POOL_SEED}); {self._split()}"
        )

    def _split(self) -> str:
        return (
            f"{self.train_per_context} training pairs per context, the other "
            f"{self.pairs_per_context - self.train_per_context} are evaluation pairs"
        )


def load_pool_dataset(
    spec: PoolSpec, tokenizer: PreTrainedTokenizerBase, context_template: str, data_dir: str | None = None
) -> tuple[Dataset, int]:
    """
    The pool's pairs (prompt, chosen, rejected, context, context_id, ...), evaluation pairs first, and the number of
    evaluation pairs.
    """
    if spec.source == "synthetic" and spec.train_rater_follows_topic:
        return draw_topic_rated_synthetic_pool(spec)
    if spec.source == "dsp":
        return draw_dsp_pool(spec, tokenizer, context_template, data_dir)
    pairs = draw_pool_pairs(spec, tokenizer, context_template, data_dir)
    parts = split_by_context(
        pairs,
        context_column="context_id",
        fractions=None,
        sizes_per_context=(spec.train_per_context, spec.pairs_per_context - spec.train_per_context, 0),
        seed=POOL_SEED,
    )
    return concatenate_datasets([parts["adaptation"], parts["train"]]), len(parts["adaptation"])


def draw_topic_rated_synthetic_pool(spec: PoolSpec) -> tuple[Dataset, int]:
    """
    Evaluation pairs from one generator draw (every topic), training pairs from another (seed + 1), kept only where
    the rater owns the prompt's topic; evaluation pairs first.
    """
    num_evaluation = spec.pairs_per_context - spec.train_per_context
    evaluation = generate_synthetic_preferences(
        SyntheticPreferenceConfig(
            num_subpopulations=spec.num_subpopulations, num_pairs_per_subpopulation=num_evaluation, seed=POOL_SEED
        )
    )
    # A subpopulation owns about 1/M of the topics: draw enough candidates for `train_per_context` of its own.
    candidates = generate_synthetic_preferences(
        SyntheticPreferenceConfig(
            num_subpopulations=spec.num_subpopulations,
            num_pairs_per_subpopulation=2 * spec.num_subpopulations * spec.train_per_context,
            seed=POOL_SEED + 1,
        )
    )
    owned = rated_by_topic_owner(candidates, spec.num_subpopulations)
    train = take_per_context(owned, spec.train_per_context, context_column="context_id", seed=POOL_SEED)
    return concatenate_datasets([evaluation, train]), len(evaluation)


def draw_pool_pairs(
    spec: PoolSpec, tokenizer: PreTrainedTokenizerBase, context_template: str, data_dir: str | None = None
) -> Dataset:
    """The pool's `pairs_per_context` pairs of every context (see the module docstring)."""
    if spec.source == "synthetic":
        return generate_synthetic_preferences(
            SyntheticPreferenceConfig(
                num_subpopulations=spec.num_subpopulations,
                num_pairs_per_subpopulation=spec.pairs_per_context,
                seed=POOL_SEED,
            )
        )
    if spec.source == "hh_relabeled":
        candidates = load_hh_relabeled(data_dir=data_dir, max_pairs=spec.candidate_pairs, seed=POOL_SEED)
    elif spec.source == "hh_rlhf":
        per_split = None if spec.candidate_pairs is None else spec.candidate_pairs // 4
        candidates = load_hh_rlhf(data_dir=data_dir, max_pairs_per_split=per_split, seed=POOL_SEED)
    else:
        raise ValueError(f"Unknown pool source {spec.source!r}; use 'hh_relabeled', 'hh_rlhf' or 'synthetic'.")
    tokenized = tokenize_pairs(candidates, tokenizer, context_template, "context")
    lengths = longest_sequence_lengths(tokenized)
    short = candidates.select([i for i, length in enumerate(lengths) if length <= spec.max_length])
    return take_per_context(short, spec.pairs_per_context, context_column="context_id", seed=POOL_SEED)


def draw_dsp_pool(
    spec: PoolSpec, tokenizer: PreTrainedTokenizerBase, context_template: str, data_dir: str | None = None
) -> tuple[Dataset, int]:
    """DSP pairs of the evaluation queries (with a held-out wording of each context too), then of the training queries."""
    items = load_dsp_queries(data_dir)
    candidates = range(len(items))
    if spec.candidate_pairs is not None:
        candidates = sorted(random.Random(POOL_SEED).sample(list(candidates), spec.candidate_pairs))
    pairs = dsp_pairs(items, candidates, seed=POOL_SEED)
    tokenized = tokenize_pairs(pairs, tokenizer, context_template, "context")
    longest: dict[int, int] = {}
    for query, length in zip(pairs["query_id"], longest_sequence_lengths(tokenized)):
        longest[query] = max(longest.get(query, 0), length)
    kept = [query for query, length in sorted(longest.items()) if length <= spec.max_length]
    if len(kept) <= spec.train_queries:
        raise ValueError(f"Only {len(kept)} DSP queries fit in {spec.max_length} tokens; lower train_queries.")
    random.Random(POOL_SEED).shuffle(kept)
    train, evaluation = sorted(kept[: spec.train_queries]), sorted(kept[spec.train_queries :])
    evaluation_pairs = dsp_pairs(items, evaluation, seed=POOL_SEED)
    unseen = dsp_pairs(items, evaluation, HELD_OUT_WORDINGS, seed=POOL_SEED + 1)
    evaluation_pairs = evaluation_pairs.add_column(UNSEEN_CONTEXT_COLUMN, unseen["context"])
    train_pairs = dsp_pairs(items, train, seed=POOL_SEED)
    train_pairs = train_pairs.add_column(UNSEEN_CONTEXT_COLUMN, train_pairs["context"])  # never scored with it
    return concatenate_datasets([evaluation_pairs, train_pairs]), len(evaluation_pairs)
