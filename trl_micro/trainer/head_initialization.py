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

Each restart starts from posteriors drawn from a flat Dirichlet; the restart with the highest penalized log-likelihood
gives the heads (mapped back to the unstandardized features) that training then refines with the full objective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


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
    """Differences in float64, divided per dimension by their standard deviation; and that scale."""
    differences = differences.double()
    scale = differences.std(dim=0).clamp_min(1e-8) if len(differences) > 1 else torch.ones(differences.shape[1])
    return differences / scale, scale


def random_responsibilities(num_groups: int, num_heads: int, generator: torch.Generator) -> torch.Tensor:
    """A random start: each group's responsibilities drawn from a flat Dirichlet."""
    draws = torch._standard_gamma(torch.ones(num_groups, num_heads, dtype=torch.float64), generator=generator)
    return draws / draws.sum(dim=1, keepdim=True)


def em_initial_heads(
    differences: torch.Tensor,
    groups: torch.Tensor,
    num_heads: int,
    restarts: int = 8,
    l2: float = 0.02,
    seed: int = 0,
    show_progress: bool = True,
) -> torch.Tensor:
    """
    Initial heads (K, p) for Stage 1: the best of `restarts` EM runs (see the module docstring) on the training pairs'
    feature differences `differences` (N, p) and latent-group ids `groups` (N,), in the units of the features.
    """
    if differences.ndim != 2 or groups.shape != differences.shape[:1]:
        raise ValueError(
            f"differences must be (N, p) and groups (N,), got {tuple(differences.shape)} and {tuple(groups.shape)}."
        )
    if restarts < 1:
        raise ValueError(f"restarts must be >= 1, got {restarts}.")
    standardized, scale = standardize(differences)
    groups = torch.unique(groups, return_inverse=True)[1]
    num_groups = int(groups.max()) + 1
    generator = torch.Generator().manual_seed(seed)
    best_heads, best_objective = None, -float("inf")
    for _ in tqdm(range(restarts), desc="EM head initialization", disable=not show_progress):
        start = random_responsibilities(num_groups, num_heads, generator)
        heads, _, objective = fit_mixture_em(standardized, groups, start, l2)
        if objective > best_objective:
            best_heads, best_objective = heads, objective
    logger.info(f"Initialized {num_heads} heads by EM: best of {restarts} restarts, log-likelihood per pair "
                f"{best_objective:.4f} (penalized).")
    return (best_heads / scale).float()
