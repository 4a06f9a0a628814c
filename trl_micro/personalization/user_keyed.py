"""The container protocol shared by the per-user states (`OnlineRouter`, `ResidualHeads`): membership, size, ids."""

from __future__ import annotations

from ..value_checks import normalize_user_id


class UserKeyed:
    """
    `user in state`, `len(state)` and `state.users()` over the dict `_per_user()` returns (user id -> that user's
    entry). Ids follow the one user-id rule (`normalize_user_id`): `None` (no user) is never in a state, an `int` is
    its decimal string, another type is a `TypeError`.
    """

    def _per_user(self) -> dict:
        raise NotImplementedError

    def __contains__(self, user_id: object) -> bool:
        """Whether `user_id` has an entry here (a posterior, a residual)."""
        return user_id is not None and normalize_user_id(user_id) in self._per_user()

    def __len__(self) -> int:
        return len(self._per_user())

    def users(self) -> list[str]:
        """Ids of the users with an entry, in the order they were first added."""
        return list(self._per_user())
