r"""
Scoring a preference dataset with a MiCRo reward model: every pair's per-head margins and routing weights.

For a pair (x, c, y_w, y_l), with the context c joined to the prompt x as in training,

    head_margins[k]  = r_k(x, c, y_w) - r_k(x, c, y_l)
    mixture_weights  = w(x, c)                           (the router reads the prompt once; both responses share it)
    margins          = r(x, y_w | c) - r(x, y_l | c)      (the routed reward's margin, `routed_reward`)

so a pair is ranked correctly by the routed reward when its margin is positive. The backbone runs once per distinct
sequence (its features can be kept in the trainers' feature store, `trl_micro.feature_cache`); any other weights, e.g. an online router's, can be
applied to the same head margins afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .data_utils import check_preference_columns, tokenize_pairs
from .feature_cache import pair_features
from .modeling_micro import MiCRoRewardModel, routed_reward


@dataclass
class PairScores:
    """
    Per-pair scores of a preference dataset, on the CPU: `head_margins` and `router_logits`, each (N, K),
    `feature_deltas` (N, hidden), h(x, c, y_w) - h(x, c, y_l) of the reward features (what residual heads read), and
    `head_rewards` (N, 2, K), r_k(x, c, y_w) and r_k(x, c, y_l) (when scored from features).
    """

    head_margins: torch.Tensor
    router_logits: torch.Tensor
    feature_deltas: torch.Tensor
    head_rewards: torch.Tensor | None = None

    @property
    def mixture_weights(self) -> torch.Tensor:
        return torch.softmax(self.router_logits, dim=-1)

    def subset(self, rows) -> PairScores:
        """The scores of the pairs `rows` (indices), in that order."""
        head_rewards = None if self.head_rewards is None else self.head_rewards[rows]
        return PairScores(self.head_margins[rows], self.router_logits[rows], self.feature_deltas[rows], head_rewards)

    @property
    def margins(self) -> torch.Tensor:
        """(N,) routed reward margins, r(x, y_w | c) - r(x, y_l | c)."""
        return routed_reward(self.head_margins, self.mixture_weights)


@torch.no_grad()
def score_preference_pairs(
    model: MiCRoRewardModel,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    context_column: str | None = "context",
    prompt_marker: str | None = None,
    batch_size: int = 16,
    feature_cache_dir: str | os.PathLike | None = None,
) -> PairScores:
    """
    Score every pair of `dataset` (TRL's preference formats, as the trainers take them).

    `context_column` joins each row's context to its prompt through `model.config.context_template` (`None`, or a
    column absent from the dataset, scores the prompts as they are). `prompt_marker` splits implicit prompts, as in
    training. With `feature_cache_dir`, backbone features are read from or written to that cache.
    """
    check_preference_columns(dataset.column_names, "scored")
    context_column = context_column if context_column in dataset.column_names else None
    tokenized = tokenize_pairs(dataset, tokenizer, model.config.context_template, context_column, prompt_marker)
    features = pair_features(
        model,
        tokenized,
        feature_cache_dir,
        use_store=feature_cache_dir is not None,
        batch_size=batch_size,
        desc="Scoring pairs",
    )
    return score_pair_features(model, features)


@torch.no_grad()
def score_pair_features(model: MiCRoRewardModel, features: dict[str, torch.Tensor]) -> PairScores:
    """The heads and router of `model` on backbone features `{chosen_reward, rejected_reward, router}`, each (N, hidden)."""
    device = model.heads.weight.device
    router_features = features["router"].to(device)
    chosen = model.score_features(features["chosen_reward"].to(device), router_features)
    rejected = model.score_features(features["rejected_reward"].to(device), router_features)
    return PairScores(
        head_margins=(chosen.head_rewards - rejected.head_rewards).float().cpu(),
        router_logits=chosen.router_logits.float().cpu(),
        feature_deltas=(features["chosen_reward"].float() - features["rejected_reward"].float()).cpu(),
        head_rewards=torch.stack([chosen.head_rewards, rejected.head_rewards], dim=1).float().cpu(),
    )
