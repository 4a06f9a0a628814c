"""
Old import paths and names, kept working for one release with a `FutureWarning` that names the new one.

Stage 2 moved into `trl_micro.personalization` (online routing, residual heads, adaptation, query selection, the user
stores); a module at an old path becomes the module at the new path, so every name, private ones included, still
resolves. Names that moved out of a module that stays (`moved_names`) resolve through that module's `__getattr__`.
"""

from __future__ import annotations

import importlib
import sys
import warnings


def alias_moved_module(old_name: str, new_name: str) -> None:
    """Make `old_name` the module `new_name` (after a `FutureWarning` naming both)."""
    warnings.warn(
        f"`{old_name}` moved to `{new_name}`; the old path is removed in the next release.", FutureWarning, stacklevel=3
    )
    sys.modules[old_name] = importlib.import_module(new_name)


def moved_names(module_name: str, moves: dict[str, str]):
    """A module `__getattr__` that resolves each name of `moves` from its new module (after a `FutureWarning`)."""

    def __getattr__(name: str):
        if name not in moves:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        warnings.warn(
            f"`{module_name}.{name}` moved to `{moves[name]}.{name}`; the old path is removed in the next release.",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(moves[name]), name)

    return __getattr__
