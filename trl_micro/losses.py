r"""
Losses of MiCRo and its baselines, on per-head reward margins.

For a pair (x, y_w, y_l) let delta_k = r_k(x, y_w) - r_k(x, y_l) and w(x) the router's weights. The mixture of
Bradley-Terry models gives the likelihood p(y_w > y_l | x) = sum_k w_k(x) sigmoid(delta_k), so the loss per pair is

    mixture_bt = -log sum_k w_k(x) sigmoid(delta_k) = -logsumexp_k( log w_k(x) + logsigmoid(delta_k) ),

computed in the second form (log-softmax and logsigmoid are exact for any logits, in float32 and bf16 alike).

When several pairs come from one rater who follows one head, the head is a latent of that group of pairs rather
than of each pair: the pairs of a context (a user, a criterion) in Stage 2, and in Stage 1 the pairs that share a
prompt and a chosen response (one rater preferring that response to several others). With w_bar(g) the mean router
weights over the n_g pairs of group g, the group's likelihood is sum_k w_bar_k(g) prod_{i in g} sigmoid(delta_ik), and
the loss per group is

    context_mixture_bt = -(1 / n_g) log sum_k w_bar_k(g) prod_{i in g} sigmoid(delta_ik)
                       = -(1 / n_g) logsumexp_k( log w_bar_k(g) + sum_{i in g} logsigmoid(delta_ik) ).

With one pair per group it is mixture_bt. With many, the model cannot lower it by sending each pair to whichever
head happens to agree with that pair's label; it must give the whole group the heads that explain all its pairs
(the model the online router's posterior assumes). This matters where the same pair is labelled both ways by
different raters (reversals): per pair, any even split of the heads between the two labels explains them equally
well, and a per-pair fit settles on such splits; per group, only heads that each follow one rater's whole taste do.

Regularizers against a collapsed router, both >= 0 and 0 at their optimum:

    balance = log K - H( mean_over_batch w(x) )      (every head gets used across the batch)
    entropy = log K - mean_over_batch H( w(x) )      (no prompt routed with full confidence too early)

Baselines are settings of the same objective: K=1 is plain BT (SingleReward); a router that ignores x is
StaticMixture; `ensemble_bt` trains each head with its own BT loss (Shared-Base Ensemble).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mixture_bt_loss(head_margins: torch.Tensor, router_logits: torch.Tensor, margin: torch.Tensor | None = None):
    """Per-pair negative log-likelihood of the mixture BT model: (B, K) margins and router logits -> (B,)."""
    if head_margins.shape != router_logits.shape:
        raise ValueError(
            f"head_margins {tuple(head_margins.shape)} and router_logits {tuple(router_logits.shape)} must match."
        )
    head_margins, router_logits = head_margins.float(), router_logits.float()
    if margin is not None:
        head_margins = head_margins - margin.float()[:, None]
    log_weights = F.log_softmax(router_logits, dim=-1)
    return -torch.logsumexp(log_weights + F.logsigmoid(head_margins), dim=-1)


def context_mixture_bt_loss(
    head_margins: torch.Tensor,
    router_logits: torch.Tensor,
    context_index: torch.Tensor,
    margin: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Negative log-likelihood of each group under one latent head per group: (B, K) margins and router logits and
    (B,) integer group ids (contexts, or latent groups) -> (C,), one value per group in the batch (in increasing id
    order), each divided by the group's number of pairs.
    """
    if head_margins.shape != router_logits.shape:
        raise ValueError(
            f"head_margins {tuple(head_margins.shape)} and router_logits {tuple(router_logits.shape)} must match."
        )
    if context_index.shape != head_margins.shape[:1]:
        raise ValueError(
            f"context_index {tuple(context_index.shape)} must hold one context id per pair "
            f"({head_margins.shape[0]} pairs)."
        )
    head_margins, router_logits = head_margins.float(), router_logits.float()
    if margin is not None:
        head_margins = head_margins - margin.float()[:, None]
    groups, rows = torch.unique(context_index, return_inverse=True)
    num_groups, num_heads = len(groups), head_margins.shape[1]
    counts = torch.zeros(num_groups, device=head_margins.device).index_add(
        0, rows, torch.ones_like(rows, dtype=torch.float)
    )
    weights = F.softmax(router_logits, dim=-1)
    mean_weights = torch.zeros(num_groups, num_heads, device=head_margins.device).index_add(0, rows, weights)
    # A weight that underflowed to 0 is floored at the smallest float: the value is unchanged, the gradient stays finite.
    log_mean_weights = torch.log((mean_weights / counts[:, None]).clamp_min(torch.finfo(torch.float32).tiny))
    log_likelihoods = torch.zeros(num_groups, num_heads, device=head_margins.device).index_add(
        0, rows, F.logsigmoid(head_margins)
    )
    return -torch.logsumexp(log_mean_weights + log_likelihoods, dim=-1) / counts


def ensemble_bt_loss(head_margins: torch.Tensor, margin: torch.Tensor | None = None):
    """Per-pair mean over heads of each head's own BT loss (B, K) -> (B,)."""
    head_margins = head_margins.float()
    if margin is not None:
        head_margins = head_margins - margin.float()[:, None]
    return -F.logsigmoid(head_margins).mean(dim=-1)


def entropy(probabilities: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=dim)


HEAD_AGREEMENT_WARNING = 0.95  # heads that rank this share of pairs alike have not separated into distinct tastes


def head_agreement(head_margins: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of heads of the share of pairs they rank the same way: 1 when the heads have not separated."""
    signs = head_margins.detach().float().sign()
    num_heads = signs.shape[-1]
    agree = (signs.T @ signs / signs.shape[0] + 1) / 2  # (K, K): share of pairs with equal signs (ties count half)
    return (agree.sum() - agree.diagonal().sum()) / (num_heads * (num_heads - 1))


def balance_penalty(mixture_weights: torch.Tensor) -> torch.Tensor:
    """log K - H(mean usage): 0 when the batch uses every head equally."""
    num_heads = mixture_weights.shape[-1]
    return math.log(num_heads) - entropy(mixture_weights.float().mean(dim=0))


def entropy_penalty(mixture_weights: torch.Tensor) -> torch.Tensor:
    """log K - mean per-prompt entropy: 0 when every prompt is routed uniformly."""
    num_heads = mixture_weights.shape[-1]
    return math.log(num_heads) - entropy(mixture_weights.float()).mean()
