r"""
A pool of preference pairs with their frozen-backbone features, read two ways.

Every pair (x, c, y_w, y_l) of the pool is tokenized twice, and the backbone runs once over each tokenized form:

    without its context   x + y                 what a context-blind reward model scores
    with its context      c + x + y             what a MiCRo model scores for context c (c joins the prompt through
                                                 `MiCRoConfig.context_template`, as in training and inference)

Only the first `num_with_context` pairs (all by default) get the second form: methods that read the context are only
ever scored or adapted on those, so a pool can put its training pairs last and skip half of their backbone work.

The features (what the heads read of each response and the router of its prompt, `MiCRoConfig`'s readouts) live in one
[`CachedFeatureCollator`]: rows `[0, N)` hold the pairs without their context, rows `[N, N + num_with_context)` the
first pairs with it, so any method trained through the trainers' cached-feature path (`pair_index` datasets) picks
either form of any subset of the pool without running the backbone again. The backbone's work is kept on disk per
distinct sequence (`trl_micro.feature_cache.FeatureStore`, saved segment by segment), so an interrupted build resumes
where it stopped and pools that share sequences share their features.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from trl_micro.data_utils import tokenize_pairs
from trl_micro.feature_cache import FEATURE_NAMES, CachedFeatureCollator, pair_features
from trl_micro.modeling_micro import MiCRoRewardModel
from trl_micro.trainer.data_collator import latent_groups

UNSEEN_CONTEXT_COLUMN = "unseen_context"


def longest_sequence_lengths(tokenized: Dataset) -> list[int]:
    """Per pair, the number of tokens of its longer sequence (chosen or rejected)."""
    return [max(len(c), len(r)) for c, r in zip(tokenized["chosen_ids"], tokenized["rejected_ids"])]


@dataclass
class CachedPairPool:
    """
    Preference pairs and their backbone features with and without their context (see the module docstring).

    Attributes:
        dataset: the pairs, as given (text columns, the context text and the context label).
        features: the feature bank; also the collator of `pair_index` datasets for the trainers.
        context_ids: every pair's context label (e.g. "helpful", "subpop-3").
        num_with_context: pairs `0 .. num_with_context - 1` also have features with their context.
        build_seconds: time spent building the pool (tokenizing, and running the backbone on cache misses).
        has_unseen_wordings: those pairs also have features with their context worded another way (the dataset's
            `unseen_context` column: wordings Stage 2 never adapts on), scored with `with_context="unseen"`.
    """

    dataset: Dataset
    features: CachedFeatureCollator
    context_ids: list[str]
    num_with_context: int
    build_seconds: float = 0.0
    has_unseen_wordings: bool = False

    def __len__(self) -> int:
        return len(self.context_ids)

    def rows(self, pairs: Sequence[int], with_context: bool | str) -> list[int]:
        """Feature-bank rows of the pool pairs `pairs`, scored without or with their context (or its unseen wording)."""
        pairs = [int(pair) for pair in pairs]
        if not with_context:
            return pairs
        if with_context == "unseen" and not self.has_unseen_wordings:
            raise ValueError("This pool has no features with unseen context wordings (no `unseen_context` column).")
        outside = [pair for pair in pairs if not 0 <= pair < self.num_with_context]
        if outside:
            raise ValueError(
                f"Pool pairs {outside[:5]} have no features with their context: only pairs 0 to "
                f"{self.num_with_context - 1} do (see `num_with_context` of build_pair_pool)."
            )
        offset = len(self) + (self.num_with_context if with_context == "unseen" else 0)
        return [offset + pair for pair in pairs]

    def feature_dataset(self, pairs: Sequence[int], with_context: bool | str) -> Dataset:
        """A `pair_index` dataset of `pairs`: the trainers read it through `features` without running the backbone."""
        return Dataset.from_dict({"pair_index": self.rows(pairs, with_context)})

    def tensors(self, pairs: Sequence[int], with_context: bool | str) -> dict[str, torch.Tensor]:
        """The features of `pairs`, `{name: (len(pairs), hidden)}` for the names of `feature_cache.FEATURE_NAMES`."""
        index = torch.tensor(self.rows(pairs, with_context), dtype=torch.long)
        return {name: self.features.features[name][index] for name in FEATURE_NAMES}

    def group_keys(self, pairs: Sequence[int], with_context: bool | str) -> list[str]:
        """Per pair, the key of its latent group (`data_utils.latent_groups`): its prompt (with the context it is scored
        with) and its chosen response."""
        column = {False: None, True: "context", "unseen": UNSEEN_CONTEXT_COLUMN}[with_context]
        rows = self.dataset.select([int(pair) for pair in pairs])
        contexts = rows[column] if column else [None] * len(rows)
        return [
            json.dumps([prompt, context, chosen])
            for prompt, context, chosen in zip(rows["prompt"], contexts, rows["chosen"])
        ]

    def latent_groups(self, pairs: Sequence[int], with_context: bool | str) -> list[int]:
        """Per pair, the id of its latent group as the Stage 1 trainer forms them (`data_utils.latent_groups`)."""
        return latent_groups(self.group_keys(pairs, with_context))

    def pairs_of_context(self, pairs: Sequence[int], context_id: str) -> list[int]:
        return [pair for pair in pairs if self.context_ids[pair] == context_id]

    def subset(self, pairs: Sequence[int]) -> CachedPairPool:
        """
        A pool of the pairs `pairs` (in that order) that reuses these features. The pairs with features with their
        context must come first; they keep them.
        """
        pairs = [int(pair) for pair in pairs]
        num_with_context = next((i for i, pair in enumerate(pairs) if pair >= self.num_with_context), len(pairs))
        if any(pair < self.num_with_context for pair in pairs[num_with_context:]):
            raise ValueError("A pool subset must list the pairs that have features with their context first.")
        bank = CachedFeatureCollator()
        bank.add(self.tensors(pairs, with_context=False))
        if num_with_context:
            bank.add(self.tensors(pairs[:num_with_context], with_context=True))
        return CachedPairPool(
            dataset=self.dataset.select(pairs),
            features=bank,
            context_ids=[self.context_ids[pair] for pair in pairs],
            num_with_context=num_with_context,
        )


def build_pair_pool(
    model: MiCRoRewardModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    context_column: str = "context",
    context_id_column: str = "context_id",
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    prompt_marker: str | None = None,
    num_with_context: int | None = None,
    with_unseen_wordings: bool = True,
) -> CachedPairPool:
    """
    Tokenize `dataset` without its `context_column`, and its first `num_with_context` pairs (all when None) with it
    (and with its `unseen_context` column, when the dataset has one and `with_unseen_wordings`: only router adaptation
    on held-out wordings reads those), and load (or compute and store) the backbone
    features of every form. `model`'s heads
    and router are not used, only its backbone.
    """
    started = time.perf_counter()
    num_with_context = len(dataset) if num_with_context is None else num_with_context
    if not 0 <= num_with_context <= len(dataset):
        raise ValueError(f"num_with_context must be in [0, {len(dataset)}], got {num_with_context}.")
    for column in (context_column, context_id_column):
        if column not in dataset.column_names:
            raise ValueError(
                f"The pool dataset has no column {column!r}; columns present: {sorted(dataset.column_names)}. "
                "A pool needs every pair's context text and context label."
            )
    bank = CachedFeatureCollator()
    evaluation = dataset.select(range(num_with_context))
    forms = [(None, dataset)] + [(context_column, evaluation)] * bool(num_with_context)
    has_unseen_wordings = (
        bool(num_with_context) and with_unseen_wordings and UNSEEN_CONTEXT_COLUMN in dataset.column_names
    )
    if has_unseen_wordings:
        forms.append((UNSEEN_CONTEXT_COLUMN, evaluation))
    for form_context_column, pairs in forms:
        tokenized = tokenize_pairs(pairs, tokenizer, model.config.context_template, form_context_column, prompt_marker)
        form = f"with {form_context_column}" if form_context_column else "without context"
        features = pair_features(
            model,
            tokenized,
            cache_dir=cache_dir,
            batch_size=batch_size,
            desc=f"Backbone features ({form}, {len(tokenized)} pairs)",
        )
        bank.add(features)
    return CachedPairPool(
        dataset=dataset,
        features=bank,
        context_ids=[str(context) for context in dataset[context_id_column]],
        num_with_context=num_with_context,
        build_seconds=time.perf_counter() - started,
        has_unseen_wordings=has_unseen_wordings,
    )
