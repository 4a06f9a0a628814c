r"""
Stage 1 head initialization by expectation-maximization on cached features.

Stage 1 fits K linear Bradley-Terry heads with one latent head per latent group (see `trl_micro.losses`). From the
trainer's random start, stochastic gradient descent moves all heads toward the single BT solution together and settles
in whichever optimum breaks their symmetry first, which on real data is often not the one that separates the raters.
On frozen features the same model can instead be fitted by EM, which starts from a random partition of the groups (so
the heads differ from the first step) and is cheap enough to restart many times:

- E-step: each group's posterior over heads, q_g(k) proportional to pi_k prod_{i in g} sigmoid(w_k . d_i), with d_i
  the pair's feature difference (chosen - rejected), standardized per dimension, and pi the mean posterior;
- M-step: each head maximizes sum_i q_{g(i)}(k) log sigmoid(w_k . d_i) / N - (l2 / 2) ||w_k||^2 (a weighted, L2
  penalized logistic regression, by L-BFGS warm-started from the previous head).

Each restart starts from posteriors drawn from a flat Dirichlet. Restarts and L2 weights are chosen on groups the fit
never saw: a seeded share of the groups (`holdout`) is held out, every (restart, l2) candidate is fitted on the others,
and the one with the highest held-out log-likelihood per pair,

    sum_{g held out} log sum_k pi_k prod_{i in g} sigmoid(w_k . d_i)  /  (pairs held out),

is refitted on all groups, from that candidate's heads (an E-step over every group, then EM). Training likelihood
would choose badly where pairs are fewer than feature dimensions: there one head can fit every training pair, and the
restart that lets it do so wins while ranking new pairs little better than chance. The refit's heads, mapped back to
the unstandardized features, are what training then refines with the full objective. With fewer than
`MIN_HELD_OUT_GROUPS` groups to hold out, the candidate with the highest penalized training likelihood is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

MIN_HELD_OUT_GROUPS = 4


def group_log_likelihoods(differences: torch.Tensor, groups: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """(G, K): the summed log-likelihood of each group's pairs (`differences` (N, p), `groups` (N,)) under each head."""
    per_pair = F.logsigmoid(differences @ heads.T)
    num_groups = int(groups.max()) + 1
    return torch.zeros(num_groups, heads.shape[0], dtype=per_pair.dtype).index_add(0, groups, per_pair)


def log_mixing_weights(responsibilities: torch.Tensor) -> torch.Tensor:
    """log pi: the mixing weights the responsibilities (G, K) imply, their mean over groups."""
    return torch.log(responsibilities.mean(dim=0).clamp_min(1e-12))


def posterior(group_ll: torch.Tensor, responsibilities: torch.Tensor) -> torch.Tensor:
    """The E-step: each group's posterior over heads, with the mixing weights the current responsibilities imply."""
    return torch.softmax(group_ll + log_mixing_weights(responsibilities), dim=1)


def maximize_heads(differences, pair_weights, heads, l2: float, max_iter: int) -> torch.Tensor:
    """The M-step: L-BFGS on the K weighted, penalized logistic regressions at once (their objectives are
    independent), from `heads`."""
    heads = heads.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([heads], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = -(pair_weights * F.logsigmoid(differences @ heads.T)).sum() / len(differences)
        loss = loss + 0.5 * l2 * heads.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return heads.detach()


def fit_mixture_em(
    differences: torch.Tensor,
    groups: torch.Tensor,
    responsibilities: torch.Tensor,
    l2: float,
    e_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = posterior,
    max_iter: int = 50,
    tol: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """
    EM from `responsibilities` (G, K) on standardized `differences` (N, p) with group ids `groups` (N,) in 0..G-1;
    `e_step(group_ll, responsibilities)` computes the next responsibilities (default: the posterior). Returns the
    heads (K, p), the final responsibilities and the penalized log-likelihood per pair of the mixture.
    """
    heads = torch.zeros(responsibilities.shape[1], differences.shape[1], dtype=differences.dtype)
    for iteration in range(max_iter):
        # the first M-step goes to convergence from zero; later ones only refine the previous heads
        heads = maximize_heads(differences, responsibilities[groups], heads, l2, 100 if iteration == 0 else 10)
        group_ll = group_log_likelihoods(differences, groups, heads)
        updated = e_step(group_ll, responsibilities)
        converged = (updated - responsibilities).abs().max() < tol
        responsibilities = updated
        if converged:
            break
    log_likelihood = torch.logsumexp(group_ll + log_mixing_weights(responsibilities), dim=1).sum() / len(differences)
    return heads, responsibilities, float(log_likelihood - 0.5 * l2 * heads.pow(2).sum())


def standardize(differences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Differences in float32, divided per dimension by their standard deviation; and that scale."""
    differences = differences.float()
    scale = differences.std(dim=0).clamp_min(1e-8) if len(differences) > 1 else torch.ones(differences.shape[1])
    return differences / scale, scale


def random_responsibilities(num_groups: int, num_heads: int, generator: torch.Generator) -> torch.Tensor:
    """A random start: each group's responsibilities drawn from a flat Dirichlet."""
    draws = torch._standard_gamma(torch.ones(num_groups, num_heads), generator=generator)
    return draws / draws.sum(dim=1, keepdim=True)


def mixture_log_likelihood(differences, groups, heads, log_weights) -> float:
    """sum_g log sum_k pi_k prod_{i in g} sigmoid(w_k . d_i), per pair: the mixture's log-likelihood of the groups."""
    group_ll = group_log_likelihoods(differences, groups, heads)
    return float(torch.logsumexp(group_ll + log_weights, dim=1).sum() / len(differences))


def split_groups(num_groups: int, holdout: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ids (fitted, held out): a seeded `holdout` share of the groups held out (none when too few)."""
    order = torch.randperm(num_groups, generator=generator)
    held = round(holdout * num_groups)
    if held < MIN_HELD_OUT_GROUPS or held >= num_groups:
        return order, order[:0]
    return order[held:], order[:held]


def em_initial_heads(
    differences: torch.Tensor,
    groups: torch.Tensor,
    num_heads: int,
    restarts: int = 8,
    l2: float | Sequence[float] = (0.1, 1.0, 10.0),
    seed: int = 0,
    holdout: float = 0.2,
    show_progress: bool = True,
) -> torch.Tensor:
    """
    Initial heads (K, p) for Stage 1 (see the module docstring) on the training pairs' feature differences
    `differences` (N, p) and latent-group ids `groups` (N,), in the units of the features: the best of `restarts`
    EM runs for each L2 weight of `l2` (one value: that weight), chosen by the log-likelihood of a `holdout` share of
    the groups, then refitted on all of them.
    """
    if differences.ndim != 2 or groups.shape != differences.shape[:1]:
        raise ValueError(
            f"differences must be (N, p) and groups (N,), got {tuple(differences.shape)} and {tuple(groups.shape)}."
        )
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}.")
    l2_values = [float(l2)] if isinstance(l2, (int, float)) else [float(value) for value in l2]
    if not l2_values or not all(value > 0 for value in l2_values):
        raise ValueError(f"l2 must be a weight > 0 or a non-empty list of them, got {l2!r}.")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}.")
    standardized, scale = standardize(differences)
    groups = torch.unique(groups, return_inverse=True)[1]
    num_groups = int(groups.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    fitted_groups, _ = split_groups(num_groups, holdout, generator)
    fitted_mask = torch.zeros(num_groups, dtype=torch.bool)
    fitted_mask[fitted_groups] = True
    fit_rows, held_rows = fitted_mask[groups], ~fitted_mask[groups]
    fit_ids = torch.unique(groups[fit_rows], return_inverse=True)[1]
    held_ids = torch.unique(groups[held_rows], return_inverse=True)[1] if held_rows.any() else None
    starts = [random_responsibilities(len(fitted_groups), num_heads, generator) for _ in range(restarts)]
    best, best_score = None, -float("inf")
    candidates = [(value, start) for value in l2_values for start in starts]
    for value, start in tqdm(candidates, desc="EM head initialization", disable=not show_progress):
        heads, responsibilities, objective = fit_mixture_em(standardized[fit_rows], fit_ids, start, value)
        log_weights = log_mixing_weights(responsibilities)
        if held_ids is not None:
            objective = mixture_log_likelihood(standardized[held_rows], held_ids, heads, log_weights)
        if objective > best_score:
            best, best_score = (value, heads, log_weights), objective
    value, heads, log_weights = best
    if held_ids is not None:  # refit on every group, from the chosen candidate
        start = torch.softmax(group_log_likelihoods(standardized, groups, heads) + log_weights, dim=1)
        heads, _, _ = fit_mixture_em(standardized, groups, start, value)
    chosen_by = "held-out" if held_ids is not None else "training (penalized)"
    logger.info(
        f"Initialized {num_heads} heads by EM: best of {len(candidates)} fits ({restarts} restarts x l2 in "
        f"{l2_values}), l2={value}, {chosen_by} log-likelihood per pair {best_score:.4f}."
    )
    return (heads / scale).float()
