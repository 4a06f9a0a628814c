r"""
Stage 2 from a few labelled pairs per context, in one call: online routing, then residual heads.

Given the scores of a context's labelled pairs (`trl_micro.scoring.PairScores`: per-head margins delta_i and reward
feature differences d_i), [`adapt_to_contexts`] fits, per context c,

1. an [`OnlineRouter`] posterior over the K heads (`trl_micro.online_router`), starting from a prior: by default the
   model's own router weights averaged over c's pairs, then updated with c's head margins;
2. a [`ResidualHeads`] residual u_c (`trl_micro.residual_heads`) on top of the routed margins sum_k w_k(c) delta_ik,
   its L2 weight cross-validated on c's pairs (needs 2 pairs per context or more).

With `num_queries`, the pairs given are a pool to ask from: [`choose_pairs_to_label`] picks `num_queries` per context
(`query_strategy`, `trl_micro.query_selection`), and both pieces are fitted on those alone. Residual heads fitted on
chosen pairs see the pairs on which the heads disagree most, not a random sample of the context's pairs, and their L2
weight is cross-validated on that sample: where an unbiased residual matters more than the routing, label random
pairs (`query_strategy="random"`).

The personalized margin of a pair of context c is then sum_k w_k(c) delta_k + u_c . d; what was fitted saves as the two
JSON stores that [`MiCRoReward`] reads by user id (`user_column`), for RL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .online_router import OnlineRouter
from .query_selection import choose_pairs_to_label
from .residual_heads import ResidualHeads
from .scoring import PairScores
from .user_stores import normalize_user_id

ONLINE_ROUTER_STORE = "online_router.json"
RESIDUAL_HEADS_STORE = "residual_heads.json"


@dataclass
class ContextAdaptation:
    """What [`adapt_to_contexts`] fitted: per-context weights over the heads, and residual heads (or `None`)."""

    online_router: OnlineRouter
    residual_heads: ResidualHeads | None = None
    labelled_rows: list[int] | None = None  # with `num_queries`: the pool rows that were asked, in asking order

    def margins(self, scores: PairScores, contexts: Sequence[str], with_residuals: bool = True) -> torch.Tensor:
        """(N,) personalized margins of scored pairs of the given contexts (routed, plus the residual correction)."""
        margins = routed_margins(self.online_router, contexts, scores.head_margins)
        if with_residuals and self.residual_heads is not None:
            margins = margins + self.residual_heads.rewards(contexts, scores.feature_deltas)
        return margins

    def save(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write `online_router.json` (and `residual_heads.json`) in `output_dir`; returns the paths."""
        folder = Path(output_dir)
        paths = {"online_router": folder / ONLINE_ROUTER_STORE}
        self.online_router.save(paths["online_router"])
        if self.residual_heads is not None:
            paths["residual_heads"] = folder / RESIDUAL_HEADS_STORE
            self.residual_heads.save(paths["residual_heads"])
        return paths


def adapt_to_contexts(
    contexts: Sequence[str],
    scores: PairScores,
    prior_weights: torch.Tensor | None = None,
    eta: float = 1.0,
    residual_heads: bool = True,
    cv_folds: int = 4,
    model_fingerprint: str | None = None,
    num_queries: int | None = None,
    query_strategy: str = "information",
    query_seed: int = 0,
) -> ContextAdaptation:
    """
    Fit online routing and residual heads per context from a few labelled pairs (see the module docstring).

    Args:
        contexts (`Sequence[str]`): each pair's context (or user) id (an int is read as its decimal string).
        scores ([`PairScores`]): the pairs scored by the Stage 1 model (`score_preference_pairs`).
        prior_weights (`(N, K)`, *optional*): router weights to average into each context's prior; defaults to the
            model router's weights in `scores`. Pass a uniform `(N, K)` tensor for no prior (HyRe's reweighting).
        eta (`float`, defaults to 1.0): the online router's learning rate (1.0: the exact Bayesian posterior).
        residual_heads (`bool`, defaults to `True`): also fit residual heads (every context needs >= 2 pairs).
        cv_folds (`int`, defaults to 4): cross-validation folds of the residual heads' L2 weight (fewer for a context
            with fewer pairs).
        model_fingerprint (`str`, *optional*): saved with the stores, checked when they are loaded.
        num_queries (`int`, *optional*): treat the pairs as a pool and learn from this many per context, chosen by
            `query_strategy` (`"information"`, `"disagreement"` or `"random"`, seeded by `query_seed`); the rows
            used are `ContextAdaptation.labelled_rows`. Default: learn from every pair given.
    """
    contexts = [normalize_user_id(context, f"contexts[{row}]") for row, context in enumerate(contexts)]
    if len(contexts) != scores.head_margins.shape[0]:
        raise ValueError(f"{len(contexts)} context ids for {scores.head_margins.shape[0]} scored pairs.")
    if not contexts:
        raise ValueError("No labelled pairs to adapt to.")
    weights = scores.mixture_weights if prior_weights is None else prior_weights
    priors = router_priors(contexts, weights)  # over every pair given: a pool's prior does not depend on what is asked
    labelled_rows = None
    if num_queries is not None:
        labelled_rows = choose_pairs_to_label(
            contexts, scores.head_margins, num_queries, query_strategy, priors, eta, query_seed
        )
        contexts, scores = [contexts[row] for row in labelled_rows], scores.subset(labelled_rows)
    router = fit_online_router(contexts, scores.head_margins, priors, eta, model_fingerprint=model_fingerprint)
    residuals = None
    if residual_heads:
        fewest = min(contexts.count(context) for context in set(contexts))
        if fewest < 2:
            raise ValueError(
                f"Residual heads need at least 2 labelled pairs per context (cross-validation); a context has {fewest}. "
                "Give more pairs or pass residual_heads=False."
            )
        residuals = fit_residual_heads(
            router, contexts, scores.head_margins, scores.feature_deltas, cv_folds, model_fingerprint
        )
    return ContextAdaptation(router, residuals, labelled_rows)


# ---------------------------------------------------------------------------------------------------- the pieces
def router_priors(contexts: Sequence[str], mixture_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{context: prior}`: the mean of the router weights (N, K) over each context's rows, renormalized."""
    priors = {}
    for context in sorted(set(contexts)):
        rows = [row for row, other in enumerate(contexts) if other == context]
        mean = torch.as_tensor(mixture_weights)[rows].double().mean(dim=0)
        priors[context] = mean / mean.sum()
    return priors


def fit_online_router(
    contexts: Sequence[str],
    head_margins: torch.Tensor,
    priors: dict[str, torch.Tensor] | None = None,
    eta: float = 1.0,
    model_fingerprint: str | None = None,
) -> OnlineRouter:
    """
    An [`OnlineRouter`] in which every context c has seen the head margins (N, K) of its labelled pairs (the rows whose
    `contexts` entry is c), starting from `priors[c]` (uniform when `priors` is None: HyRe's reweighting).
    """
    router = OnlineRouter(num_heads=head_margins.shape[1], eta=eta, model_fingerprint=model_fingerprint)
    for context in sorted(set(contexts)):
        rows = [row for row, other in enumerate(contexts) if other == context]
        router.update(context, head_margins[rows], prior=None if priors is None else priors[context])
    return router


def routed_margins(router: OnlineRouter, contexts: Sequence[str], head_margins: torch.Tensor) -> torch.Tensor:
    """Margins (N,) of pairs with head margins (N, K), weighted by `router`'s weights for each row's context."""
    weights = torch.stack([router.weights(context) for context in contexts]).to(head_margins.dtype)
    return (weights * head_margins).sum(dim=-1)


def fit_residual_heads(
    router: OnlineRouter,
    contexts: Sequence[str],
    head_margins: torch.Tensor,
    feature_deltas: torch.Tensor,
    cv_folds: int = 4,
    model_fingerprint: str | None = None,
) -> ResidualHeads:
    """
    A [`ResidualHeads`] residual per context of `contexts` (one per row of head margins (N, K) and feature deltas
    (N, hidden)), on top of `router`'s routed margins; lambda cross-validated with `cv_folds` folds, fewer when a
    context has fewer pairs (at least 2).
    """
    fewest = min(list(contexts).count(context) for context in set(contexts))
    residuals = ResidualHeads(
        feature_deltas.shape[1], cv_folds=max(2, min(cv_folds, fewest)), model_fingerprint=model_fingerprint
    )
    residuals.fit_many(contexts, routed_margins(router, contexts, head_margins), feature_deltas)
    return residuals
