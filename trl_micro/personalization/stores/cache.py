"""
What a scorer reads from a user store: each user's weights over the heads and residual head, through a bounded cache
whose entries are at most `max_staleness_s` old.

Several replicas share one store; each reads a user from the store when its cached entry is older than
`max_staleness_s` (users the store does not know are cached too, as unknown), so a comparison acknowledged by one
replica routes every other replica's scoring at most `max_staleness_s` (plus one read) later. A replica that wrote a
user itself drops that user's entry at once. At most `max_users` users are cached (least recently used dropped), so
memory does not grow with the store.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch

from .user_store import UserStore


class CachedUserStore:
    """
    Reads of `store` for scoring (see the module docstring).

    Args:
        store ([`UserStore`]): the store.
        max_staleness_s (`float`, defaults to 0.5): the oldest a cached user may be when it is used, in seconds;
            0 reads every user at every call.
        max_users (`int`, defaults to 100,000): users kept in the cache at most.
    """

    def __init__(self, store: UserStore, max_staleness_s: float = 0.5, max_users: int = 100_000):
        if not max_staleness_s >= 0:
            raise ValueError(f"`max_staleness_s` must be >= 0 seconds, got {max_staleness_s!r}.")
        if max_users < 1:
            raise ValueError(f"`max_users` must be >= 1, got {max_users!r}.")
        self.store = store
        self.num_heads = store.settings.num_heads
        self.max_staleness_s = float(max_staleness_s)
        self.max_users = int(max_users)
        self._entries: OrderedDict[str, tuple[float, torch.Tensor | None, torch.Tensor | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._has_residuals = store.settings.hidden_size is not None
        self._residuals_checked_at = time.monotonic()

    def __repr__(self) -> str:
        return f"CachedUserStore({self.store.display_url!r}, max_staleness_s={self.max_staleness_s})"

    def lookup(self, user_ids: Sequence[str | None]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """`({user: weights (K,)}, {user: residual (hidden,)})` of the known users among `user_ids` (`None` skipped)."""
        wanted = {user for user in user_ids if user is not None}
        now = time.monotonic()
        weights, residuals, stale = {}, {}, []
        with self._lock:
            for user in wanted:
                entry = self._entries.get(user)
                if entry is None or now - entry[0] > self.max_staleness_s:
                    stale.append(user)
                    continue
                self._entries.move_to_end(user)
                if entry[1] is not None:
                    weights[user] = entry[1]
                if entry[2] is not None:
                    residuals[user] = entry[2]
        if stale:
            fetched_at = time.monotonic()
            fresh_weights = self.store.weights(stale)
            fresh_residuals = self.store.residuals(stale) if self._residuals_possible() else {}
            weights.update(fresh_weights)
            residuals.update(fresh_residuals)
            with self._lock:
                for user in stale:
                    self._entries[user] = (fetched_at, fresh_weights.get(user), fresh_residuals.get(user))
                    self._entries.move_to_end(user)
                while len(self._entries) > self.max_users:
                    self._entries.popitem(last=False)
        return weights, residuals

    def _residuals_possible(self) -> bool:
        """Whether the store may hold residual heads (it has their `hidden_size` once the first is written); a store
        without them is asked again at most once per `max_staleness_s`, not at every read."""
        now = time.monotonic()
        if not self._has_residuals and now - self._residuals_checked_at > self.max_staleness_s:
            self.store._settings = None  # another process may have written the first residual since
            self._has_residuals = self.store.settings.hidden_size is not None
            self._residuals_checked_at = now
        return self._has_residuals

    def invalidate(self, user_ids: Sequence[str]) -> None:
        """Forget the cached entries of `user_ids` (this process just wrote them)."""
        with self._lock:
            for user in user_ids:
                self._entries.pop(user, None)

    def __len__(self) -> int:
        return len(self._entries)
