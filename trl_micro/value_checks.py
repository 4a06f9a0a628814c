"""
Checks of the values that cross the library's boundaries: numbers, integers, and user ids.

User ids. One rule everywhere a user id meets a store, the reward, the server or `trl-micro eval`
([`normalize_user_id`]): a `str` is the id; an `int` (Python or NumPy) becomes its decimal string, so `17`,
`np.int64(17)` and `"17"` are one user; anything else (a float, a bool, bytes, `None`) is refused with a `TypeError`.
A "user" is any id whose taste is tracked (a user, a rater, a criterion); a "context" is text joined to a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]


def is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def normalize_user_id(user_id: Any, name: str = "user_id") -> str:
    """
    The id of a user (or context) as the stores key it: a `str` as it is, an `int` (Python or NumPy; not a `bool`) as
    its decimal string. Anything else (a float, a bool, bytes, `None`, ...) is a `TypeError` naming `name`: ids are
    JSON keys, and a float such as `17.0` has no single text form.
    """
    if isinstance(user_id, str):
        return user_id
    if is_integer(user_id):
        return str(int(user_id))
    raise TypeError(
        f"`{name}` must be a str or an int (a user or context id; ints are read as their decimal string), got "
        f"{type(user_id).__name__} {user_id!r}. Convert the ids first, e.g. a float column with `int(...)`."
    )


def as_float64(values: ArrayLike, name: str) -> torch.Tensor:
    """A CPU float64 tensor from a tensor, an array or a (nested) list."""
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=torch.float64)
    try:
        return torch.as_tensor(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a tensor, an array or a list of numbers: {err}") from err


__all__ = ["ArrayLike", "as_float64", "is_integer", "is_real_number", "normalize_user_id"]
