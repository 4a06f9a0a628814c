r"""
Losses of MiCRo and its baselines, on per-head reward margins.

For a pair (x, y_w, y_l) let delta_k = r_k(x, y_w) - r_k(x, y_l) and w(x) the router's weights. The mixture of
Bradley-Terry models gives the likelihood p(y_w > y_l | x) = sum_k w_k(x) sigmoid(delta_k), so the loss per pair is

    mixture_bt = -log sum_k w_k(x) sigmoid(delta_k) = -logsumexp_k( log w_k(x) + logsigmoid(delta_k) ),

computed in the second form (log-softmax and logsigmoid are exact for any logits, in float32 and bf16 alike).

When the pairs come with a context (a user, a criterion) whose raters all follow one head, the head is a latent of
the context rather than of each pair. With w_bar(c) the mean router weights over the n_c pairs of context c, the
context's likelihood is sum_k w_bar_k(c) prod_{i in c} sigmoid(delta_ik), and the loss per context is

    context_mixture_bt = -(1 / n_c) log sum_k w_bar_k(c) prod_{i in c} sigmoid(delta_ik)
                       = -(1 / n_c) logsumexp_k( log w_bar_k(c) + sum_{i in c} logsigmoid(delta_ik) ).

With one pair per context it is mixture_bt. With many, a router cannot lower it by sending each pair to whichever
head happens to agree with that pair's label; it must give the whole context the heads that explain all its pairs
(the model the online router's posterior assumes).

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
    Negative log-likelihood of each context under one latent head per context: (B, K) margins and router logits and
    (B,) integer context ids -> (C,), one value per context in the batch (in increasing id order), each divided by
    the context's number of pairs.
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
    log_weights = F.log_softmax(router_logits, dim=-1)
    log_likelihoods = F.logsigmoid(head_margins)
    losses = []
    for context in torch.unique(context_index):
        rows = context_index == context
        num_pairs = rows.sum()
        log_mean_weights = torch.logsumexp(log_weights[rows], dim=0) - torch.log(num_pairs.float())
        losses.append(-torch.logsumexp(log_mean_weights + log_likelihoods[rows].sum(dim=0), dim=0) / num_pairs)
    return torch.stack(losses)


def ensemble_bt_loss(head_margins: torch.Tensor, margin: torch.Tensor | None = None):
    """Per-pair mean over heads of each head's own BT loss (B, K) -> (B,)."""
    head_margins = head_margins.float()
    if margin is not None:
        head_margins = head_margins - margin.float()[:, None]
    return -F.logsigmoid(head_margins).mean(dim=-1)


def entropy(probabilities: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return -(probabilities * torch.log(probabilities.clamp_min(1e-12))).sum(dim=dim)


def balance_penalty(mixture_weights: torch.Tensor) -> torch.Tensor:
    """log K - H(mean usage): 0 when the batch uses every head equally."""
    num_heads = mixture_weights.shape[-1]
    return math.log(num_heads) - entropy(mixture_weights.float().mean(dim=0))


def entropy_penalty(mixture_weights: torch.Tensor) -> torch.Tensor:
    """log K - mean per-prompt entropy: 0 when every prompt is routed uniformly."""
    num_heads = mixture_weights.shape[-1]
    return math.log(num_heads) - entropy(mixture_weights.float()).mean()
