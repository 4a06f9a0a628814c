"""
The per-user Stage 2 stores ([`OnlineRouter`] weights, [`ResidualHeads`] residuals): JSON files written atomically and
read with checks of the format, its version and which model the store belongs to before anything is built from it;
and the checks of what goes into them (user ids, numbers).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]


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


# --------------------------------------------------------------------------------------------------------- checks
def is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_user_id(user_id: Any) -> None:
    if not isinstance(user_id, str):
        raise TypeError(f"`user_id` must be a str (context ids are JSON keys), got {type(user_id).__name__}.")


def as_float64(values: ArrayLike, name: str) -> torch.Tensor:
    """A CPU float64 tensor from a tensor, an array or a (nested) list."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64)
    try:
        return torch.as_tensor(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a tensor, an array or a list of numbers: {err}") from err


__all__ = ["ArrayLike", "StoreReader", "as_float64", "check_user_id", "is_integer", "is_real_number", "write_store"]
