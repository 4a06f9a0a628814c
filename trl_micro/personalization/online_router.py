r"""
Online per-user routing (MiCRo Stage 2): a Hedge / Bayesian posterior over the K reward heads for every user id.

For a user c (a user, rater or criterion id), keep weights w(c) over the K heads, starting from a prior p(c) (the Stage-1 router's
softmax weights for that user's prompts, a default, or uniform). After each observed comparison (chosen, rejected), with
delta_k = r_k(chosen) - r_k(rejected) the margin of head k:

    w_k  <-  w_k * sigmoid(delta_k) ** eta / sum_j w_j * sigmoid(delta_j) ** eta

sigmoid(delta_k) is the Bradley-Terry likelihood of the observed label under head k, so eta = 1 is the exact posterior
over "which head is this user" with prior p; other eta are a learning rate (Hedge). With forgetting gamma in (0, 1],
before every update the weights decay toward the prior (for users whose taste drifts; gamma = 1 means none):

    log w  <-  gamma * log w + (1 - gamma) * log p

Everything is kept in log space (log w_k += eta * logsigmoid(delta_k), renormalized with logsumexp, in float64), which
is exact for extreme margins (+-1e4) and long histories. An update is O(K) and needs no backprop. N comparisons of
one user are applied in one step, from the unrolled recursion (constants vanish in the renormalization):

    log w_N  =  gamma^N log w_0 + (1 - gamma^N) log p + eta * sum_i gamma^(N-i) logsigmoid(delta_i)   (+ const)

The routed reward of user c is then the model's routed reward under w(c) (`trl_micro.modeling_micro.routed_reward`;
`MiCRoRewardModel(mixture_weights=)`).
[`OnlineRouter.save`] / [`OnlineRouter.load`] keep the weights between sessions in one JSON file, written atomically.

Several writers. Because of the unrolled recursion, the comparisons one writer applied to a user since it last synced
with the store (N of them, moving that user's log-weights from b to m, from prior p) can be replayed on top of
whatever the store holds for that user now (log-weights s, prior p_s), exactly, without the comparisons themselves:

    log w  =  m  +  gamma^N (s - b)  +  (1 - gamma^N) (p_s - p)         (+ const; with gamma = 1: m + s - b)

i.e. the store's state with this writer's evidence added. `save(path, merge=True)` does this for every user the writer
changed, under the store's lock (`trl_micro.personalization.json_files`), so concurrent writers lose no comparison, and the result is
the same as if each writer's comparisons had been applied in the order the writers took the lock.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..value_checks import ArrayLike, as_float64, is_integer, is_real_number, normalize_user_id
from .json_files import StoreReader, SyncedStore, check_mergeable, store_lock, write_store
from .user_keyed import UserKeyed

STORE_FORMAT = "trl-micro-online-router"
STORE_FORMAT_VERSION = 1
PRIOR_SUM_TOLERANCE = 1e-3
STORED_SUM_TOLERANCE = 1e-6  # stored log-weights are normalized to float64 precision; more is a damaged or edited file


@dataclass
class UserState:
    """Routing state of one user: normalized log-weights, normalized log-prior, number of comparisons applied."""

    log_weights: torch.Tensor  # (K,) float64, logsumexp == 0
    log_prior: torch.Tensor  # (K,) float64, logsumexp == 0
    num_updates: int = 0


class OnlineRouter(UserKeyed, SyncedStore):
    """
    Per-user weights over the K heads of a MiCRo reward model, updated online from observed comparisons. See the
    module docstring for the math.

    Args:
        num_heads (`int`):
            K, the number of reward heads.
        eta (`float`, defaults to 1.0):
            Learning rate; 1.0 is the exact Bayesian posterior.
        forgetting (`float`, defaults to 1.0):
            gamma in (0, 1]: before every update, log w <- gamma * log w + (1 - gamma) * log prior. 1.0 never forgets.
        default_prior (`(K,)`, *optional*):
            Prior of a user seen for the first time without a prior of its own. Uniform when unset.
        model_fingerprint (`str`, *optional*):
            Identifies the reward model whose heads the weights refer to (e.g. a checkpoint hash); saved with the store
            and checked by `load(expected_fingerprint=...)`.

    User ids are `str`; an `int` (Python or NumPy) is the same user as its decimal string (`17` and `"17"`); any other
    type is a `TypeError` (`trl_micro.value_checks.normalize_user_id`).

    Example (`merge=True`: one of several processes writing the store, see [`save`]):

    ```python
    router = OnlineRouter(num_heads=4)                            # or OnlineRouter.load("routing.json")
    deltas = out_chosen.head_rewards - out_rejected.head_rewards  # (N, K) for N comparisons of "alice"
    router.update("alice", deltas, prior=stage1_weights)          # prior only used the first time "alice" is seen
    reward = model(**batch, mixture_weights=router.weights("alice")).logits
    router.save("routing.json", merge=True)                       # adds these comparisons to the store as it is now
    ```
    """

    def __init__(
        self,
        num_heads: int,
        eta: float = 1.0,
        forgetting: float = 1.0,
        default_prior: ArrayLike | None = None,
        model_fingerprint: str | None = None,
    ):
        if not is_integer(num_heads) or num_heads < 1:
            raise ValueError(f"OnlineRouter.num_heads must be an integer >= 1, got {num_heads!r}.")
        if not is_real_number(eta) or not math.isfinite(eta) or eta <= 0:
            raise ValueError(f"OnlineRouter.eta must be a finite number > 0, got {eta!r}.")
        if not is_real_number(forgetting) or not 0 < forgetting <= 1:
            raise ValueError(f"OnlineRouter.forgetting must be a number in (0, 1], got {forgetting!r}.")
        if model_fingerprint is not None and not isinstance(model_fingerprint, str):
            raise ValueError(
                f"OnlineRouter.model_fingerprint must be a string or None, got {type(model_fingerprint).__name__}."
            )
        self.num_heads = int(num_heads)
        self.eta = float(eta)
        self.forgetting = float(forgetting)
        self.model_fingerprint = model_fingerprint
        if default_prior is None:
            self.default_prior = None
            self._default_log_prior = torch.full((self.num_heads,), -math.log(self.num_heads), dtype=torch.float64)
        else:
            self._default_log_prior = self._log_prior(default_prior, "default_prior")
            self.default_prior = self._default_log_prior.exp()
        self._states: dict[str, UserState] = {}
        # Users changed since the last load / save: their (log-weights, update count) at that time, or None for a user
        # reset here (a merge then replaces the stored user by this router's, or removes it).
        self._pending: dict[str, tuple[torch.Tensor, int] | None] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_heads={self.num_heads}, eta={self.eta}, forgetting={self.forgetting}, "
            f"users={len(self)}, model_fingerprint={self.model_fingerprint!r})"
        )

    # ------------------------------------------------------------------------------------------------------- users
    def _per_user(self) -> dict[str, UserState]:
        return self._states

    def num_updates(self, user_id: str | int) -> int:
        """Number of (informative) comparisons applied to `user_id`; 0 for an unknown user."""
        state = self._states.get(normalize_user_id(user_id))
        return 0 if state is None else state.num_updates

    def reset(self, user_id: str | int) -> None:
        """
        Forget `user_id`: its next update starts again from a prior. No error for an unknown user. A later
        `save(path, merge=True)` replaces the stored user by this router's (removes it, if not updated since).
        """
        user_id = normalize_user_id(user_id)
        self._states.pop(user_id, None)
        self._pending[user_id] = None

    def weights(
        self, user_id: str | int, prior: ArrayLike | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """
        Weights `(K,)` over the heads for `user_id`: its posterior if it has been updated, else `prior` (or
        `default_prior`, or uniform). An unknown user is not an error. `prior` is ignored for a known user.
        """
        state = self._states.get(normalize_user_id(user_id))
        if state is not None:
            return state.log_weights.exp().to(dtype)
        if prior is not None:
            return self._log_prior(prior, "prior").exp().to(dtype)
        return self._default_log_prior.exp().to(dtype)

    # ----------------------------------------------------------------------------------------------------- updates
    def update(self, user_id: str | int, head_deltas: ArrayLike, prior: ArrayLike | None = None) -> torch.Tensor:
        """
        Apply observed comparisons of `user_id` and return its new weights `(K,)`.

        Args:
            user_id (`str` or `int`):
                The user id.
            head_deltas (`(K,)` or `(N, K)`; tensor, array or list):
                r_k(chosen) - r_k(rejected) for one comparison, or for N comparisons applied in order (the same result
                as N single updates). A comparison whose deltas are all exactly 0 (identical responses) carries no
                information: it is skipped, not counted, and does not trigger forgetting.
            prior (`(K,)`, *optional*):
                Prior for a user seen for the first time, e.g. the Stage-1 router's softmax weights for its context
                (positive, summing to 1). Ignored for a known user. Defaults to `default_prior`, else uniform.
        """
        user_id = normalize_user_id(user_id)
        log_prior = None if prior is None else self._log_prior(prior, "prior")
        deltas = self._delta_matrix(head_deltas)
        self._apply([user_id] * deltas.shape[0], deltas, {} if log_prior is None else {user_id: log_prior})
        return self.weights(user_id, prior=prior)

    def update_many(
        self, user_ids: Sequence[str | int], head_deltas: ArrayLike, priors: ArrayLike | None = None
    ) -> None:
        """
        Apply a mixed batch in one vectorized step: row i of `head_deltas` `(N, K)` is a comparison of `user_ids[i]`;
        rows of one user are applied in their order, as by [`update`]. `priors` `(N, K)`, *optional*: row i is a prior
        for `user_ids[i]`, used if that user is new (its first row counts).
        """
        user_ids = [normalize_user_id(user_id, f"user_ids[{row}]") for row, user_id in enumerate(user_ids)]
        deltas = as_float64(head_deltas, "head_deltas")
        if deltas.shape != (len(user_ids), self.num_heads):
            raise ValueError(
                f"update_many: `head_deltas` must have shape (len(user_ids), num_heads) = "
                f"({len(user_ids)}, {self.num_heads}), got {tuple(deltas.shape)}."
            )
        deltas = self._delta_matrix(deltas)
        new_user_log_priors = {}
        if priors is not None:
            prior_rows = as_float64(priors, "priors")
            if prior_rows.shape != (len(user_ids), self.num_heads):
                raise ValueError(
                    f"update_many: `priors` must have shape (len(user_ids), num_heads) = "
                    f"({len(user_ids)}, {self.num_heads}), got {tuple(prior_rows.shape)}."
                )
            for row, user_id in enumerate(user_ids):
                if user_id not in self._states and user_id not in new_user_log_priors:
                    new_user_log_priors[user_id] = self._log_prior(prior_rows[row], f"priors[{row}]")
        self._apply(user_ids, deltas, new_user_log_priors)

    def _apply(self, user_ids: list[str], deltas: torch.Tensor, new_user_log_priors: dict[str, torch.Tensor]) -> None:
        """The update of the module docstring for rows `deltas` (N, K) of users `user_ids`, all users at once."""
        informative = deltas.ne(0).any(dim=1)
        if not bool(informative.all()):
            user_ids = [user_id for user_id, keep in zip(user_ids, informative.tolist()) if keep]
            deltas = deltas[informative]
        if not user_ids:
            return
        slot_of_user: dict[str, int] = {}
        slots = [slot_of_user.setdefault(user_id, len(slot_of_user)) for user_id in user_ids]
        counts = [0] * len(slot_of_user)
        for slot in slots:
            counts[slot] += 1

        evidence = self.eta * log_sigmoid(deltas)  # (N, K)
        evidence = evidence - evidence.amax(dim=1, keepdim=True)  # a constant per comparison: keeps magnitudes small
        if self.forgetting != 1.0:
            remaining = list(counts)
            ages = []  # number of later comparisons of the same user
            for slot in slots:
                remaining[slot] -= 1
                ages.append(remaining[slot])
            evidence = evidence * self.forgetting ** torch.tensor(ages, dtype=torch.float64)[:, None]
        total_evidence = torch.zeros(len(counts), self.num_heads, dtype=torch.float64)
        total_evidence.index_add_(0, torch.tensor(slots), evidence)

        states = []
        for user_id in slot_of_user:
            state = self._states.get(user_id)
            if state is None:
                log_prior = new_user_log_priors.get(user_id, self._default_log_prior)
                state = UserState(log_weights=log_prior, log_prior=log_prior)
            if user_id not in self._pending:
                self._pending[user_id] = (state.log_weights, state.num_updates)
            states.append(state)
        log_weights = torch.stack([state.log_weights for state in states])
        if self.forgetting != 1.0:
            kept = self.forgetting ** torch.tensor(counts, dtype=torch.float64)[:, None]
            log_priors = torch.stack([state.log_prior for state in states])
            log_weights = kept * log_weights + (1 - kept) * log_priors
        log_weights = log_weights + total_evidence
        log_weights = log_weights - torch.logsumexp(log_weights, dim=1, keepdim=True)
        for user_id, state, new_log_weights, count in zip(slot_of_user, states, log_weights.unbind(0), counts):
            state.log_weights = new_log_weights
            state.num_updates += count
            self._states[user_id] = state

    # -------------------------------------------------------------------------------------------------- validation
    def _delta_matrix(self, head_deltas: ArrayLike) -> torch.Tensor:
        deltas = as_float64(head_deltas, "head_deltas")
        if deltas.dim() == 1:
            deltas = deltas[None, :]
        if deltas.dim() != 2 or deltas.shape[1] != self.num_heads:
            raise ValueError(
                f"`head_deltas` must have shape (num_heads,) = ({self.num_heads},) or (N, num_heads) = "
                f"(N, {self.num_heads}), got {tuple(deltas.shape)}."
            )
        finite = torch.isfinite(deltas)
        if not bool(finite.all()):
            row = int((~finite).any(dim=1).nonzero()[0])
            raise ValueError(f"`head_deltas` must be finite; comparison {row} has {deltas[row].tolist()}.")
        return deltas

    def _log_prior(self, prior: ArrayLike, name: str) -> torch.Tensor:
        """Validate a prior (K,) and return its normalized log (float64)."""
        prior = as_float64(prior, name)
        if prior.shape != (self.num_heads,):
            raise ValueError(f"`{name}` must have shape (num_heads,) = ({self.num_heads},), got {tuple(prior.shape)}.")
        if not bool(torch.isfinite(prior).all()) or not bool((prior > 0).all()):
            raise ValueError(f"`{name}` must be finite and strictly positive, got {prior.tolist()}.")
        total = float(prior.sum())
        if abs(total - 1.0) > PRIOR_SUM_TOLERANCE:
            raise ValueError(
                f"`{name}` must sum to 1 (softmax probabilities in float32, not logits), got a sum of {total}."
            )
        return prior.log() - math.log(total)

    # ------------------------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, merge: bool = False) -> None:
        """
        Write the router to the JSON file `path`, atomically and under the store's lock (`trl_micro.personalization.json_files`: a
        crash leaves the previous store intact).

        Args:
            path: the store.
            merge (`bool`, defaults to `False`):
                `False`: the store becomes this router (one writer per store); refused, naming `merge=True`, when
                another writer changed the store since this router loaded or last saved it. `True`: the comparisons this router
                applied since it was loaded or last saved are added to the store as it is now, users it did not touch
                keep what the store holds, and this router then holds the merged store: every writer of a shared
                store saves this way. The store must have the same `num_heads`, `eta`, `forgetting` and
                `model_fingerprint`; a missing store is created.
        """
        with store_lock(path):
            if not merge:
                self._refuse_dropping_changes(path, "routing store")
            states = self._merged_states(path) if merge and os.path.exists(path) else self._states
            digest = write_store(
                path,
                {
                    "format": STORE_FORMAT,
                    "format_version": STORE_FORMAT_VERSION,
                    "num_heads": self.num_heads,
                    "eta": self.eta,
                    "forgetting": self.forgetting,
                    "default_prior": None if self.default_prior is None else self.default_prior.tolist(),
                    "model_fingerprint": self.model_fingerprint,
                    "users": {
                        user_id: {
                            "log_weights": state.log_weights.tolist(),
                            "log_prior": state.log_prior.tolist(),
                            "num_updates": state.num_updates,
                        }
                        for user_id, state in states.items()
                    },
                },
            )
        self._states, self._pending = dict(states), {}
        self._remember_store(path, digest)

    def _merged_states(self, path: str | os.PathLike) -> dict[str, UserState]:
        """The store at `path` with this router's pending changes replayed on it (module docstring)."""
        stored = OnlineRouter.load(path)
        check_mergeable("routing store", path, stored, self, ("num_heads", "eta", "forgetting", "model_fingerprint"))
        states = dict(stored._states)
        for user_id, base in self._pending.items():
            mine, theirs = self._states.get(user_id), states.get(user_id)
            if base is None or theirs is None:  # reset here, or new to the store: this router's state
                if mine is None:
                    states.pop(user_id, None)
                else:
                    states[user_id] = mine
                continue
            base_log_weights, base_count = base
            count = mine.num_updates - base_count
            kept = self.forgetting**count
            log_weights = (
                mine.log_weights
                + kept * (theirs.log_weights - base_log_weights)
                + (1 - kept) * (theirs.log_prior - mine.log_prior)
            )
            log_weights = log_weights - torch.logsumexp(log_weights, dim=0)
            states[user_id] = UserState(log_weights, theirs.log_prior, theirs.num_updates + count)
        return states

    @classmethod
    def load(
        cls, path: str | os.PathLike, expected_num_heads: int | None = None, expected_fingerprint: str | None = None
    ) -> OnlineRouter:
        """
        Read a router written by [`save`]. Raises `ValueError` if the file is corrupt or truncated (no partial router
        is ever returned), or if its `num_heads` / `model_fingerprint` differ from `expected_num_heads` /
        `expected_fingerprint` (when given).
        """
        store = StoreReader(path, "routing store", STORE_FORMAT, STORE_FORMAT_VERSION)
        num_heads = store.check("num_heads", expected_num_heads, "a store of another reward model?")
        fingerprint = store.check("model_fingerprint", expected_fingerprint, "a store of another reward model?")
        try:
            router = cls(
                num_heads=num_heads,
                eta=store.payload["eta"],
                forgetting=store.payload["forgetting"],
                default_prior=store.payload["default_prior"],
                model_fingerprint=fingerprint,
            )
            router._states = _read_states(store.payload["users"], router.num_heads)
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise store.corrupt(err) from err
        router._remember_store(path, store.digest)
        return router


# ------------------------------------------------------------------------------------------------------------ helpers
def log_sigmoid(values: torch.Tensor) -> torch.Tensor:
    """
    log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), exact for any finite x. Plain elementwise ops: unlike
    `F.logsigmoid`, whose CPU kernel starts intra-op threads even for K numbers, they stay cheap for tiny tensors.
    """
    return values.clamp(max=0) - torch.log1p(torch.exp(-values.abs()))


def _read_states(users: Any, num_heads: int) -> dict[str, UserState]:
    """Parse and check the `users` section of a store in a few vectorized steps (fast for many users)."""
    if not isinstance(users, dict):
        raise ValueError("`users` is not a mapping")
    entries = list(users.values())
    shape = (len(entries), num_heads)
    log_weights = np.array([entry["log_weights"] for entry in entries], dtype=np.float64).reshape(-1, num_heads)
    log_prior = np.array([entry["log_prior"] for entry in entries], dtype=np.float64).reshape(-1, num_heads)
    counts = [entry["num_updates"] for entry in entries]
    if log_weights.shape != shape or log_prior.shape != shape:
        raise ValueError(f"user weights must have {num_heads} entries each")
    if not (np.isfinite(log_weights).all() and np.isfinite(log_prior).all()):
        raise ValueError("some user weights are not finite")
    for name, values in (("log_weights", log_weights), ("log_prior", log_prior)):
        log_sums = torch.logsumexp(torch.from_numpy(values), dim=1)
        unnormalized = (log_sums.abs() > STORED_SUM_TOLERANCE).nonzero()
        if len(unnormalized):
            row = int(unnormalized[0])
            raise ValueError(
                f"the {name} of user {list(users)[row]!r} are not normalized: their exponentials sum to "
                f"{math.exp(float(log_sums[row])):.6g}, not 1 (a damaged or hand-edited file)"
            )
    if not all(type(count) is int and count >= 0 for count in counts):
        raise ValueError("some user counts are not non-negative integers")
    rows = zip(torch.from_numpy(log_weights).unbind(0), torch.from_numpy(log_prior).unbind(0), counts)
    return {
        user_id: UserState(log_weights=weights, log_prior=prior, num_updates=count)
        for user_id, (weights, prior, count) in zip(users, rows)
    }


def __getattr__(name: str):
    if name == "ContextState":  # deprecated name, removed in the next release
        warnings.warn("`ContextState` is now `UserState` (it holds one user's routing).", FutureWarning, stacklevel=2)
        return UserState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["OnlineRouter", "UserState"]
