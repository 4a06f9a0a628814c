r"""
Stage 2 from a few labelled pairs per user, in one call: online routing, then residual heads.

Given the scores of a user's labelled pairs (`trl_micro.scoring.PairScores`: per-head margins delta_i and reward
feature differences d_i), [`adapt_to_users`] fits, per user c (a user, rater or criterion id),

1. an [`OnlineRouter`] posterior over the K heads (`trl_micro.personalization.online_router`), starting from a prior: by default the
   model's own router weights averaged over c's pairs (each prompt read with its context text), then updated with c's head margins;
2. a [`ResidualHeads`] residual u_c (`trl_micro.personalization.residual_heads`) on top of the routed margins (`routed_reward` of delta_i under w(c)),
   its L2 weight cross-validated on c's pairs (needs 2 pairs per user or more).

With `num_queries`, the pairs given are a pool to ask from: [`choose_pairs_to_label`] picks `num_queries` per user
(`query_strategy`, `trl_micro.personalization.query_selection`), and both pieces are fitted on those alone. Residual heads fitted on
chosen pairs see the pairs on which the heads disagree most, not a random sample of the user's pairs, and their L2
weight is cross-validated on that sample: where an unbiased residual matters more than the routing, label random
pairs (`query_strategy="random"`).

The personalized margin of a pair of user c is then its routed margin under w(c) plus u_c . d; what was fitted saves as the two
JSON files that [`MiCRoReward`] reads by user id (`user_column`), for RL, or goes into a user store
(`UserAdaptation.save_to_store`, `trl_micro.personalization.stores`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling_micro import routed_reward
from ..scoring import PairScores
from ..value_checks import normalize_user_id
from .mixture_weights import ROUTING_RULES, user_weights
from .online_router import OnlineRouter, UserState
from .query_selection import choose_pairs_to_label
from .residual_heads import ResidualHeads
from .stores import UserStore

ONLINE_ROUTER_STORE = "online_router.json"
RESIDUAL_HEADS_STORE = "residual_heads.json"


@dataclass
class UserAdaptation:
    """What [`adapt_to_users`] fitted: per-user weights over the heads, and residual heads (or `None`)."""

    online_router: OnlineRouter
    residual_heads: ResidualHeads | None = None
    labelled_rows: list[int] | None = None  # with `num_queries`: the pool rows that were asked, in asking order
    routing_rules: dict[str, str] | None = None  # {user: "posterior" or "mixture"}: how each user's weights were fit

    def margins(self, scores: PairScores, user_ids: Sequence[str], with_residuals: bool = True) -> torch.Tensor:
        """(N,) personalized margins of scored pairs of the given users (routed, plus the residual correction)."""
        margins = routed_margins(self.online_router, user_ids, scores.head_margins)
        if with_residuals and self.residual_heads is not None:
            margins = margins + self.residual_heads.rewards(user_ids, scores.feature_deltas)
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

    def save_to_store(self, store: UserStore) -> int:
        """Write every adapted user (routing, and residual heads if fitted) into a user store; returns how many."""
        written = store.import_router(self.online_router)
        if self.residual_heads is not None:
            store.import_residuals(self.residual_heads)
        return written


def adapt_to_users(
    user_ids: Sequence[str],
    scores: PairScores,
    prior_weights: torch.Tensor | None = None,
    eta: float = 1.0,
    residual_heads: bool = True,
    cv_folds: int = 4,
    model_fingerprint: str | None = None,
    num_queries: int | None = None,
    query_strategy: str = "information",
    query_seed: int = 0,
    routing: str = "posterior",
    prior_strength: float = 2.0,
) -> UserAdaptation:
    """
    Fit online routing and residual heads per user from a few labelled pairs (see the module docstring).

    Args:
        user_ids (`Sequence[str]`): each pair's user id (a user, rater or criterion) (an int is read as its decimal string).
        scores ([`PairScores`]): the pairs scored by the Stage 1 model (`score_preference_pairs`).
        prior_weights (`(N, K)`, *optional*): router weights to average into each user's prior; defaults to the
            model router's weights in `scores`. Pass a uniform `(N, K)` tensor for no prior (HyRe's reweighting).
        eta (`float`, defaults to 1.0): the online router's learning rate (1.0: the exact Bayesian posterior).
        residual_heads (`bool`, defaults to `True`): also fit residual heads (every user needs >= 2 pairs).
        cv_folds (`int`, defaults to 4): cross-validation folds of the residual heads' L2 weight (fewer for a user
            with fewer pairs).
        model_fingerprint (`str`, *optional*): saved with the stores, checked when they are loaded.
        num_queries (`int`, *optional*): treat the pairs as a pool and learn from this many per user, chosen by
            `query_strategy` (`"information"`, `"disagreement"` or `"random"`, seeded by `query_seed`); the rows
            used are `UserAdaptation.labelled_rows`. Default: learn from every pair given.
        routing (`str`, defaults to `"posterior"`): how each user's weights over the heads are fitted: the online
            router's one-head posterior, `"mixture"` weights for users whose pairs come from several heads, or
            `"auto"`, the better of the two on each user's own pairs (`trl_micro.personalization.mixture_weights`).
        prior_strength (`float`, defaults to 2.0): the mixture weights' prior, in pseudo-comparisons.
    """
    user_ids = [normalize_user_id(user, f"user_ids[{row}]") for row, user in enumerate(user_ids)]
    if len(user_ids) != scores.head_margins.shape[0]:
        raise ValueError(f"{len(user_ids)} user ids for {scores.head_margins.shape[0]} scored pairs.")
    if not user_ids:
        raise ValueError("No labelled pairs to adapt to.")
    weights = scores.mixture_weights if prior_weights is None else prior_weights
    priors = router_priors(user_ids, weights)  # over every pair given: a pool's prior does not depend on what is asked
    labelled_rows = None
    if num_queries is not None:
        labelled_rows = choose_pairs_to_label(
            user_ids, scores.head_margins, num_queries, query_strategy, priors, eta, query_seed
        )
        user_ids, scores = [user_ids[row] for row in labelled_rows], scores.subset(labelled_rows)
    rules: dict[str, str] = {}
    router = fit_online_router(
        user_ids, scores.head_margins, priors, eta, model_fingerprint, routing, prior_strength, rules
    )
    residuals = None
    if residual_heads:
        fewest = min(user_ids.count(user) for user in set(user_ids))
        if fewest < 2:
            raise ValueError(
                f"Residual heads need at least 2 labelled pairs per user (cross-validation); a user has {fewest}. "
                "Give more pairs or pass residual_heads=False."
            )
        residuals = fit_residual_heads(
            router, user_ids, scores.head_margins, scores.feature_deltas, cv_folds, model_fingerprint
        )
    return UserAdaptation(router, residuals, labelled_rows, rules)


# ---------------------------------------------------------------------------------------------------- the pieces
def router_priors(user_ids: Sequence[str], mixture_weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """`{user: prior}`: the mean of the router weights (N, K) over each user's rows, renormalized."""
    priors = {}
    for user in sorted(set(user_ids)):
        rows = [row for row, other in enumerate(user_ids) if other == user]
        mean = torch.as_tensor(mixture_weights)[rows].double().mean(dim=0)
        priors[user] = mean / mean.sum()
    return priors


def fit_online_router(
    user_ids: Sequence[str],
    head_margins: torch.Tensor,
    priors: dict[str, torch.Tensor] | None = None,
    eta: float = 1.0,
    model_fingerprint: str | None = None,
    routing: str = "posterior",
    prior_strength: float = 2.0,
    rules: dict[str, str] | None = None,
) -> OnlineRouter:
    """
    An [`OnlineRouter`] in which every user c has seen the head margins (N, K) of its labelled pairs (the rows whose
    `user_ids` entry is c), starting from `priors[c]` (uniform when `priors` is None: HyRe's reweighting).
    `routing` (`trl_micro.personalization.mixture_weights`): "posterior", the online router's one-head posterior;
    "mixture", the user's MAP mixture weights (a Dirichlet prior of `prior_strength` pseudo-comparisons); "auto", the
    better of the two on the user's own pairs (leave-one-out). The rule used per user goes into `rules` when given.
    """
    if routing not in ROUTING_RULES:
        raise ValueError(f"`routing` must be one of {ROUTING_RULES}, got {routing!r}.")
    router = OnlineRouter(num_heads=head_margins.shape[1], eta=eta, model_fingerprint=model_fingerprint)
    for user in sorted(set(user_ids)):
        rows = [row for row, other in enumerate(user_ids) if other == user]
        prior = None if priors is None else priors[user]
        rule = routing
        if routing != "posterior":
            weights, rule = user_weights(head_margins[rows], routing, prior, prior_strength, eta)
        if rule == "posterior":
            router.update(user, head_margins[rows], prior=prior)
        else:  # the mixture weights become the user's state; later comparisons update them as the posterior does
            log_prior = router._default_log_prior if prior is None else torch.as_tensor(prior).double().log()
            router._states[user] = UserState(weights.clamp_min(1e-300).log(), log_prior, len(rows))
        if rules is not None:
            rules[user] = rule
    return router


def routed_margins(router: OnlineRouter, user_ids: Sequence[str], head_margins: torch.Tensor) -> torch.Tensor:
    """Margins (N,) of pairs with head margins (N, K), weighted by `router`'s weights for each row's user."""
    weights = torch.stack([router.weights(user) for user in user_ids]).to(head_margins.dtype)
    return routed_reward(head_margins, weights)


def fit_residual_heads(
    router: OnlineRouter,
    user_ids: Sequence[str],
    head_margins: torch.Tensor,
    feature_deltas: torch.Tensor,
    cv_folds: int = 4,
    model_fingerprint: str | None = None,
) -> ResidualHeads:
    """
    A [`ResidualHeads`] residual per user of `user_ids` (one per row of head margins (N, K) and feature deltas
    (N, hidden)), on top of `router`'s routed margins; lambda cross-validated with `cv_folds` folds, fewer when a
    user has fewer pairs (at least 2).
    """
    fewest = min(list(user_ids).count(user) for user in set(user_ids))
    residuals = ResidualHeads(
        feature_deltas.shape[1], cv_folds=max(2, min(cv_folds, fewest)), model_fingerprint=model_fingerprint
    )
    residuals.fit_many(user_ids, routed_margins(router, user_ids, head_margins), feature_deltas)
    return residuals


def adapt_to_contexts(contexts: Sequence[str], scores: PairScores, **kwargs) -> UserAdaptation:
    """Deprecated name of [`adapt_to_users`] (`contexts` were user ids); removed in the next release."""
    warnings.warn(
        "`adapt_to_contexts(contexts=...)` is now `adapt_to_users(user_ids=...)`: a 'context' is text joined to a "
        "prompt, a 'user' an id. The old name is removed in the next release.",
        FutureWarning,
        stacklevel=2,
    )
    return adapt_to_users(contexts, scores, **kwargs)


ContextAdaptation = UserAdaptation  # deprecated name, removed in the next release
