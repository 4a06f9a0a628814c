r"""
Rebuilding every user's Stage 2 state for new heads, from the feedback log.

Routing weights are a posterior over one model's heads; when Stage 1 is retrained they mean nothing for the new heads.
The user store keeps every comparison (`trl_micro.personalization.stores`), so [`rebuild_user_store`] replays them:

1. the head rewards r_k of every logged response under the new model: read from the feature store when the log
   row was scored on the same backbone and its readings were kept (a frozen backbone: no backbone pass), computed
   otherwise (and then kept, so the next rebuild reads them);
2. each user's posterior, from the store's default prior (a prior over the old heads says nothing of the new ones),
   updated with the new margins r_k(chosen) - r_k(rejected) of the user's comparisons in log order
   (`OnlineRouter.update_many`, exactly as if they had arrived one by one);
3. the residual head of each user that had one, refitted on the new routed margins and reward features;
4. the store pointed at the new model: the new states and residuals replace the old ones in one step per batch, and
   the settings take the new model's fingerprint and K.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..feature_cache import (
    READINGS,
    FeatureStore,
    backbone_fingerprint,
    compute_sequence_readings,
    reward_model_fingerprint,
)
from ..modeling_micro import routed_reward
from .online_router import OnlineRouter
from .stores import UserStore

Encode = Callable[[object, object, "str | None"], tuple[list[int], int]]


@dataclass
class RebuildReport:
    """What a rebuild did: users and comparisons replayed, sequences read from the feature store or computed."""

    users: int
    comparisons: int
    sequences_from_features: int
    sequences_computed: int
    residual_users: int
    seconds: float
    model_fingerprint: str


@torch.no_grad()
def rebuild_user_store(
    store: UserStore,
    model,
    encode: Encode,
    feature_root: str | None = None,
    batch_size: int = 16,
    refit_residuals: bool = True,
    progress: bool = True,
) -> RebuildReport:
    """
    Replay every logged comparison of `store` through `model` (a `MiCRoRewardModel`) and replace every user's routing
    (and residual head) with the result; see the module docstring.

    Args:
        store ([`UserStore`]): the store to rebuild.
        model: the new reward model.
        encode: `(prompt, completion, context) -> (token ids, prompt length)`, the tokenization scoring uses
            (`MiCRoReward.encode`), for comparisons whose readings are not in the feature store.
        feature_root (`str`, *optional*): the feature store's root (default `$TRL_MICRO_CACHE/features`).
        batch_size (`int`, defaults to 16): sequences per backbone pass, for those computed.
        refit_residuals (`bool`, defaults to `True`): refit the residual heads of the users that have one.
    """
    started = time.perf_counter()
    model.eval()
    feature_store = FeatureStore(model, feature_root)
    backbone = backbone_fingerprint(model.backbone)
    index = list(store.comparison_index())
    residual_users = set(store.residual_users()) if refit_residuals and store.settings.hidden_size else set()

    wanted = {}
    for row in index:
        if row.feature_backbone == backbone and row.chosen_key and row.rejected_key:
            wanted[row.chosen_key] = wanted[row.rejected_key] = None
    keep_features = {
        key for row in index if row.user_id in residual_users for key in (row.chosen_key, row.rejected_key)
    }
    heads, features = _read_stored(feature_store, model, set(wanted), keep_features, progress)
    from_features = len(heads)

    missing_rows = [
        row.id for row in index if row.chosen_key not in heads or row.rejected_key not in heads or not row.chosen_key
    ]
    computed_keys: dict[int, tuple[str, str]] = {}
    num_computed = 0
    if missing_rows:
        computed_keys, num_computed = _compute_missing(
            store, model, encode, feature_store, set(missing_rows), heads, features, residual_users, batch_size
        )

    user_ids, margins, feature_deltas = [], [], {}
    for row in index:
        chosen, rejected = computed_keys.get(row.id, (row.chosen_key, row.rejected_key))
        user_ids.append(row.user_id)
        margins.append(heads[chosen] - heads[rejected])
        if row.user_id in residual_users:
            feature_deltas.setdefault(row.user_id, []).append(features[chosen] - features[rejected])
    settings = store.settings
    fingerprint = reward_model_fingerprint(model)
    default_prior = (
        settings.default_prior if settings.default_prior and len(settings.default_prior) == model.num_heads else None
    )
    router = OnlineRouter(model.num_heads, settings.eta, settings.forgetting, default_prior, fingerprint)
    if user_ids:
        router.update_many(user_ids, torch.stack(margins))

    residuals = {}
    if residual_users:
        template = store.residual_heads_template()
        template.model_fingerprint = fingerprint
        for user in sorted(residual_users):
            rows = [i for i, other in enumerate(user_ids) if other == user]
            if len(rows) < 2 or user not in router:
                continue
            user_margins = routed_reward(
                torch.stack([margins[i] for i in rows]), router.weights(user, dtype=torch.float64)
            )
            template.cv_folds = max(2, min(settings.residual_cv_folds, len(rows)))
            template.fit(user, user_margins, torch.stack(feature_deltas[user]))
        residuals = template._user_entries()
    store.replace_model(fingerprint, router._states, residuals, model.num_heads)
    return RebuildReport(
        users=len(router),
        comparisons=len(index),
        sequences_from_features=from_features,
        sequences_computed=num_computed,
        residual_users=len(residuals),
        seconds=time.perf_counter() - started,
        model_fingerprint=fingerprint,
    )


def _head_rewards(model, readings: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    reward_features, router_features = model.features_from_readings(readings)
    device = next(model.parameters()).device
    head_rewards = model.heads(reward_features.to(device, model.heads.weight.dtype)).double().cpu()
    return head_rewards, reward_features.double().cpu()


def _read_stored(feature_store, model, wanted: set[str], keep_features: set[str], progress: bool):
    """Head rewards (and reward features of `keep_features`) of the `wanted` keys found in the feature store."""
    heads, features = {}, {}
    if not wanted:
        return heads, features
    for path in tqdm(feature_store.segments(), desc="Stored features", unit="segment", disable=not progress):
        remaining = wanted - heads.keys()
        if not remaining:
            break
        try:
            keys, readings = feature_store._load_segment(path, remaining)
        except (OSError, ValueError, KeyError) as error:
            tqdm.write(f"Skipping damaged feature segment {path}: {error}")
            continue
        if not keys:
            continue
        head_rewards, reward_features = _head_rewards(model, readings)
        for row, key in enumerate(keys):
            heads[key] = head_rewards[row]
            if key in keep_features:
                features[key] = reward_features[row]
    return heads, features


def _compute_missing(store, model, encode, feature_store, row_ids, heads, features, residual_users, batch_size):
    """Run the backbone on the logged texts of `row_ids`; keep their readings; returns their keys and the count."""
    from ..feature_cache import sequence_key

    sequences, keys_of_row = [], {}
    for logged in store.comparisons():
        if logged.id not in row_ids:
            continue
        chosen = encode(logged.prompt, logged.chosen, logged.context)
        rejected = encode(logged.prompt, logged.rejected, logged.context)
        keys_of_row[logged.id] = (sequence_key(*chosen), sequence_key(*rejected))
        sequences += [chosen, rejected]
    distinct: dict[str, tuple] = {}
    for sequence in sequences:
        key = sequence_key(*sequence)
        if key not in heads:
            distinct.setdefault(key, sequence)
    keys = list(distinct)
    for start in range(0, len(keys), 4096):
        chunk = keys[start : start + 4096]
        readings = compute_sequence_readings(model, [distinct[key] for key in chunk], batch_size, desc="Rebuild")
        feature_store.add(chunk, {name: readings[name] for name in READINGS})
        head_rewards, reward_features = _head_rewards(model, readings)
        for row, key in enumerate(chunk):
            heads[key] = head_rewards[row]
            features[key] = reward_features[row]
    return keys_of_row, len(keys)


__all__ = ["RebuildReport", "rebuild_user_store"]
