"""
The tables of a user store (SQLAlchemy Core), the same on SQLite and PostgreSQL.

- `trl_micro_settings`: one row per setting (JSON values): the store's format version, `num_heads`, `eta`,
  `forgetting`, `default_prior`, `model_fingerprint` (the heads the weights refer to), `hidden_size` and the residual
  heads' settings.
- `trl_micro_users`: one row per user: `num_updates` (informative comparisons applied), `version` (bumped by every
  write of the user, what caches compare), `updated_at`.
- `trl_micro_user_heads`: K rows per user, `(user_id, head)`: the unnormalized log-weight and the normalized log-prior
  of each head. The weights are softmax(log_weight) over the user's rows: a posterior update adds each head's evidence
  to its row in one `UPDATE` (`log_weight = log_weight + CASE head ...`), no read needed.
- `trl_micro_residuals`: one row per user with a residual head: u_c as float64 bytes, its lambda and pair count.
- `trl_micro_comparisons`: the feedback log, one row per comparison, written in the transaction that applies it:
  the texts (JSON: a string or a list of messages), the model fingerprint and per-head margins it was applied with,
  an optional client `comparison_id` (unique: a retry is applied once), the user's `num_updates` after it (the
  answer a retry gets again), and the feature-store keys of its two sequences (a rebuild on the same frozen backbone
  reads their features instead of running it).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 1

metadata = MetaData()

settings_table = Table(
    "trl_micro_settings",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

users_table = Table(
    "trl_micro_users",
    metadata,
    Column("user_id", String, primary_key=True),
    Column("num_updates", BigInteger, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("updated_at", Double, nullable=False),
)

user_heads_table = Table(
    "trl_micro_user_heads",
    metadata,
    Column("user_id", String, primary_key=True),
    Column("head", Integer, primary_key=True),
    Column("log_weight", Double, nullable=False),
    Column("log_prior", Double, nullable=False),
)

residuals_table = Table(
    "trl_micro_residuals",
    metadata,
    Column("user_id", String, primary_key=True),
    Column("residual", LargeBinary, nullable=False),
    Column("l2", Double, nullable=False),
    Column("num_pairs", Integer, nullable=False),
)

comparisons_table = Table(
    "trl_micro_comparisons",
    metadata,
    # SQLite makes an INTEGER PRIMARY KEY the rowid (autoincrementing); BIGINT elsewhere.
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("comparison_id", String, unique=True, nullable=True),
    Column("user_id", String, nullable=False),
    Column("prompt", Text, nullable=False),
    Column("chosen", Text, nullable=False),
    Column("rejected", Text, nullable=False),
    Column("context", Text, nullable=True),
    Column("created_at", Double, nullable=False),
    Column("model_fingerprint", String, nullable=True),
    Column("head_margins", Text, nullable=False),
    Column("applied", Boolean, nullable=False),
    Column("num_updates", BigInteger, nullable=False),
    Column("chosen_key", String, nullable=True),
    Column("rejected_key", String, nullable=True),
    Column("feature_backbone", String, nullable=True),
    Index("ix_trl_micro_comparisons_user", "user_id", "id"),
)
