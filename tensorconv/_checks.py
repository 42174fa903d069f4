"""Argument checks shared by the kernels, the decompositions and the layers."""

from __future__ import annotations

import operator
from typing import Any

__all__ = ["as_int", "is_integral"]


def is_integral(value: Any) -> bool:
    """Whether ``value`` is an integer in any library's spelling (``int``, ``np.int64``, a 0-d
    integer tensor: anything with ``__index__``), bools excluded."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def as_int(value: Any, name: str, *, minimum: int) -> int:
    """``value`` as a Python int >= ``minimum``, or a ``ValueError`` / ``TypeError`` naming ``name``."""
    if not is_integral(value):
        raise TypeError(f"{name}={value!r}: expected an int >= {minimum}, got {type(value).__name__}")
    out = operator.index(value)
    if out < minimum:
        raise ValueError(f"{name}={out}: expected an int >= {minimum}")
    return out
