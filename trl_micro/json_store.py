"""
JSON stores of per-user Stage 2 state ([`OnlineRouter`] weights, [`ResidualHeads`] residuals): atomic writes, and
reads that check the format, its version and which model the store belongs to before anything is built from it.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from typing import Any


class StoreReader:
    """Reads one store file; every error names the file and what is wrong with it (`what`: "routing store", ...)."""

    def __init__(self, path: str | os.PathLike, what: str, store_format: str, version: int):
        self.path, self.what = os.fspath(path), what
        with open(self.path, "rb") as file:
            raw = file.read()
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


def write_store(path: str | os.PathLike, payload: dict) -> None:
    """
    Write `payload` as JSON to `path`, atomically: the data go to a temporary file in the same directory, are flushed
    and fsynced, then `os.replace`d onto `path`. A crash at any point leaves the previous store intact.
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


__all__ = ["StoreReader", "write_store"]
