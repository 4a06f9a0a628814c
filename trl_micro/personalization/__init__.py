"""
Stage 2: adapting a MiCRo reward model to each user from a few comparisons.

- `online_router`: a posterior over the K heads per user, updated online ([`OnlineRouter`]).
- `residual_heads`: a per-user linear correction beyond the mixture ([`ResidualHeads`]).
- `adaptation`: both from a few labelled pairs per user in one call ([`adapt_to_users`]).
- `query_selection`: which pairs to ask a user to label.
- `json_files`: the JSON files of the two (an import / export format of the stores).
- `stores`: where the per-user state and the log of every comparison live ([`UserStore`], by URL).
- `rebuild`: every user's routing rebuilt from the log for new heads.

One vocabulary: a "user" is an id whose taste is tracked (a user, a rater, a criterion); a "context" is text joined to
a prompt (a user description, a persona), read by the model's router.
"""

from .adaptation import UserAdaptation, adapt_to_users
from .online_router import OnlineRouter, UserState
from .residual_heads import ResidualHeads
from .stores import CachedUserStore, Comparison, UserStore, open_user_store

__all__ = [
    "CachedUserStore",
    "Comparison",
    "OnlineRouter",
    "ResidualHeads",
    "UserAdaptation",
    "UserState",
    "UserStore",
    "adapt_to_users",
    "open_user_store",
]
