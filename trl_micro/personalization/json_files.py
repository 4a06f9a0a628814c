"""
The JSON files of Stage 2 ([`OnlineRouter`] weights, [`ResidualHeads`] residuals), the import / export format of the
user stores (`trl_micro.personalization.stores`) and what `adapt_to_users(...).save(folder)` writes: written atomically
and read with checks of the format, its version and which model the file belongs to before anything is built from it,
with the lock that lets several processes write one file.

Writers. Every write happens under an inter-process lock on the sidecar file `<store>.lock` (a `filelock.FileLock`,
the lock `huggingface_hub` and `datasets` use for their caches; the empty file stays beside the store). `save(path)`
replaces the store with the object's state: one writer per store. `save(path, merge=True)` reads the store under the
lock, applies to it what this object changed since it was loaded or last saved, writes the result and takes it as its
own state: any number of processes (GRPO ranks, services) can update one store this way and no update is lost.
Readers need no lock: a store is only ever replaced whole (`os.replace`), so a read sees the previous or the next
version, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Sequence
from typing import Any

from filelock import FileLock


class StoreReader:
    """Reads one store file; every error names the file and what is wrong with it (`what`: "routing store", ...)."""

    def __init__(self, path: str | os.PathLike, what: str, store_format: str, version: int):
        self.path, self.what = os.fspath(path), what
        with open(self.path, "rb") as file:
            raw = file.read()
        self.digest = hashlib.sha256(raw).hexdigest()  # what this reader saw (`SyncedStore`)
        try:
            payload = json.loads(raw.decode("utf-8"))
            if not isinstance(payload, dict) or payload.get("format") != store_format:
                raise ValueError(f"not a {store_format} file")
            if payload["format_version"] != version:
                raise ValueError(f"format version {payload['format_version']!r} is not supported (expected {version})")
        except (UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise self.corrupt(err) from err
        self.payload: dict[str, Any] = payload

    def corrupt(self, err: Exception) -> ValueError:
        return ValueError(f"The {self.what} at {self.path} is corrupt or truncated: {err}.")

    def field(self, name: str) -> Any:
        try:
            return self.payload[name]
        except KeyError as err:
            raise self.corrupt(err) from err

    def check(self, name: str, expected: Any, mismatch: str) -> Any:
        """The stored `name`; a `ValueError` when `expected` is given and differs (`mismatch` says what that means)."""
        found = self.field(name)
        if expected is not None and found != expected:
            raise ValueError(
                f"The {self.what} at {self.path} has {name}={found!r}, but {name}={expected!r} was expected "
                f"({mismatch})."
            )
        return found


LOCK_SUFFIX = ".lock"


def store_lock(path: str | os.PathLike) -> FileLock:
    """The inter-process lock of the store at `path` (on `<path>.lock`; its directory is created if needed)."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return FileLock(path + LOCK_SUFFIX)


def check_mergeable(what: str, path: str | os.PathLike, stored: Any, mine: Any, settings: Sequence[str]) -> None:
    """A `ValueError` naming the first of `settings` in which `stored` (the store at `path`) differs from `mine`."""
    for name in settings:
        theirs, ours = getattr(stored, name), getattr(mine, name)
        if theirs != ours:
            raise ValueError(
                f"Cannot merge into the {what} at {os.fspath(path)}: it has {name}={theirs!r}, this one "
                f"{name}={ours!r}. Merge only objects of the same settings and reward model, or save elsewhere."
            )


def write_store(path: str | os.PathLike, payload: dict) -> str:
    """
    Write `payload` as JSON to `path`, atomically: the data go to a temporary file in the same directory, are flushed
    and fsynced, then `os.replace`d onto `path`. A crash at any point leaves the previous store intact. Returns the
    SHA-256 of what was written.
    """
    path = os.fspath(path)
    text = json.dumps(payload, allow_nan=False, separators=(",", ":"))
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    descriptor, temporary_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if os.path.exists(path):
            os.chmod(temporary_path, stat.S_IMODE(os.stat(path).st_mode))
        os.replace(temporary_path, path)
    finally:
        if os.path.exists(temporary_path):
            os.unlink(temporary_path)
    _fsync_directory(directory)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_digest(path: str | os.PathLike) -> str | None:
    """SHA-256 of the file at `path`, or `None` when there is none."""
    try:
        with open(path, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest()
    except FileNotFoundError:
        return None


class SyncedStore:
    """
    What a store object last read from or wrote to each path, so that a plain `save(path)` never drops another
    writer's updates: over a store that changed since this object loaded or saved it, a plain save is refused (and
    `save(path, merge=True)` named); a store this object never touched is replaced, as the docstrings of `save` say.
    """

    def _remember_store(self, path: str | os.PathLike, digest: str) -> None:
        self.__dict__.setdefault("_store_digests", {})[os.path.abspath(path)] = digest

    def _refuse_dropping_changes(self, path: str | os.PathLike, what: str) -> None:
        recorded = self.__dict__.get("_store_digests", {}).get(os.path.abspath(path))
        current = file_digest(path)
        if recorded is not None and current is not None and current != recorded:
            raise ValueError(
                f"The {what} at {path} was written by another writer since this object loaded or last saved it: a "
                "plain save would drop that writer's updates. Save with `save(path, merge=True)` to add this object's "
                "changes to the store as it is now."
            )


def _fsync_directory(directory: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


__all__ = ["StoreReader", "SyncedStore", "check_mergeable", "file_digest", "store_lock", "write_store"]
