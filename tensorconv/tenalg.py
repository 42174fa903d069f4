"""n-mode products and (un)folding, backend-neutral (paper sec. 3.1).

Names and conventions follow tensorly: ``unfold(x, mode)`` puts ``mode`` first and flattens
the rest in C order; ``mode_dot(x, M, n)`` computes ``P[.., i_n, ..] = sum_k x[.., k, ..] M[i_n, k]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ._typing import Array
from .backends import get_backend

__all__ = ["mode_dot", "multi_mode_dot", "unfold", "fold"]


def _check_mode(x, mode, name="mode"):
    if not isinstance(mode, int) or isinstance(mode, bool):
        raise TypeError(f"{name} must be an int, got {mode!r}")
    if not -x.ndim <= mode < x.ndim:
        raise ValueError(f"{name}={mode} is out of range for a tensor of shape {tuple(x.shape)}")
    return mode % x.ndim


def mode_dot(x: Array, matrix: Array, mode: int) -> Array:
    """n-mode product ``x ×_mode matrix``.

    Parameters
    ----------
    x : array, shape (I_0, ..., I_N)
    matrix : array, shape (J, I_mode), or a vector of shape (I_mode,)
        A vector contracts the mode away (the result has one mode fewer).
    mode : int

    Examples
    --------
    >>> import numpy as np
    >>> x = np.arange(24.).reshape(2, 3, 4)
    >>> mode_dot(x, np.ones((5, 3)), 1).shape
    (2, 5, 4)
    """
    backend = get_backend(x, matrix)
    mode = _check_mode(x, mode)
    if matrix.ndim not in (1, 2):
        raise ValueError(f"mode_dot: matrix must be 1-D or 2-D, got shape {tuple(matrix.shape)}")
    if matrix.shape[-1] != x.shape[mode]:
        raise ValueError(
            f"mode_dot: matrix of shape {tuple(matrix.shape)} cannot multiply mode {mode} of a tensor "
            f"of shape {tuple(x.shape)}: matrix.shape[-1] must equal {x.shape[mode]}"
        )
    out = backend.tensordot(x, matrix, axes=([mode], [matrix.ndim - 1]))
    if matrix.ndim == 1:
        return out
    return backend.moveaxis(out, -1, mode)


def multi_mode_dot(
    x: Array, matrices: Sequence[Array], modes: Sequence[int] | None = None, skip: int | None = None
) -> Array:
    """Chain of n-mode products, one per entry of ``matrices`` (mode ``modes[i]``)."""
    matrices = list(matrices)
    if modes is None:
        modes = list(range(len(matrices)))
    modes = list(modes)
    if len(modes) != len(matrices):
        raise ValueError(f"multi_mode_dot: got {len(matrices)} matrices but {len(modes)} modes")
    # vectors remove modes: apply from the highest mode down so the others keep their index
    order = sorted(range(len(modes)), key=lambda i: modes[i] % x.ndim, reverse=True)
    for i in order:
        if skip is not None and i == skip:
            continue
        x = mode_dot(x, matrices[i], modes[i] % x.ndim)
    return x


def unfold(x: Array, mode: int) -> Array:
    """Mode-``mode`` matricisation: shape (I_mode, prod of the other dims)."""
    backend = get_backend(x)
    mode = _check_mode(x, mode)
    return backend.reshape(backend.moveaxis(x, mode, 0), (x.shape[mode], -1))


def fold(unfolded: Array, mode: int, shape: tuple[int, ...]) -> Array:
    """Inverse of :func:`unfold`."""
    backend = get_backend(unfolded)
    shape = tuple(int(s) for s in shape)
    if not 0 <= mode < len(shape):
        raise ValueError(f"fold: mode={mode} is out of range for shape {shape}")
    size = 1
    for s in shape:
        size *= s
    if unfolded.ndim != 2 or unfolded.shape[0] != shape[mode] or unfolded.shape[0] * unfolded.shape[1] != size:
        raise ValueError(
            f"fold: an unfolding of shape {tuple(unfolded.shape)} does not fold into shape {shape} along mode {mode}"
        )
    moved = (shape[mode],) + shape[:mode] + shape[mode + 1 :]
    return backend.moveaxis(backend.reshape(unfolded, moved), 0, mode)
