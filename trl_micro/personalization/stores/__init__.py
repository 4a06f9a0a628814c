"""
Where per-user Stage 2 state lives: a database chosen by URL ([`UserStore`], [`open_user_store`]: SQLite embedded,
PostgreSQL for several hosts), read for scoring through a bounded, time-limited cache ([`CachedUserStore`]); the
JSON files (`trl_micro.personalization.json_files`) are its import / export format.
"""

from .cache import CachedUserStore
from .user_store import (
    Comparison,
    LoggedComparison,
    RecordedComparison,
    StoreSettings,
    UserStore,
    database_url,
    open_user_store,
)

__all__ = [
    "CachedUserStore",
    "Comparison",
    "LoggedComparison",
    "RecordedComparison",
    "StoreSettings",
    "UserStore",
    "database_url",
    "open_user_store",
]
