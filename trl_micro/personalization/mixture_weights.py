r"""
Per-user mixture weights over the heads: for a user whose comparisons come from several heads.

Online routing ([`OnlineRouter`]) is the posterior of "which one head is this user": every comparison multiplies the
weights by its likelihood under each head, so after a few comparisons one head takes nearly all the weight. A user
whose taste is a mix of heads (each comparison decided by head k with probability pi_k) is pushed to one of them.
This module estimates pi itself, by maximum a posteriori EM on the user's comparisons, with head margins
delta_ik = r_k(chosen_i) - r_k(rejected_i) and a Dirichlet prior of `prior_strength` c pseudo-comparisons spread by the
prior p (the Stage 1 router's weights for the user's prompts, or uniform):

    E step:  g_ik  =  pi_k sigmoid(delta_ik) / sum_j pi_j sigmoid(delta_ij)
    M step:  pi_k  =  (sum_i g_ik + c p_k) / (N + c)

Each step raises sum_i log sum_k pi_k sigmoid(delta_ik) + c sum_k p_k log pi_k; with no comparison pi = p, and the
prior's pull fades as N grows.

Which of the two a user gets ([`choose_routing`]): the one whose leave-one-out predictive likelihood on the user's own
comparisons is higher, sum_i log sum_k w_k^(-i) sigmoid(delta_ik), with w^(-i) fitted without comparison i (the
posterior for "one head", the EM estimate for "a mix"). A user with fewer than `min_comparisons_to_choose` comparisons
keeps the posterior.
"""

from __future__ import annotations

import math

import torch

from ..value_checks import ArrayLike, as_float64
from .online_router import log_sigmoid

ROUTING_RULES = ("posterior", "mixture", "auto")


def mixture_weights(
    head_margins: ArrayLike,
    prior: ArrayLike | None = None,
    prior_strength: float = 2.0,
    max_iter: int = 200,
    tolerance: float = 1e-9,
) -> torch.Tensor:
    """
    pi `(K,)`, float64: the MAP mixture weights of one user's comparisons (head margins `(N, K)`, chosen minus
    rejected) under the module docstring's model. `prior` `(K,)` sums to 1 (uniform when `None`).
    """
    margins = _margins(head_margins)
    return _batched_mixture(margins[None], torch.ones(1, margins.shape[0], dtype=torch.float64),
                            _prior(prior, margins.shape[1]), prior_strength, max_iter, tolerance)[0]  # fmt: skip


def posterior_weights(head_margins: ArrayLike, prior: ArrayLike | None = None, eta: float = 1.0) -> torch.Tensor:
    """w `(K,)`: the one-head posterior of online routing after the comparisons `(N, K)` (no forgetting)."""
    margins = _margins(head_margins)
    log_weights = _prior(prior, margins.shape[1]).log() + eta * log_sigmoid(margins).sum(0)
    return torch.softmax(log_weights, 0)


def leave_one_out_log_likelihood(
    head_margins: ArrayLike,
    rule: str,
    prior: ArrayLike | None = None,
    prior_strength: float = 2.0,
    eta: float = 1.0,
) -> float:
    """sum_i log sum_k w_k^(-i) sigmoid(delta_ik), with w^(-i) fitted by `rule` ("posterior" or "mixture") without i."""
    margins = _margins(head_margins)
    num, num_heads = margins.shape
    p = _prior(prior, num_heads)
    keep = 1.0 - torch.eye(num, dtype=torch.float64)  # row i: every comparison but i
    if rule == "posterior":
        log_weights = p.log()[None] + eta * keep @ log_sigmoid(margins)
        weights = torch.softmax(log_weights, dim=1)
    elif rule == "mixture":
        weights = _batched_mixture(margins[None].expand(num, -1, -1), keep, p, prior_strength, 200, 1e-9)
    else:
        raise ValueError(f"`rule` must be 'posterior' or 'mixture', got {rule!r}.")
    predictive = (weights * torch.sigmoid(margins)).sum(1)  # P(observed label of i | the others)
    return float(predictive.clamp_min(1e-300).log().sum())


def choose_routing(
    head_margins: ArrayLike,
    prior: ArrayLike | None = None,
    prior_strength: float = 2.0,
    eta: float = 1.0,
    min_comparisons_to_choose: int = 4,
) -> str:
    """ "posterior" or "mixture" for one user: the better leave-one-out fit on its own comparisons (module docstring)."""
    margins = _margins(head_margins)
    if margins.shape[0] < min_comparisons_to_choose:
        return "posterior"
    scores = {
        rule: leave_one_out_log_likelihood(margins, rule, prior, prior_strength, eta)
        for rule in ("posterior", "mixture")
    }
    return "mixture" if scores["mixture"] > scores["posterior"] else "posterior"


def user_weights(
    head_margins: ArrayLike,
    rule: str = "posterior",
    prior: ArrayLike | None = None,
    prior_strength: float = 2.0,
    eta: float = 1.0,
) -> tuple[torch.Tensor, str]:
    """(weights `(K,)`, the rule used) of one user's comparisons under `rule` ("posterior", "mixture" or "auto")."""
    if rule not in ROUTING_RULES:
        raise ValueError(f"`routing` must be one of {ROUTING_RULES}, got {rule!r}.")
    if rule == "auto":
        rule = choose_routing(head_margins, prior, prior_strength, eta)
    if rule == "mixture":
        return mixture_weights(head_margins, prior, prior_strength), rule
    return posterior_weights(head_margins, prior, eta), rule


# ------------------------------------------------------------------------------------------------------------ helpers
def _batched_mixture(margins, mask, prior, prior_strength, max_iter, tolerance) -> torch.Tensor:
    """EM for B users at once: margins `(B, N, K)`, mask `(B, N)` (1 = the comparison counts); returns `(B, K)`."""
    if not (math.isfinite(prior_strength) and prior_strength > 0):
        raise ValueError(f"`prior_strength` must be a finite number > 0, got {prior_strength!r}.")
    likelihood = torch.sigmoid(margins)  # (B, N, K)
    pseudo = prior_strength * prior  # (K,)
    counts = mask.sum(1, keepdim=True)  # (B, 1)
    weights = prior.expand(margins.shape[0], -1).clone()
    for _ in range(max_iter):
        joint = weights[:, None, :] * likelihood  # (B, N, K)
        responsibilities = joint / joint.sum(-1, keepdim=True)
        updated = ((responsibilities * mask[..., None]).sum(1) + pseudo) / (counts + prior_strength)
        converged = (updated - weights).abs().max() < tolerance
        weights = updated
        if converged:
            break
    return weights


def _margins(head_margins: ArrayLike) -> torch.Tensor:
    margins = as_float64(head_margins, "head_margins")
    if margins.dim() != 2 or margins.shape[1] < 1:
        raise ValueError(f"`head_margins` must have shape (N, K), got {tuple(margins.shape)}.")
    if not bool(torch.isfinite(margins).all()):
        raise ValueError("`head_margins` must be finite.")
    return margins


def _prior(prior: ArrayLike | None, num_heads: int) -> torch.Tensor:
    if prior is None:
        return torch.full((num_heads,), 1.0 / num_heads, dtype=torch.float64)
    values = as_float64(prior, "prior")
    if values.shape != (num_heads,) or not bool((values > 0).all()) or abs(float(values.sum()) - 1) > 1e-3:
        raise ValueError(f"`prior` must be {num_heads} positive weights summing to 1, got {values.tolist()}.")
    return values / values.sum()


__all__ = [
    "ROUTING_RULES",
    "choose_routing",
    "leave_one_out_log_likelihood",
    "mixture_weights",
    "posterior_weights",
    "user_weights",
]
