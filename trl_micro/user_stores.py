"""
Deprecated: the JSON files moved to `trl_micro.personalization.json_files`, the value checks (user ids,
numbers) to `trl_micro.value_checks`. Removed in the next release.
"""

import warnings

from . import value_checks as _value_checks
from .personalization import json_files as _json_files

warnings.warn(
    "`trl_micro.user_stores` is split: JSON files in `trl_micro.personalization.json_files`, value checks in "
    "`trl_micro.value_checks`; the old path is removed in the next release.",
    FutureWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    for module in (_value_checks, _json_files):
        if hasattr(module, name):
            return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
