"""
Moving a user store's state to and from the in-memory objects of Stage 2: an [`OnlineRouter`] and [`ResidualHeads`],
as the JSON files of `trl-micro users import` / `export` hold them. [`UserStore`] has these methods through
[`UserStoreTransfer`]; they go through the store's own reads and writes.
"""

from __future__ import annotations

import numpy as np
import torch
from sqlalchemy import select

from ..online_router import OnlineRouter
from ..residual_heads import ResidualHeads
from .schema import residuals_table


class UserStoreTransfer:
    """`UserStore`'s import from and export to an `OnlineRouter` and `ResidualHeads` (see the module docstring)."""

    def import_router(self, router: OnlineRouter, batch_size: int = 10_000) -> int:
        """
        Write every user of `router` (an in-memory or JSON-loaded [`OnlineRouter`]) into the store, replacing the state
        of users it already has; an empty store takes the router's settings. Returns the number of users written.
        """
        if not self._has_settings():
            from .user_store import StoreSettings  # user_store builds UserStore on this module

            self.initialize(
                StoreSettings(
                    num_heads=router.num_heads,
                    eta=router.eta,
                    forgetting=router.forgetting,
                    default_prior=None if router.default_prior is None else router.default_prior.tolist(),
                    model_fingerprint=router.model_fingerprint,
                )
            )
        settings = self.settings
        for name in ("num_heads", "eta", "forgetting", "model_fingerprint"):
            if getattr(settings, name) != getattr(router, name):
                raise ValueError(
                    f"Cannot import into the user store {self.display_url}: it has {name}={getattr(settings, name)!r}, "
                    f"the routing file {name}={getattr(router, name)!r}. Import into a new store."
                )
        states = router._states
        return self.write_states(states, batch_size)

    def import_residuals(self, residual_heads: ResidualHeads) -> int:
        """Write every residual of `residual_heads` into the store (its settings become the store's residual settings)."""
        settings = self.settings
        if residual_heads.model_fingerprint not in (None, settings.model_fingerprint):
            raise ValueError(
                f"The residual heads belong to model {residual_heads.model_fingerprint}, the user store "
                f"{self.display_url} to {settings.model_fingerprint}."
            )

        def write_settings(connection):
            for name, value in (
                ("residual_l2", residual_heads.l2),
                ("residual_l2_grid", list(residual_heads.l2_grid)),
                ("residual_cv_folds", residual_heads.cv_folds),
                ("residual_max_iter", residual_heads.max_iter),
            ):
                self._update_settings_or_insert(connection, name, value)

        self._retrying(write_settings)
        self._settings = None
        entries = residual_heads._user_entries()
        self.set_residuals(entries)
        return len(entries)

    def to_online_router(self, batch_size: int = 10_000) -> OnlineRouter:
        """Every user's routing as an in-memory [`OnlineRouter`] (for a JSON export; reads the whole store)."""
        router = self.settings.router()
        after = None
        while True:
            users = self.users(limit=batch_size, after=after)
            if not users:
                return router
            router._states.update(self._states(users))
            after = users[-1]

    def to_residual_heads(self, batch_size: int = 10_000) -> ResidualHeads | None:
        """Every user's residual head as a [`ResidualHeads`] (for a JSON export), or `None` when there is none."""
        settings = self.settings
        if settings.hidden_size is None:
            return None
        heads = self.residual_heads_template()
        last = None
        while True:
            query = select(residuals_table).order_by(residuals_table.c.user_id).limit(batch_size)
            if last is not None:
                query = query.where(residuals_table.c.user_id > last)
            with self._read() as connection:
                rows = connection.execute(query).mappings().all()
            if not rows:
                return heads
            for row in rows:
                heads._residuals[row["user_id"]] = torch.from_numpy(np.frombuffer(row["residual"], np.float64).copy())
                heads._chosen_l2[row["user_id"]] = row["l2"]
                heads._num_pairs[row["user_id"]] = row["num_pairs"]
            last = rows[-1]["user_id"]
