r"""
Personalized best-of-n: pick, for each prompt and each user, the best of n candidate completions by the user's reward
(`MiCRoReward.rerank`).

A user's reward of a candidate y to a prompt x is the reward's routed reward,

    r(x, y | user) = r_w(user)(x, y)  (+ u_user . h(x, y) for a user with a residual head),

the routed reward (`trl_micro.modeling_micro.routed_reward`) under w(user), the user's Stage 2 weights over the heads when the reward's user state (`user_store`, `online_router`)
knows the user, else the model's router reading the prompt (as `MiCRoReward.score` routes a row). Only the weights
and the residual head depend on the user: the backbone's features h(x, y), the head rewards r_k(x, y) and the router's
weights are computed once per candidate, however many users rank it, and every user's scores are then a (users, K) x
(K, n) product. Ranking n candidates for 100 users costs one backbone pass per candidate, as ranking them for one.

A context (text joined to the prompt as in training, `contexts`) belongs to the prompt, not to a user: it changes the
sequence the backbone reads, so users who need different contexts rank the same candidates in separate calls.

Rows are checked and tokenized by `MiCRoReward.encode_rows`, exactly as `MiCRoReward.score` does (same truncation,
same errors), and an error names the candidate as `candidates[i][j]`. With a `feature_store`
([`trl_micro.feature_cache.FeatureStore`], for a frozen backbone), candidates already read are not read again: a
second ranking of the same candidates (new users, updated weights, another reward on the same backbone) runs no
backbone at all.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import extract_model_from_parallel

from .data_utils import Messages
from .feature_cache import FeatureStore, compute_sequence_readings
from .modeling_micro import routed_reward

if TYPE_CHECKING:
    from .rewards import MiCRoReward


@dataclass
class Reranking:
    """
    What [`rerank`] returns, one entry per prompt (in the prompts' order):

    - `best[i][u]`: the index of the candidate picked for the u-th user of prompt i (the first one on a tie);
    - `scores[i]`: `(num_users, n)` float32 tensor, every candidate's reward for every user of prompt i;
    - `users[i]`: the user ids of prompt i as the reward keys them (`None`: routed by the model's router);
    - `head_rewards[i]`: `(n, K)`, each candidate's head rewards r_k (the same for every user);
    - `online_routed[i]`: `(num_users,)` bool, which users the user state knew (the others got the router's weights).
    """

    best: list[list[int]]
    scores: list[torch.Tensor]
    users: list[list[str | None]]
    head_rewards: list[torch.Tensor]
    online_routed: list[torch.Tensor]

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per prompt and user: `prompt_index`, `user`, `best`, `scores` and `online_routed`."""
        return [
            {
                "prompt_index": index,
                "user": user,
                "best": self.best[index][position],
                "scores": self.scores[index][position].tolist(),
                "online_routed": bool(self.online_routed[index][position]),
            }
            for index in range(len(self.best))
            for position, user in enumerate(self.users[index])
        ]


def check_rerank_inputs(
    prompts: Sequence[str | Messages],
    candidates: Sequence[Sequence[str | Messages]],
    users: Sequence[Sequence[str | int | None]] | None,
    contexts: Sequence[str | None] | None,
) -> list[list[str | None]]:
    """Refuse malformed inputs, naming the field and the fix; returns each prompt's user ids (normalized)."""
    from .rewards import row_user_ids

    if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
        raise TypeError(
            f"`prompts` must be a list of prompts (one per group of candidates), got {type(prompts).__name__}."
        )
    if len(prompts) == 0:
        raise ValueError("`prompts` is empty: pass at least one prompt and its candidates.")
    if isinstance(candidates, (str, dict)) or not isinstance(candidates, Sequence) or len(candidates) != len(prompts):
        size = len(candidates) if isinstance(candidates, Sequence) else type(candidates).__name__
        raise ValueError(
            f"`candidates` must hold one list of candidate completions per prompt: {len(prompts)} prompts, got {size}."
        )
    for index, group in enumerate(candidates):
        if isinstance(group, (str, dict)) or not isinstance(group, Sequence):
            raise ValueError(
                f"`candidates[{index}]` must be a list of candidate completions of prompt {index}, got "
                f"{type(group).__name__}; wrap a single candidate as [candidate]."
            )
        if group and all(isinstance(item, dict) and "role" in item for item in group):
            raise ValueError(
                f"`candidates[{index}]` must be a list of candidate completions of prompt {index}, got one chat "
                "completion (a list of messages); wrap a single candidate as [candidate]."
            )
        if len(group) == 0:
            raise ValueError(
                f"`candidates[{index}]` is empty: give prompt {index} at least one candidate to pick from."
            )
    if contexts is not None and (isinstance(contexts, str) or len(contexts) != len(prompts)):
        size = "a str" if isinstance(contexts, str) else f"{len(contexts)}"
        raise ValueError(f"`contexts` must hold one context (or None) per prompt: {len(prompts)} prompts, got {size}.")
    if users is None:
        return [[None] for _ in prompts]
    if isinstance(users, (str, dict)) or not isinstance(users, Sequence) or len(users) != len(prompts):
        size = len(users) if isinstance(users, Sequence) and not isinstance(users, str) else type(users).__name__
        raise ValueError(
            f"`users` must hold one list of user ids per prompt (the users who rank that prompt's candidates): "
            f"{len(prompts)} prompts, got {size}."
        )
    normalized = []
    for index, group in enumerate(users):
        if isinstance(group, (str, bytes, dict)) or not isinstance(group, Sequence):
            raise ValueError(
                f"`users[{index}]` must be a list of user ids, got {type(group).__name__} {group!r:.40}; wrap a single "
                "user as [user_id]."
            )
        if len(group) == 0:
            raise ValueError(f"`users[{index}]` is empty: give prompt {index} at least one user (None: the router).")
        normalized.append(row_user_ids(list(group), f"users[{index}]"))
    return normalized


@torch.no_grad()
def rerank(
    reward: MiCRoReward,
    prompts: Sequence[str | Messages],
    candidates: Sequence[Sequence[str | Messages]],
    users: Sequence[Sequence[str | int | None]] | None = None,
    contexts: Sequence[str | None] | None = None,
    feature_store: FeatureStore | str | os.PathLike | None = None,
) -> Reranking:
    """
    The best of each prompt's candidates for each of its users (see the module docstring).

    Args:
        reward ([`MiCRoReward`]): the reward; its user state (`user_store`, `online_router`, `residual_heads`) routes
            the users.
        prompts: P prompts, text or lists of chat messages.
        candidates: P lists of candidate completions (n may differ per prompt; at least one each), of the prompts'
            kind (text, or lists of messages).
        users: P lists of user ids (str or int, or None for "no user": routed by the model's router), the users who
            rank each prompt's candidates. Default: one ranking per prompt by the model's router.
        contexts: P contexts (text or None) joined to the prompts as in training.
        feature_store ([`FeatureStore`] or folder, *optional*): reuse and keep the backbone's readings of the
            candidates (for a frozen backbone): `FeatureStore(reward.model, root)`, or `root` (rewards that share a
            backbone share the readings stored under one root).

    Returns: a [`Reranking`].
    """
    from .reward_inputs import InvalidRow
    from .rewards import residual_corrections

    user_ids = check_rerank_inputs(prompts, candidates, users, contexts)
    owners = [(index, position) for index, group in enumerate(candidates) for position in range(len(group))]
    try:
        rows = reward.encode_rows(
            [prompts[index] for index, _ in owners],
            [candidates[index][position] for index, position in owners],
            contexts=None if contexts is None else [contexts[index] for index, _ in owners],
        )
    except InvalidRow as error:  # name the candidate by its prompt and position, as the caller passed it
        index, position = owners[error.row]
        if error.name == "completions":
            raise InvalidRow(f"candidates[{index}]", position, error.problem) from error
        raise InvalidRow(error.name, index, error.problem) from error
    if not reward._prepared:
        reward._place_without_accelerator()
    model = extract_model_from_parallel(reward.model)
    sequences = [(row.ids, row.prompt_length) for row in rows]
    if feature_store is not None:
        if not isinstance(feature_store, FeatureStore):
            feature_store = FeatureStore(model, feature_store)
        elif feature_store.model is not model:
            raise ValueError(
                "`feature_store` reads another model's readouts: pass `FeatureStore(reward.model, root)`, or the "
                "store's root folder."
            )
        reward_features, router_features = feature_store.features(sequences, reward.batch_size, reward.device)
    else:  # one backbone pass per candidate, batched by length
        readings = compute_sequence_readings(model, sequences, reward.batch_size, reward.device, progress=False)
        reward_features, router_features = model.features_from_readings(readings)
    device = reward.device
    scored = model.score_features(reward_features.to(device), router_features.to(device))
    head_rewards = scored.head_rewards.float().cpu()  # (N, K)
    router_weights = scored.mixture_weights.float().cpu()  # (N, K)
    reward_features = reward_features.float().cpu()

    distinct = list(dict.fromkeys(user for group in user_ids for user in group if user is not None))
    user_weights, user_residuals = reward.user_lookups(distinct or None)
    best, scores, routed, heads = [], [], [], []
    start = 0
    for index, group in enumerate(user_ids):
        n = len(candidates[index])
        own_heads, own_router = head_rewards[start : start + n], router_weights[start : start + n]
        # (users, n, K): the user's weights for every candidate, or the router's weights of each candidate.
        weights = torch.stack(
            [user_weights[user].float().cpu().expand(n, -1) if user in user_weights else own_router for user in group]
        )
        own_scores = routed_reward(own_heads.unsqueeze(0), weights)
        if user_residuals:
            features = reward_features[start : start + n]
            for position, user in enumerate(group):
                if user in user_residuals:
                    own_scores[position] += residual_corrections([user] * n, user_residuals, features)
        best.append(own_scores.argmax(dim=1).tolist())
        scores.append(own_scores)
        routed.append(torch.tensor([user in user_weights for user in group], dtype=torch.bool))
        heads.append(own_heads)
        start += n
    return Reranking(best=best, scores=scores, users=user_ids, head_rewards=heads, online_routed=routed)


__all__ = ["Reranking", "check_rerank_inputs", "rerank"]
