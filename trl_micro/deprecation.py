"""
Old import paths and names, kept working for one release with a `FutureWarning` that names the new one.

Stage 2 moved into `trl_micro.personalization` (online routing, residual heads, adaptation, query selection, the user
stores); a module at an old path becomes the module at the new path, so every name, private ones included, still
resolves.
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
