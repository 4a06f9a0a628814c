r"""
Per-user residual heads (Stage 2 beyond routing): a correction to the routed reward, fitted from a user's few
labelled pairs.

Routing, by the Stage-1 router, `RouterAdaptationTrainer` or an [`OnlineRouter`], can only mix the K heads. A user
whose taste no mixture of them matches keeps the gap. A residual head adds a linear correction on the backbone's reward
features h(x, y) (the same features the heads read):

    r(x, y | c)  =  r_w(c)(x, y)  +  u_c . h(x, y)

with r_w(c) the routed reward under c's weights w(c) (`trl_micro.modeling_micro.routed_reward`). For the N labelled
pairs i of user c, with routed margin m_i = r_w(c)(x_i, y_i^+) - r_w(c)(x_i, y_i^-) and
feature difference d_i = h(x_i, y_i^+) - h(x_i, y_i^-), u_c is the maximum a posteriori estimate under the
Bradley-Terry likelihood and a Gaussian prior centred on no correction:

    u_c  =  argmin_u   sum_i softplus(-(m_i + u . d_i))  +  lambda ||u||^2

a convex problem, solved in float64 by L-BFGS. lambda sets how far a handful of pairs may move the reward away from the
routed one. Left unset, it is chosen per user from `l2_grid` by `cv_folds`-fold cross-validation on the user's own
pairs (held-out Bradley-Terry negative log-likelihood): the scale of h differs between backbones, so no single value
suits them all. With lambda -> infinity, u_c -> 0 and the reward is the routed one.

[`ResidualHeads.save`] / [`ResidualHeads.load`] keep the residuals in one JSON file, written atomically; several
processes can update one file with `save(path, merge=True)` (a user's residual is a fit on all its pairs, so merging
replaces the stored residuals of the users this object fitted and keeps the others).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Sequence

import numpy as np
import torch

from ..value_checks import ArrayLike, as_float64, is_integer, is_real_number, normalize_user_id
from .json_files import StoreReader, SyncedStore, check_mergeable, store_lock, write_store
from .user_keyed import UserKeyed

STORE_FORMAT = "trl-micro-residual-heads"
STORE_FORMAT_VERSION = 1
DEFAULT_L2_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


class ResidualHeads(UserKeyed, SyncedStore):
    """
    One residual head u_c per user id, added to the routed reward; see the module docstring for the math.

    Args:
        hidden_size (`int`):
            Size of the backbone's reward features h(x, y) (`model.config.reward_feature_size`).
        l2 (`float`, *optional*):
            lambda, the same for every user. Unset: chosen per user by cross-validation over `l2_grid`.
        l2_grid (`Sequence[float]`, defaults to 0.1, 0.3, ..., 1000):
            The lambdas cross-validation chooses from.
        cv_folds (`int`, defaults to 4):
            Folds of the cross-validation; a user needs at least this many pairs when `l2` is unset.
        max_iter (`int`, defaults to 200):
            L-BFGS iterations per fit.
        model_fingerprint (`str`, *optional*):
            Identifies the reward model the residuals belong to; saved and checked by `load(expected_fingerprint=...)`.

    User ids follow the rule of [`OnlineRouter`]: a `str`, or an `int` read as its decimal string.

    Example:

    ```python
    from trl_micro.modeling_micro import routed_reward

    out_chosen, out_rejected = model(**chosen_batch), model(**rejected_batch)     # N labelled pairs of "alice"
    weights = online_router.weights("alice")
    margins = routed_reward(out_chosen.head_rewards - out_rejected.head_rewards, weights)
    residuals = ResidualHeads(hidden_size=model.config.reward_feature_size)
    residuals.fit("alice", margins, out_chosen.reward_features - out_rejected.reward_features)
    reward = model(**batch, mixture_weights=weights).logits.squeeze(-1) + residuals.rewards(["alice"] * n, features)
    ```
    """

    def __init__(
        self,
        hidden_size: int,
        l2: float | None = None,
        l2_grid: Sequence[float] = DEFAULT_L2_GRID,
        cv_folds: int = 4,
        max_iter: int = 200,
        model_fingerprint: str | None = None,
    ):
        if not is_integer(hidden_size) or hidden_size < 1:
            raise ValueError(f"ResidualHeads.hidden_size must be an integer >= 1, got {hidden_size!r}.")
        if l2 is not None and not _is_positive(l2):
            raise ValueError(f"ResidualHeads.l2 must be a finite number > 0 or None (cross-validated), got {l2!r}.")
        grid = tuple(l2_grid)
        if not grid or not all(_is_positive(value) for value in grid):
            raise ValueError(f"ResidualHeads.l2_grid must be a non-empty list of finite numbers > 0, got {l2_grid!r}.")
        if not is_integer(cv_folds) or cv_folds < 2:
            raise ValueError(f"ResidualHeads.cv_folds must be an integer >= 2, got {cv_folds!r}.")
        if not is_integer(max_iter) or max_iter < 1:
            raise ValueError(f"ResidualHeads.max_iter must be an integer >= 1, got {max_iter!r}.")
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise ValueError(
                f"ResidualHeads.model_fingerprint must be a string or None, got {type(model_fingerprint).__name__}."
            )
        self.hidden_size = int(hidden_size)
        self.l2 = None if l2 is None else float(l2)
        self.l2_grid = tuple(float(value) for value in grid)
        self.cv_folds = int(cv_folds)
        self.max_iter = int(max_iter)
        self.model_fingerprint = model_fingerprint
        self._residuals: dict[str, torch.Tensor] = {}
        self._chosen_l2: dict[str, float] = {}
        self._num_pairs: dict[str, int] = {}
        self._pending: set[str] = set()  # users fitted since the last load / save

    def __repr__(self) -> str:
        l2 = "cross-validated" if self.l2 is None else self.l2
        return f"{type(self).__name__}(hidden_size={self.hidden_size}, l2={l2}, users={len(self)})"

    def _per_user(self) -> dict[str, torch.Tensor]:
        return self._residuals

    def residual(self, user_id: str | int) -> torch.Tensor:
        """u_c `(hidden_size,)` of `user_id`, float64. A user without a fitted residual is a `KeyError`."""
        user_id = normalize_user_id(user_id)
        if user_id not in self._residuals:
            raise KeyError(f"No residual head for user {user_id!r}: fit one with `ResidualHeads.fit` first.")
        return self._residuals[user_id].clone()

    def l2_of(self, user_id: str | int) -> float:
        """The lambda `user_id`'s residual was fitted with (chosen by cross-validation when `l2` is unset)."""
        self.residual(user_id)  # same checks and error
        return self._chosen_l2[normalize_user_id(user_id)]

    def num_pairs(self, user_id: str | int) -> int:
        self.residual(user_id)
        return self._num_pairs[normalize_user_id(user_id)]

    # ------------------------------------------------------------------------------------------------------ fitting
    def fit(self, user_id: str | int, routed_margins: ArrayLike, feature_deltas: ArrayLike) -> torch.Tensor:
        """
        Fit (or refit, from all its pairs) the residual of `user_id` and return it `(hidden_size,)`.

        Args:
            user_id (`str` or `int`): the user id.
            routed_margins (`(N,)`): m_i, the routed reward's margin (chosen minus rejected) of each labelled pair.
            feature_deltas (`(N, hidden_size)`): d_i, the reward features of the chosen minus those of the rejected.
        """
        user_id = normalize_user_id(user_id)
        margins, deltas = self._check_pairs(routed_margins, feature_deltas)
        l2 = self.l2 if self.l2 is not None else self._cross_validated_l2(user_id, margins, deltas)
        self._residuals[user_id] = _map_residual(margins, deltas, l2, self.max_iter)
        self._chosen_l2[user_id] = l2
        self._num_pairs[user_id] = int(margins.shape[0])
        self._pending.add(user_id)
        return self._residuals[user_id].clone()

    def fit_many(self, user_ids: Sequence[str | int], routed_margins: ArrayLike, feature_deltas: ArrayLike) -> None:
        """`fit` every user of `user_ids` (one per row of `routed_margins` (N,) and `feature_deltas` (N, hidden))."""
        margins, deltas = self._check_pairs(routed_margins, feature_deltas)
        if len(user_ids) != margins.shape[0]:
            raise ValueError(f"{len(user_ids)} user ids for {margins.shape[0]} labelled pairs.")
        # Every id is checked before any fit: a bad id changes nothing.
        user_ids = [normalize_user_id(user_id, f"user_ids[{row}]") for row, user_id in enumerate(user_ids)]
        for user_id in dict.fromkeys(user_ids):
            rows = [row for row, other in enumerate(user_ids) if other == user_id]
            self.fit(user_id, margins[rows], deltas[rows])

    def _check_pairs(self, routed_margins: ArrayLike, feature_deltas: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
        margins = as_float64(routed_margins, "routed_margins")
        deltas = as_float64(feature_deltas, "feature_deltas")
        if margins.dim() != 1 or margins.shape[0] == 0:
            raise ValueError(f"`routed_margins` must have shape (N,) with N >= 1, got {tuple(margins.shape)}.")
        if deltas.shape != (margins.shape[0], self.hidden_size):
            raise ValueError(
                f"`feature_deltas` must have shape (N, hidden_size) = ({margins.shape[0]}, {self.hidden_size}), got "
                f"{tuple(deltas.shape)}."
            )
        if not (torch.isfinite(margins).all() and torch.isfinite(deltas).all()):
            raise ValueError("`routed_margins` and `feature_deltas` must be finite.")
        return margins, deltas

    def _cross_validated_l2(self, user_id: str, margins: torch.Tensor, deltas: torch.Tensor) -> float:
        num_pairs = margins.shape[0]
        if num_pairs < self.cv_folds:
            raise ValueError(
                f"User {user_id!r} has {num_pairs} labelled pairs, fewer than cv_folds={self.cv_folds}: "
                "cross-validation cannot choose lambda. Pass more pairs, a smaller `cv_folds`, or a fixed `l2`."
            )
        # Deterministic folds from the user id, so a refit on the same pairs gives the same residual.
        seed = zlib.crc32(user_id.encode("utf-8"))
        order = torch.randperm(num_pairs, generator=torch.Generator().manual_seed(seed))
        folds = [order[fold :: self.cv_folds] for fold in range(self.cv_folds)]
        losses = []
        for l2 in self.l2_grid:
            loss = 0.0
            for held_out in folds:
                kept = torch.ones(num_pairs, dtype=torch.bool)
                kept[held_out] = False
                residual = _map_residual(margins[kept], deltas[kept], l2, self.max_iter)
                loss += float(_bt_nll(margins[held_out], deltas[held_out], residual))
            losses.append(loss)
        return self.l2_grid[int(np.argmin(losses))]

    # ------------------------------------------------------------------------------------------------------ scoring
    def rewards(self, user_ids: Sequence[str | int | None], reward_features: ArrayLike) -> torch.Tensor:
        """
        u_c . h(x, y) `(N,)` of rows with reward features `(N, hidden_size)`, float32 on the features' device; 0 for a
        row whose user (`None`, or not fitted) has no residual.
        """
        user_ids = [
            None if user_id is None else normalize_user_id(user_id, f"user_ids[{row}]")
            for row, user_id in enumerate(user_ids)
        ]
        features = torch.as_tensor(reward_features)
        if features.dim() != 2 or features.shape != (len(user_ids), self.hidden_size):
            raise ValueError(
                f"`reward_features` must have shape (len(user_ids), hidden_size) = ({len(user_ids)}, "
                f"{self.hidden_size}), got {tuple(features.shape)}."
            )
        residuals = torch.zeros(len(user_ids), self.hidden_size, dtype=torch.float64)
        for row, user_id in enumerate(user_ids):
            if user_id is not None and user_id in self._residuals:
                residuals[row] = self._residuals[user_id]
        return (features.double() * residuals.to(features.device)).sum(dim=-1).float()

    # -------------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, merge: bool = False) -> None:
        """
        Write the residuals to the JSON file `path`, atomically and under the store's lock (a crash leaves the previous
        file intact).

        Args:
            path: the store.
            merge (`bool`, defaults to `False`):
                `False`: the store becomes this object (one writer per store); refused, naming `merge=True`, when
                another writer changed the store since this object loaded or last saved it. `True`: the residuals this object fitted
                since it was loaded or last saved replace those of the store as it is now, the store's other users are
                kept, and this object then holds the merged store: every writer of a shared store saves this way. The
                store must have the same `hidden_size` and `model_fingerprint`; a missing store is created.
        """
        with store_lock(path):
            if not merge:
                self._refuse_dropping_changes(path, "residual-head store")
            users = self._merged_users(path) if merge and os.path.exists(path) else self._user_entries()
            digest = write_store(
                path,
                {
                    "format": STORE_FORMAT,
                    "format_version": STORE_FORMAT_VERSION,
                    "hidden_size": self.hidden_size,
                    "l2": self.l2,
                    "l2_grid": list(self.l2_grid),
                    "cv_folds": self.cv_folds,
                    "max_iter": self.max_iter,
                    "model_fingerprint": self.model_fingerprint,
                    "users": {
                        user_id: {"residual": residual.tolist(), "l2": l2, "num_pairs": num_pairs}
                        for user_id, (residual, l2, num_pairs) in users.items()
                    },
                },
            )
        self._residuals = {user_id: entry[0] for user_id, entry in users.items()}
        self._chosen_l2 = {user_id: entry[1] for user_id, entry in users.items()}
        self._num_pairs = {user_id: entry[2] for user_id, entry in users.items()}
        self._pending = set()
        self._remember_store(path, digest)

    def _user_entries(self, user_ids=None) -> dict[str, tuple[torch.Tensor, float, int]]:
        """`{user: (residual, l2, num_pairs)}` of `user_ids` (default: every user), as a store holds them."""
        entries = {}
        for user_id in self._residuals if user_ids is None else user_ids:
            entries[user_id] = (self._residuals[user_id], self._chosen_l2[user_id], self._num_pairs[user_id])
        return entries

    def _merged_users(self, path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, float, int]]:
        """The store at `path` with the residuals fitted here since the last load / save in place of its own."""
        stored = ResidualHeads.load(path)
        check_mergeable("residual-head store", path, stored, self, ("hidden_size", "model_fingerprint"))
        return {**stored._user_entries(), **self._user_entries(self._pending)}

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        expected_hidden_size: int | None = None,
        expected_fingerprint: str | None = None,
    ) -> ResidualHeads:
        """
        Read residuals written by [`save`]. Raises `ValueError` if the file is corrupt or truncated (nothing partial is
        ever returned), or if its `hidden_size` / `model_fingerprint` differ from `expected_hidden_size` /
        `expected_fingerprint` (when given).
        """
        store = StoreReader(path, "residual-head store", STORE_FORMAT, STORE_FORMAT_VERSION)
        hidden_size = store.check("hidden_size", expected_hidden_size, "residuals of another backbone?")
        fingerprint = store.check("model_fingerprint", expected_fingerprint, "residuals of another reward model?")
        payload = store.payload
        try:
            heads = cls(
                hidden_size=hidden_size,
                l2=payload["l2"],
                l2_grid=payload["l2_grid"],
                cv_folds=payload["cv_folds"],
                max_iter=payload["max_iter"],
                model_fingerprint=fingerprint,
            )
            for user_id, entry in payload["users"].items():
                residual = torch.tensor(entry["residual"], dtype=torch.float64)
                if residual.shape != (heads.hidden_size,) or not torch.isfinite(residual).all():
                    raise ValueError(f"the residual of user {user_id!r} is not {heads.hidden_size} finite numbers")
                if not _is_positive(entry["l2"]) or type(entry["num_pairs"]) is not int or entry["num_pairs"] < 1:
                    raise ValueError(f"user {user_id!r} has an invalid l2 or num_pairs")
                heads._residuals[user_id] = residual
                heads._chosen_l2[user_id] = float(entry["l2"])
                heads._num_pairs[user_id] = entry["num_pairs"]
        except (AttributeError, KeyError, TypeError, ValueError, RuntimeError) as err:
            raise store.corrupt(err) from err
        heads._remember_store(path, store.digest)
        return heads


# ------------------------------------------------------------------------------------------------------------ helpers
def _is_positive(value) -> bool:
    return is_real_number(value) and math.isfinite(value) and value > 0


def _bt_nll(margins: torch.Tensor, deltas: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """sum_i softplus(-(m_i + u . d_i)): the Bradley-Terry negative log-likelihood of the corrected margins."""
    return torch.nn.functional.softplus(-(margins + deltas @ residual)).sum()


def _map_residual(margins: torch.Tensor, deltas: torch.Tensor, l2: float, max_iter: int) -> torch.Tensor:
    """argmin_u _bt_nll(u) + l2 ||u||^2 (module docstring), by L-BFGS from u = 0, float64."""
    residual = torch.zeros(deltas.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [residual], max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )

    def objective():
        optimizer.zero_grad()
        loss = _bt_nll(margins, deltas, residual) + l2 * residual.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return residual.detach()


__all__ = ["DEFAULT_L2_GRID", "ResidualHeads"]
