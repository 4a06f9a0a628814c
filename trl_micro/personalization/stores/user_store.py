r"""
Per-user Stage 2 state in a database: online routing, residual heads and the log of every comparison, one row per
user, chosen by URL.

- `sqlite:///path/users.db`, the embedded default: one file, WAL (readers never wait for the writer), every write a
  `BEGIN IMMEDIATE` transaction committed with `synchronous=FULL` (durable once acknowledged); several processes on
  one host share it.
- `postgresql://user@host:port/db` (psycopg 3) for replicas on several hosts.

One code path serves both (SQLAlchemy Core, `trl_micro.personalization.stores.schema`). Every operation touches the
rows of the users it names: O(K) per user, whatever the number of users; nothing reads or rewrites the whole store.

An observed comparison of user c (head margins delta_k = r_k(chosen) - r_k(rejected)) applies the online router's
update (`trl_micro.personalization.online_router`) to c's K head rows, and is logged, in one transaction:

- forgetting gamma = 1: each head's evidence eta * logsigmoid(delta_k) (shifted by its maximum) is added to the
  stored, unnormalized log-weight in one `UPDATE` of the user's rows, so concurrent writers add up without reading;
- gamma < 1: the user's rows are read `FOR UPDATE` and written back, log w <- gamma log w + (1 - gamma) log p + evidence.

The weights are softmax(log w) over the user's rows (constants vanish in the normalization). A comparison whose
margins are all 0 carries no information: it is logged but not applied nor counted. A comparison may carry a
`comparison_id`: one already in the log is not applied again, and its answer (the user's `num_updates` after it) is
returned again, so a client may retry a request whose answer it lost.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sqlalchemy import case, create_engine, delete, event, func, insert, select, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError

from ...value_checks import ArrayLike, as_float64, is_integer, is_real_number, normalize_user_id
from ..online_router import OnlineRouter, UserState, log_sigmoid
from ..residual_heads import DEFAULT_L2_GRID, ResidualHeads
from .schema import (
    SCHEMA_VERSION,
    comparisons_table,
    metadata,
    residuals_table,
    settings_table,
    user_heads_table,
    users_table,
)
from .transfer import UserStoreTransfer

Text = str | list[dict[str, Any]]
WRITE_RETRIES = 5


@dataclass
class StoreSettings:
    """What a store was created with; fixed for its life (a rebuild for new heads changes `model_fingerprint`)."""

    num_heads: int
    eta: float = 1.0
    forgetting: float = 1.0
    default_prior: list[float] | None = None
    model_fingerprint: str | None = None
    hidden_size: int | None = None  # residual heads' feature size, set by the first residual written
    residual_l2: float | None = None
    residual_l2_grid: list[float] = field(default_factory=lambda: list(DEFAULT_L2_GRID))
    residual_cv_folds: int = 4
    residual_max_iter: int = 200

    def router(self) -> OnlineRouter:
        """An empty in-memory router with these settings (it checks them)."""
        return OnlineRouter(
            self.num_heads, self.eta, self.forgetting, default_prior=self.default_prior,
            model_fingerprint=self.model_fingerprint,
        )  # fmt: skip


@dataclass
class Comparison:
    """One observed comparison of a user: `chosen` preferred to `rejected` for `prompt` (text or chat messages)."""

    user_id: str | int
    prompt: Text
    chosen: Text
    rejected: Text
    context: str | None = None
    comparison_id: str | None = None


@dataclass
class RecordedComparison:
    """What recording one comparison did: the user's `num_updates` after it; `duplicate` if its id was logged."""

    user_id: str
    num_updates: int
    duplicate: bool


@dataclass
class LoggedComparison:
    """A row of the feedback log."""

    id: int
    user_id: str
    prompt: Text
    chosen: Text
    rejected: Text
    context: str | None
    comparison_id: str | None
    created_at: float
    model_fingerprint: str | None
    head_margins: list[float]
    applied: bool
    chosen_key: str | None
    rejected_key: str | None
    feature_backbone: str | None


def database_url(url: str | os.PathLike) -> str:
    """The SQLAlchemy URL of a store: `postgresql://` uses psycopg 3; a plain path is a SQLite file."""
    url = os.fspath(url)
    if "://" not in url:
        raise ValueError(
            f"A user store is named by a URL, got {url!r}: `sqlite:///path/users.db` (one host) or "
            "`postgresql://user@host:port/database` (several hosts)."
        )
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if not (url.startswith("sqlite") or url.startswith("postgresql+")):
        raise ValueError(f"Unsupported user store URL {url!r}: use sqlite:///path/users.db or postgresql://...")
    return url


def _sqlite_engine(url: str) -> Engine:
    path = make_url(url).database
    if path and path != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 60})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")  # WAL + FULL: a commit is on disk when it returns
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):
        # Writers take the write lock up front, so a read-then-write transaction never deadlocks with another writer.
        immediate = connection.get_execution_options().get("trl_micro_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class UserStore(UserStoreTransfer):
    """
    A user store at `url` (see the module docstring). Open one with [`open_user_store`].

    Reads (`weights`, `residuals`, `state`, ...) see committed state; writes (`record_comparisons`, `set_residuals`,
    `delete_user`, `import_router`, ...) are transactions that commit durably before they return. An instance may be
    shared by threads.
    """

    def __init__(self, url: str | os.PathLike, pool_size: int = 4):
        self.url = database_url(url)
        self.backend = make_url(self.url).get_backend_name()
        if self.backend == "sqlite":
            self.engine = _sqlite_engine(self.url)
        elif self.backend == "postgresql":
            self.engine = create_engine(self.url, pool_size=pool_size, pool_pre_ping=True)
        else:
            raise ValueError(f"Unsupported user store backend {self.backend!r}: use sqlite or postgresql.")
        self._settings: StoreSettings | None = None
        self._create_tables()

    def __repr__(self) -> str:
        return f"UserStore({self.display_url!r}, num_heads={self.settings.num_heads if self._has_settings() else None})"

    @property
    def display_url(self) -> str:
        """The URL without its password."""
        return make_url(self.url).render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    # ---------------------------------------------------------------------------------------------- transactions
    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            connection = connection.execution_options(trl_micro_write=True)
            with connection.begin():
                yield connection

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            with connection.begin():
                yield connection

    def _retrying(self, transaction):
        """Run `transaction(connection)` in a write transaction, again after a conflict another writer caused."""
        for attempt in range(WRITE_RETRIES):
            try:
                with self._write() as connection:
                    return transaction(connection)
            except (IntegrityError, OperationalError) as error:
                if attempt == WRITE_RETRIES - 1 or not _is_conflict(error):
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _create_tables(self) -> None:
        try:
            metadata.create_all(self.engine, checkfirst=True)
        except (IntegrityError, OperationalError) as error:  # another process created them meanwhile
            if not _is_conflict(error) and "already exists" not in str(error):
                raise
            metadata.create_all(self.engine, checkfirst=True)

    # -------------------------------------------------------------------------------------------------- settings
    def _has_settings(self) -> bool:
        if self._settings is not None:
            return True
        with self._read() as connection:
            stored = dict(connection.execute(select(settings_table.c.name, settings_table.c.value)).all())
        if not stored:
            return False
        if int(json.loads(stored.get("schema_version", "0"))) != SCHEMA_VERSION:
            raise ValueError(
                f"The user store {self.display_url} has schema version {stored.get('schema_version')}, this trl-micro "
                f"reads version {SCHEMA_VERSION}. Export it with the trl-micro that wrote it and import it here."
            )
        values = {name: json.loads(value) for name, value in stored.items() if name != "schema_version"}
        self._settings = StoreSettings(**values)
        return True

    @property
    def settings(self) -> StoreSettings:
        if not self._has_settings():
            raise ValueError(
                f"The user store {self.display_url} is empty (no settings): open it with `num_heads=` to create it, "
                "or import a JSON store into it (`trl-micro users import`)."
            )
        return self._settings

    def initialize(self, settings: StoreSettings) -> None:
        """Write the settings of a new store (checked through `OnlineRouter`); a store that has them is left alone."""
        settings.router()  # validates num_heads, eta, forgetting, default_prior, fingerprint
        values = {"schema_version": SCHEMA_VERSION, **settings.__dict__}

        def write(connection):
            if connection.execute(select(func.count()).select_from(settings_table)).scalar_one():
                return
            connection.execute(
                insert(settings_table), [{"name": name, "value": json.dumps(value)} for name, value in values.items()]
            )

        self._retrying(write)
        self._settings = None
        self._has_settings()

    def _update_settings(self, connection: Connection, **values) -> None:
        for name, value in values.items():
            connection.execute(
                update(settings_table).where(settings_table.c.name == name).values(value=json.dumps(value))
            )

    def check_model(self, num_heads: int | None = None, model_fingerprint: str | None = None) -> None:
        """A `ValueError` when the store's weights refer to other heads than a model with these values has."""
        settings = self.settings
        if num_heads is not None and settings.num_heads != num_heads:
            raise ValueError(
                f"The user store {self.display_url} has num_heads={settings.num_heads}, the reward model {num_heads}: "
                "it belongs to another model. Rebuild it for this one: `trl-micro users rebuild --user_store URL "
                "--model CHECKPOINT`."
            )
        if model_fingerprint is not None and settings.model_fingerprint not in (None, model_fingerprint):
            raise ValueError(
                f"The user store {self.display_url} holds weights over the heads of model {settings.model_fingerprint}, "
                f"not of this model ({model_fingerprint}). Rebuild it for this one: `trl-micro users rebuild "
                "--user_store URL --model CHECKPOINT`."
            )

    # ------------------------------------------------------------------------------------------------------ reads
    def __contains__(self, user_id: object) -> bool:
        if user_id is None:
            return False
        return bool(self.weights([normalize_user_id(user_id)]))

    def __len__(self) -> int:
        with self._read() as connection:
            return connection.execute(select(func.count()).select_from(users_table)).scalar_one()

    def users(self, limit: int | None = None, after: str | None = None) -> list[str]:
        """User ids in id order (`after` one, at most `limit`): page through a large store with both."""
        query = select(users_table.c.user_id).order_by(users_table.c.user_id)
        if after is not None:
            query = query.where(users_table.c.user_id > after)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as connection:
            return list(connection.execute(query).scalars())

    def weights(self, user_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """`{user: weights (K,) float64}` of the users in `user_ids` the store knows (one query)."""
        wanted = sorted(set(user_ids))
        if not wanted:
            return {}
        log_weights = self._head_values(wanted, user_heads_table.c.log_weight)
        return {
            user: torch.softmax(torch.tensor(values, dtype=torch.float64), 0) for user, values in log_weights.items()
        }

    def _head_values(self, user_ids: list[str], column) -> dict[str, list[float]]:
        num_heads = self.settings.num_heads
        found: dict[str, list[float]] = {}
        with self._read() as connection:
            for start in range(0, len(user_ids), 500):  # bounded IN lists
                query = select(user_heads_table.c.user_id, user_heads_table.c.head, column).where(
                    user_heads_table.c.user_id.in_(user_ids[start : start + 500])
                )
                for user, head, value in connection.execute(query):
                    found.setdefault(user, [math.nan] * num_heads)[head] = value
        return found

    def state(self, user_id: str | int) -> UserState | None:
        """The user's routing state (normalized log-weights and log-prior, `num_updates`), or `None` if unknown."""
        user_id = normalize_user_id(user_id)
        states = self._states([user_id])
        return states.get(user_id)

    def _states(self, user_ids: list[str]) -> dict[str, UserState]:
        log_weights = self._head_values(user_ids, user_heads_table.c.log_weight)
        log_priors = self._head_values(user_ids, user_heads_table.c.log_prior)
        counts = self.num_updates(user_ids)
        states = {}
        for user, values in log_weights.items():
            weights = torch.tensor(values, dtype=torch.float64)
            states[user] = UserState(
                log_weights=weights - torch.logsumexp(weights, 0),
                log_prior=torch.tensor(log_priors[user], dtype=torch.float64),
                num_updates=counts.get(user, 0),
            )
        return states

    def num_updates(self, user_ids: Sequence[str]) -> dict[str, int]:
        """`{user: informative comparisons applied}` of the known users in `user_ids`."""
        return dict(self._rows_of_users(users_table.c.user_id, users_table.c.num_updates, user_ids))

    def residuals(self, user_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """`{user: u_c (hidden_size,) float64}` of the users in `user_ids` with a residual head (one query)."""
        rows = self._rows_of_users(residuals_table.c.user_id, residuals_table.c.residual, user_ids)
        return {user: torch.from_numpy(np.frombuffer(data, dtype=np.float64).copy()) for user, data in rows}

    def _rows_of_users(self, user_column, value_column, user_ids: Sequence[str]) -> list[tuple]:
        """(user, value) rows of the users in `user_ids`, read in chunks of 500 ids per query."""
        wanted = sorted(set(user_ids))
        rows = []
        with self._read() as connection:
            for start in range(0, len(wanted), 500):
                query = select(user_column, value_column).where(user_column.in_(wanted[start : start + 500]))
                rows.extend(connection.execute(query).all())
        return rows

    def has_residuals(self) -> bool:
        with self._read() as connection:
            return connection.execute(select(residuals_table.c.user_id).limit(1)).first() is not None

    def comparisons(self, user_id: str | int | None = None, batch_size: int = 10_000) -> Iterator[LoggedComparison]:
        """The feedback log in the order it was written (of one user, or of all), read `batch_size` rows at a time."""
        last = 0
        while True:
            query = select(comparisons_table).where(comparisons_table.c.id > last)
            if user_id is not None:
                query = query.where(comparisons_table.c.user_id == normalize_user_id(user_id))
            query = query.order_by(comparisons_table.c.id).limit(batch_size)
            with self._read() as connection:
                rows = connection.execute(query).mappings().all()
            if not rows:
                return
            for row in rows:
                yield _logged(row)
            last = rows[-1]["id"]

    def comparison_index(self, batch_size: int = 50_000) -> Iterator[Any]:
        """`(id, user_id, chosen_key, rejected_key, feature_backbone)` of every logged comparison, in log order: what
        a rebuild needs, without the texts."""
        columns = comparisons_table.c
        last = 0
        while True:
            query = (
                select(columns.id, columns.user_id, columns.chosen_key, columns.rejected_key, columns.feature_backbone)
                .where(columns.id > last)
                .order_by(columns.id)
                .limit(batch_size)
            )
            with self._read() as connection:
                rows = connection.execute(query).all()
            if not rows:
                return
            yield from rows
            last = rows[-1].id

    def residual_users(self) -> list[str]:
        """The users that have a residual head."""
        with self._read() as connection:
            return list(connection.execute(select(residuals_table.c.user_id)).scalars())

    def count_comparisons(self, user_id: str | int | None = None) -> int:
        query = select(func.count()).select_from(comparisons_table)
        if user_id is not None:
            query = query.where(comparisons_table.c.user_id == normalize_user_id(user_id))
        with self._read() as connection:
            return connection.execute(query).scalar_one()

    # ----------------------------------------------------------------------------------------------------- writes
    def record_comparisons(
        self,
        comparisons: Sequence[Comparison],
        head_margins: ArrayLike,
        priors: ArrayLike | None = None,
        model_fingerprint: str | None = None,
        feature_keys: Sequence[tuple[str, str]] | None = None,
        feature_backbone: str | None = None,
    ) -> list[RecordedComparison]:
        """
        Apply and log comparisons in one transaction (see the module docstring): row i of `head_margins` `(N, K)` is
        r_k(chosen) - r_k(rejected) of `comparisons[i]`; `priors` `(N, K)` the prior of row i's user if it is new
        (default: the store's `default_prior`, else uniform). `feature_keys[i]` (the feature-store keys of the chosen
        and rejected sequences) and `feature_backbone` let a rebuild on the same backbone skip it. Returns what each
        comparison did; nothing is written when anything fails.
        """
        settings = self.settings
        if model_fingerprint is not None:
            self.check_model(model_fingerprint=model_fingerprint)
        rows = self._checked_comparisons(comparisons, head_margins, priors, feature_keys)
        default_log_prior = settings.router()._default_log_prior
        evidence = settings.eta * log_sigmoid(rows["margins"])
        evidence = evidence - evidence.amax(dim=1, keepdim=True)
        now = time.time()

        def transaction(connection: Connection) -> list[RecordedComparison]:
            results = []
            for index, comparison in enumerate(rows["comparisons"]):
                if comparison.comparison_id is not None:
                    logged = connection.execute(
                        select(comparisons_table.c.user_id, comparisons_table.c.num_updates).where(
                            comparisons_table.c.comparison_id == comparison.comparison_id
                        )
                    ).first()
                    if logged is not None:
                        results.append(RecordedComparison(logged.user_id, int(logged.num_updates), duplicate=True))
                        continue
                user = comparison.user_id
                applied = bool(rows["informative"][index])
                log_prior = rows["log_priors"][index] if rows["log_priors"] is not None else default_log_prior
                num_updates = self._bump_user(connection, user, int(applied), log_prior, now)
                if applied:
                    self._apply_evidence(connection, user, evidence[index], settings.forgetting)
                keys = rows["feature_keys"][index] if rows["feature_keys"] is not None else (None, None)
                connection.execute(
                    insert(comparisons_table).values(
                        comparison_id=comparison.comparison_id,
                        user_id=user,
                        prompt=json.dumps(comparison.prompt),
                        chosen=json.dumps(comparison.chosen),
                        rejected=json.dumps(comparison.rejected),
                        context=comparison.context,
                        created_at=now,
                        model_fingerprint=model_fingerprint or settings.model_fingerprint,
                        head_margins=json.dumps(rows["margins"][index].tolist()),
                        applied=applied,
                        num_updates=num_updates,
                        chosen_key=keys[0],
                        rejected_key=keys[1],
                        feature_backbone=feature_backbone,
                    )
                )
                results.append(RecordedComparison(user, num_updates, duplicate=False))
            return results

        return self._retrying(transaction)

    def _checked_comparisons(self, comparisons, head_margins, priors, feature_keys) -> dict[str, Any]:
        num_heads = self.settings.num_heads
        comparisons = list(comparisons)
        checked = []
        seen_ids = set()
        for row, comparison in enumerate(comparisons):
            if not isinstance(comparison, Comparison):
                raise TypeError(f"comparisons[{row}] must be a Comparison, got {type(comparison).__name__}.")
            user = normalize_user_id(comparison.user_id, f"comparisons[{row}].user_id")
            for name in ("prompt", "chosen", "rejected"):
                value = getattr(comparison, name)
                if not isinstance(value, (str, list)):
                    raise TypeError(f"comparisons[{row}].{name} must be text or a list of messages.")
            if comparison.context is not None and not isinstance(comparison.context, str):
                raise TypeError(f"comparisons[{row}].context must be a str or None.")
            if comparison.comparison_id is not None:
                if not isinstance(comparison.comparison_id, str) or not comparison.comparison_id:
                    raise TypeError(f"comparisons[{row}].comparison_id must be a non-empty str or None.")
                if comparison.comparison_id in seen_ids:
                    raise ValueError(f"comparisons[{row}].comparison_id {comparison.comparison_id!r} appears twice.")
                seen_ids.add(comparison.comparison_id)
            checked.append(
                Comparison(user, comparison.prompt, comparison.chosen, comparison.rejected, comparison.context,
                           comparison.comparison_id)
            )  # fmt: skip
        margins = as_float64(head_margins, "head_margins").reshape(-1, num_heads) if checked else None
        if margins is None or margins.shape != (len(checked), num_heads):
            raise ValueError(
                f"`head_margins` must have shape (len(comparisons), num_heads) = ({len(checked)}, {num_heads})."
            )
        if not bool(torch.isfinite(margins).all()):
            raise ValueError("`head_margins` must be finite.")
        log_priors = None
        if priors is not None:
            router = self.settings.router()
            prior_rows = as_float64(priors, "priors")
            if prior_rows.shape != (len(checked), num_heads):
                raise ValueError(f"`priors` must have shape ({len(checked)}, {num_heads}).")
            log_priors = torch.stack([router._log_prior(prior, f"priors[{i}]") for i, prior in enumerate(prior_rows)])
        if feature_keys is not None and len(feature_keys) != len(checked):
            raise ValueError(f"{len(feature_keys)} feature keys for {len(checked)} comparisons.")
        return {
            "comparisons": checked,
            "margins": margins,
            "informative": margins.ne(0).any(dim=1).tolist(),
            "log_priors": log_priors,
            "feature_keys": None if feature_keys is None else [tuple(keys) for keys in feature_keys],
        }

    def _bump_user(self, connection: Connection, user: str, count: int, log_prior: torch.Tensor, now: float) -> int:
        """Count `count` more updates of `user` (created with `log_prior` if new); returns its `num_updates`."""
        bump = (
            update(users_table)
            .where(users_table.c.user_id == user)
            .values(num_updates=users_table.c.num_updates + count, version=users_table.c.version + 1, updated_at=now)
            .returning(users_table.c.num_updates)
        )
        found = connection.execute(bump).scalar_one_or_none()
        if found is not None:
            return int(found)
        created = connection.execute(
            self._insert_ignoring_conflicts(users_table, ["user_id"]).values(
                user_id=user, num_updates=count, version=1, updated_at=now
            )
        )
        if created.rowcount == 0:  # another writer created the user meanwhile
            return int(connection.execute(bump).scalar_one())
        connection.execute(
            insert(user_heads_table),
            [
                {"user_id": user, "head": head, "log_weight": float(value), "log_prior": float(value)}
                for head, value in enumerate(log_prior.tolist())
            ],
        )
        return count

    def _apply_evidence(self, connection: Connection, user: str, evidence: torch.Tensor, forgetting: float) -> None:
        heads = user_heads_table.c.head
        if forgetting == 1.0:
            added = case({head: float(value) for head, value in enumerate(evidence.tolist())}, value=heads)
            connection.execute(
                update(user_heads_table)
                .where(user_heads_table.c.user_id == user)
                .values(log_weight=user_heads_table.c.log_weight + added)
            )
            return
        rows = connection.execute(
            select(heads, user_heads_table.c.log_weight, user_heads_table.c.log_prior)
            .where(user_heads_table.c.user_id == user)
            .order_by(heads)
            .with_for_update()
        ).all()
        log_weights = torch.tensor([row.log_weight for row in rows], dtype=torch.float64)
        log_prior = torch.tensor([row.log_prior for row in rows], dtype=torch.float64)
        new = forgetting * log_weights + (1 - forgetting) * log_prior + evidence
        new = new - torch.logsumexp(new, 0)  # keeps magnitudes bounded under decay
        connection.execute(
            update(user_heads_table)
            .where(user_heads_table.c.user_id == user)
            .values(log_weight=case({head: float(value) for head, value in enumerate(new.tolist())}, value=heads))
        )

    def _insert_ignoring_conflicts(self, table, keys: list[str]):
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        return dialect_insert(table).on_conflict_do_nothing(index_elements=keys)

    def _upsert(self, table, keys: list[str], rows: list[dict]) -> Any:
        if self.backend == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        statement = dialect_insert(table)
        updated = {column.name: statement.excluded[column.name] for column in table.columns if column.name not in keys}
        return statement.on_conflict_do_update(index_elements=keys, set_=updated), rows

    def set_residuals(self, residuals: dict[str, tuple[torch.Tensor, float, int]]) -> None:
        """Write `{user: (u_c, lambda, num_pairs)}` (replacing those users' residuals) in one transaction."""
        if not residuals:
            return
        sizes = {int(torch.as_tensor(vector).numel()) for vector, _, _ in residuals.values()}
        settings = self.settings
        if len(sizes) != 1 or (settings.hidden_size is not None and sizes != {settings.hidden_size}):
            raise ValueError(
                f"Residual heads of size {sorted(sizes)} do not fit the user store {self.display_url} "
                f"(hidden_size={settings.hidden_size}): they were fitted on another backbone's features."
            )
        rows = [
            {
                "user_id": normalize_user_id(user),
                "residual": as_float64(vector, "residual").numpy().tobytes(),
                "l2": float(l2),
                "num_pairs": int(num_pairs),
            }
            for user, (vector, l2, num_pairs) in residuals.items()
        ]
        statement, rows = self._upsert(residuals_table, ["user_id"], rows)

        def write(connection):
            if settings.hidden_size is None:
                self._update_settings_or_insert(connection, "hidden_size", sizes.pop())
            connection.execute(statement, rows)
            users = [row["user_id"] for row in rows]
            connection.execute(
                update(users_table).where(users_table.c.user_id.in_(users)).values(version=users_table.c.version + 1)
            )

        self._retrying(write)
        self._settings = None

    def _update_settings_or_insert(self, connection: Connection, name: str, value: Any) -> None:
        statement, rows = self._upsert(settings_table, ["name"], [{"name": name, "value": json.dumps(value)}])
        connection.execute(statement, rows)

    def delete_user(self, user_id: str | int) -> dict[str, int]:
        """Remove a user's routing, residual head and logged comparisons; returns the rows removed per kind."""
        user = normalize_user_id(user_id)

        def remove(connection):
            removed = {}
            for name, table in (
                ("comparisons", comparisons_table),
                ("residual", residuals_table),
                ("head_rows", user_heads_table),
                ("user", users_table),
            ):
                removed[name] = connection.execute(delete(table).where(table.c.user_id == user)).rowcount
            return removed

        return self._retrying(remove)

    def write_states(self, states: dict[str, UserState], batch_size: int = 10_000) -> int:
        """Replace the routing state of the users in `states` (bulk, `batch_size` users per transaction)."""
        users = list(states)
        now = time.time()
        for start in range(0, len(users), batch_size):
            chunk = users[start : start + batch_size]
            user_rows = [
                {"user_id": user, "num_updates": int(states[user].num_updates), "version": 1, "updated_at": now}
                for user in chunk
            ]
            head_rows = [
                {"user_id": user, "head": head, "log_weight": weight, "log_prior": prior}
                for user in chunk
                for head, (weight, prior) in enumerate(
                    zip(states[user].log_weights.tolist(), states[user].log_prior.tolist())
                )
            ]
            users_statement, _ = self._upsert(users_table, ["user_id"], user_rows)
            heads_statement, _ = self._upsert(user_heads_table, ["user_id", "head"], head_rows)

            def write(connection, user_rows=user_rows, head_rows=head_rows, a=users_statement, b=heads_statement):
                connection.execute(a, user_rows)
                connection.execute(b, head_rows)

            self._retrying(write)
        return len(users)

    def residual_heads_template(self) -> ResidualHeads:
        """An empty [`ResidualHeads`] with the store's residual settings (what a refit uses)."""
        settings = self.settings
        return ResidualHeads(
            settings.hidden_size,
            l2=settings.residual_l2,
            l2_grid=settings.residual_l2_grid,
            cv_folds=settings.residual_cv_folds,
            max_iter=settings.residual_max_iter,
            model_fingerprint=settings.model_fingerprint,
        )

    def replace_model(
        self, model_fingerprint: str | None, states: dict[str, UserState], residuals, num_heads: int
    ) -> None:
        """
        Point the store at new heads: every user's routing becomes `states` (the rebuild's), residual heads become
        `residuals` (`{user: (u, lambda, num_pairs)}`, others dropped), and the settings take the new fingerprint
        and `num_heads`. Users missing from `states` keep their log and lose their routing.
        """

        def reset(connection):
            connection.execute(delete(user_heads_table))
            connection.execute(delete(residuals_table))
            connection.execute(update(users_table).values(num_updates=0, version=users_table.c.version + 1))
            self._update_settings(connection, model_fingerprint=model_fingerprint, num_heads=num_heads)

        self._retrying(reset)
        self._settings = None
        self.write_states(states)
        self.set_residuals(residuals)


# ------------------------------------------------------------------------------------------------------- helpers
def open_user_store(
    url: str | os.PathLike,
    num_heads: int | None = None,
    model_fingerprint: str | None = None,
    eta: float = 1.0,
    forgetting: float = 1.0,
    default_prior: ArrayLike | None = None,
) -> UserStore:
    """
    Open the user store at `url` (`sqlite:///path/users.db` or `postgresql://...`; see `UserStore`). An empty store is
    created with `num_heads`, `eta`, `forgetting`, `default_prior` and `model_fingerprint`; a store that exists must
    have the `num_heads` and `model_fingerprint` given (when given) and keeps its own settings.
    """
    store = UserStore(url)
    if not store._has_settings():
        if num_heads is None:
            raise ValueError(f"The user store {store.display_url} is new: pass `num_heads` (the reward model's K).")
        if not is_integer(num_heads) or not is_real_number(eta) or not is_real_number(forgetting):
            raise TypeError("`num_heads` must be an int, `eta` and `forgetting` numbers.")
        prior = None if default_prior is None else as_float64(default_prior, "default_prior").tolist()
        store.initialize(StoreSettings(int(num_heads), float(eta), float(forgetting), prior, model_fingerprint))
    store.check_model(num_heads, model_fingerprint)
    return store


def _is_conflict(error: Exception) -> bool:
    text = str(getattr(error, "orig", error)).lower()
    return any(
        marker in text
        for marker in ("unique", "duplicate key", "database is locked", "deadlock", "could not serialize", "busy")
    )


def _logged(row) -> LoggedComparison:
    return LoggedComparison(
        id=row["id"],
        user_id=row["user_id"],
        prompt=json.loads(row["prompt"]),
        chosen=json.loads(row["chosen"]),
        rejected=json.loads(row["rejected"]),
        context=row["context"],
        comparison_id=row["comparison_id"],
        created_at=row["created_at"],
        model_fingerprint=row["model_fingerprint"],
        head_margins=json.loads(row["head_margins"]),
        applied=bool(row["applied"]),
        chosen_key=row["chosen_key"],
        rejected_key=row["rejected_key"],
        feature_backbone=row["feature_backbone"],
    )
