"""What both kernel classes share: array checks, tensorly on a backend, the base class."""

from __future__ import annotations

import contextlib
import math
import string
from typing import Any

from .._typing import Array
from ..backends import backend_for_name, get_backend

_TENSORLY_NAMES = {"numpy": "numpy", "torch": "pytorch", "cupy": "cupy", "jax": "jax"}
_LETTERS = string.ascii_letters


def _shape(x):
    return tuple(int(s) for s in x.shape)


@contextlib.contextmanager
def _tensorly_on(backend):
    """tensorly on ``backend`` inside the block only; the caller's global choice is restored."""
    import tensorly

    with tensorly.backend_context(_TENSORLY_NAMES[backend.name]):
        yield tensorly


def _check_same_array_kind(backend, named_arrays):
    """All arrays share one dtype and device; ``named_arrays`` is [(name, array)]."""
    ref_name, ref = named_arrays[0]
    for name, arr in named_arrays[1:]:
        if backend.dtype(arr) != backend.dtype(ref):
            raise TypeError(
                f"{name} has dtype {backend.dtype_name(arr)} but {ref_name} has dtype "
                f"{backend.dtype_name(ref)}; all parts of a kernel must share one dtype"
            )
        if backend.device(arr) != backend.device(ref):
            raise ValueError(
                f"{name} is on device {backend.device(arr)} but {ref_name} is on "
                f"{backend.device(ref)}; all parts of a kernel must be on one device"
            )


def _blocks_on_diagonal(b, blocks):
    """(g, A, B, *rest) blocks -> the (g*A, g*B, *rest) array with block j at rows and columns j."""
    g = int(blocks.shape[0])
    eye = b.eye(g, like=blocks)
    # full[g, a, h, c, ...] = blocks[g, a, c, ...] * eye[g, h]
    full = b.einsum("gac...,gh->gahc...", blocks, eye)
    rows, cols = int(blocks.shape[1]), int(blocks.shape[2])
    return b.reshape(full, (g * rows, g * cols) + _shape(blocks)[3:])


def _check_finite(backend, x, name):
    if backend.is_floating(x) and not backend.all_finite(x):
        raise ValueError(f"{name} contains NaN or infinite values")


def _half_precision(backend, weight):
    """The weight's dtype name where it is float16 / bfloat16, else None: the solvers run in
    float32 there (no half-precision eigh or solve on CPU, and too few digits for ALS to converge),
    and the kernel is stored back in the weight's dtype."""
    name = backend.dtype_name(weight)
    return name if name in ("float16", "bfloat16") else None


class _FactorizedKernel:
    """What Kruskal and Tucker kernels share: shape bookkeeping, backend moves, repr."""

    @property
    def n_spatial(self) -> int:
        return len(self.shape) - 2

    @property
    def kernel_size(self) -> tuple:
        return tuple(self.shape[2:])

    @property
    def out_channels(self) -> int:
        return self.shape[0]

    @property
    def in_channels(self) -> int:
        return self.shape[1]

    @property
    def dense_params(self) -> int:
        """Parameters of the dense kernel this one factorizes."""
        return math.prod(self.shape)

    @property
    def dtype(self):
        return self.backend.dtype(self._reference_array())

    @property
    def device(self):
        return self.backend.device(self._reference_array())

    def _map_arrays(self, fn):
        raise NotImplementedError

    def to_backend(self, backend: str, *, dtype: Any = None, device: Any = None):
        """The same kernel on another backend (and optionally dtype / device)."""
        target = backend_for_name(backend)
        source = self.backend

        def move(x):
            host = source.to_numpy(x)
            out = target.from_numpy(host, device=device, dtype=dtype)
            return out

        return self._map_arrays(move)

    def astype(self, dtype):
        return self._map_arrays(lambda x: self.backend.astype(x, dtype))

    def _contract(self):
        """The einsum of :meth:`einsum_operands`, in the order opt_einsum picks, in the kernel's
        own dtype: inside torch.autocast the products it casts (matmul) and those it leaves alone
        (tensordot) would otherwise meet with different dtypes."""
        import opt_einsum

        terms, operands, out = self.einsum_operands()
        with self.backend.runtime.autocast_off(self._reference_array()):
            return opt_einsum.contract(",".join(terms) + "->" + out, *operands)

    def relative_error(self, weight: Array) -> float:
        """``||W - to_dense()|| / ||W||`` against a dense kernel ``weight`` of the same shape."""
        b = get_backend(weight, self._reference_array())
        dense = self._dense_shaped_as(_shape(weight))
        if _half_precision(b, weight) or _half_precision(b, dense):  # numpy has no bfloat16 of its own
            weight, dense = b.astype(weight, "float32"), b.astype(dense, "float32")
        diff = b.to_numpy(weight - dense)
        ref = b.to_numpy(weight)
        import numpy as np

        # in float64 and scaled by the largest magnitude: the norms of tiny or huge kernels
        # neither underflow to 0 nor overflow to inf
        diff, ref = diff.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
        peak = max(float(np.abs(diff).max(initial=0)), float(np.abs(ref).max(initial=0)))
        if peak == 0:
            return 0.0
        denom = np.linalg.norm(ref / peak)
        num = np.linalg.norm(diff / peak)
        return float(num / denom) if denom else float(num * peak)

    def _dense_shaped_as(self, shape):
        """The dense kernel to compare with a weight of ``shape``."""
        if shape != self.shape:
            raise ValueError(f"weight has shape {shape}, expected the kernel's shape {self.shape}")
        return self.to_dense()

    def _repr_extra(self):
        return ""

    def __repr__(self):
        return (
            f"{type(self).__name__}(shape={self.shape}, rank={self.rank}{self._repr_extra()}, "
            f"backend={self.backend.name}, dtype={self.backend.dtype_name(self._reference_array())}, "
            f"params={self.n_params} vs dense {self.dense_params})"
        )


def check_decomposition_keywords(kernel_class, kwargs: dict, who: str) -> None:
    """A ``TypeError`` naming the valid keywords where ``kwargs`` has one that
    ``kernel_class.from_dense`` would pass to a solver that does not take it (tensorly's own
    solvers, ``method="tensorly"``, check their keywords themselves)."""
    import inspect

    default, solver, own = kernel_class._own_decomposition()
    if kwargs.get("method", default) != default:
        return
    valid = own | set(list(inspect.signature(solver).parameters)[2:]) - {"return_errors"}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(
            f"{who}: unknown keyword(s) {', '.join(map(repr, unknown))} for the {kernel_class.__name__} "
            f"decomposition ({solver.__name__}); valid: {', '.join(sorted(valid))}"
        )
