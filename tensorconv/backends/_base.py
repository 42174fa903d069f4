"""The array-module backend shared by NumPy and CuPy.

Every primitive is written once against an ``xp`` namespace (``numpy`` or ``cupy``), in the
style of array-api-compat, so the NumPy tests prove the logic that CuPy runs on the GPU.
The torch backend subclasses this and overrides only what differs.
"""

from __future__ import annotations

from ._native import NativeConvs
from ._runtime import Runtime

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
#: the floating dtypes a plan runs in, by name, with their sizes in bytes
FLOAT_ITEMSIZES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "complex64": 8, "complex128": 16}


def device_type(device):
    """The kind of a device: ``"cpu"``, ``"cuda"``, ... from a device object, a name such as
    ``"cuda:0"``, or None (a library without devices)."""
    return None if device is None else str(getattr(device, "type", device)).split(":")[0]


def check_padding_fits(mode, low, high, size, where):
    """A ValueError where ``mode`` cannot pad an axis of ``size`` by (low, high): reflect
    mirrors without the edge (padding < size), circular wraps around once (padding <= size)."""
    if mode == "reflect" and (low >= size or high >= size):
        raise ValueError(
            f"padding_mode='reflect' needs padding < input size; {where} has size {size} and padding ({low}, {high})"
        )
    if mode == "circular" and (low > size or high > size):
        raise ValueError(
            f"padding_mode='circular' needs padding <= input size; {where} has size {size} and padding ({low}, {high})"
        )


#: floating dtypes that ml_dtypes adds to numpy (jax's bfloat16): not subtypes of numpy.floating
_EXTENSION_FLOATS = ("bfloat16",)


class ArrayBackend:
    """Primitives the plans are built from. One instance per array library.

    Attributes
    ----------
    name : str
        ``"numpy"``, ``"torch"`` or ``"cupy"``.
    xp : module
        The array namespace.
    """

    name = "abstract"

    def __init__(self, xp):
        self.xp = xp
        #: the library's own convolutions (:class:`~tensorconv.backends._native.NativeConvs`)
        self.native = NativeConvs(self)
        #: the library's runtime hooks: autocast, tracers, compilation (:class:`~tensorconv.backends._runtime.Runtime`)
        self.runtime = Runtime(self)

    def __repr__(self):
        return f"<tensorconv backend {self.name!r}>"

    def __reduce__(self):
        # backends are singletons holding modules: pickle / deepcopy by name
        from . import backend_for_name

        return (backend_for_name, (self.name,))

    def array_types(self):
        """The library's array types, registered for :func:`get_backend` when the backend is made."""
        return ()

    # -- array attributes and creation -------------------------------------------------
    def dtype(self, x):
        return x.dtype

    def device(self, x):
        return None

    def dtype_name(self, x):
        return str(x.dtype)

    def itemsize(self, x):
        return x.dtype.itemsize

    def resolve_dtype(self, dtype):
        import numpy

        # numpy and cupy share numpy's dtype objects
        return numpy.dtype(dtype) if dtype is not None else numpy.dtype("float64")

    def asarray(self, data, *, dtype=None, device=None):
        return self.xp.asarray(data, dtype=dtype)

    def empty(self, shape, *, like):
        """An uninitialised array of ``like``'s dtype (and device): a buffer to write into."""
        return self.xp.empty(shape, dtype=like.dtype)

    def zeros(self, shape, *, like):
        return self.xp.zeros(shape, dtype=like.dtype)

    def ones(self, shape, *, like):
        return self.xp.ones(shape, dtype=like.dtype)

    def eye(self, n, *, like):
        return self.xp.eye(n, dtype=like.dtype)

    def astype(self, x, dtype):
        return x.astype(dtype, copy=False)

    def random_normal(self, shape, *, seed, dtype=None, device=None):
        rng = self.xp.random.default_rng(seed)
        return rng.standard_normal(shape).astype(self.resolve_dtype(dtype), copy=False)

    def is_floating(self, x):
        import numpy

        return numpy.issubdtype(x.dtype, numpy.floating) or x.dtype.name in _EXTENSION_FLOATS

    def is_inexact(self, x):
        """Floating or complex: a dtype a convolution can be computed in without wrapping around."""
        import numpy

        return numpy.issubdtype(x.dtype, numpy.inexact) or x.dtype.name in _EXTENSION_FLOATS

    def all_finite(self, x):
        return bool(self.xp.isfinite(x).all())

    # -- conversion --------------------------------------------------------------------
    def to_numpy(self, x):
        import numpy

        return numpy.asarray(x)

    def from_numpy(self, a, *, like=None, dtype=None, device=None):
        out = self.xp.asarray(a)
        if like is not None:
            out = out.astype(like.dtype, copy=False)
        elif dtype is not None:
            out = out.astype(self.resolve_dtype(dtype), copy=False)
        return out

    # -- shape manipulation ------------------------------------------------------------
    def reshape(self, x, shape):
        return self.xp.reshape(x, shape)

    def moveaxis(self, x, source, destination):
        return self.xp.moveaxis(x, source, destination)

    def flip(self, x, axis):
        return self.xp.flip(x, axis=axis)

    def permute(self, x, axes):
        return self.xp.transpose(x, axes)

    def concat(self, arrays, axis):
        return self.xp.concatenate(arrays, axis=axis)

    def take(self, x, indices, axis):
        """Entries ``indices`` (a list of ints) along ``axis``."""
        return self.xp.take(x, self.xp.asarray(indices), axis=axis)

    def contiguous(self, x):
        return self.xp.ascontiguousarray(x)

    # -- contractions ------------------------------------------------------------------
    def einsum(self, subscripts, *operands):
        return self.xp.einsum(subscripts, *operands, optimize=False)

    def tensordot(self, a, b, axes):
        return self.xp.tensordot(a, b, axes=axes)

    def matmul(self, a, b):
        return a @ b

    def add_(self, out, term):
        """``out += term`` where the backend allows it (no autograd history to protect)."""
        out += term
        return out

    def mul_add_(self, out, a, b):
        """``out += a * b`` (broadcasting ``b``) reusing ``out``'s memory."""
        out += a * b
        return out

    # -- padding -----------------------------------------------------------------------
    def pad_axis(self, x, axis, low, high, mode):
        """Pad one axis by ``low`` / ``high`` elements.

        ``mode`` is one of ``"zeros"``, ``"reflect"`` (mirror without repeating the edge, as
        torch), ``"replicate"`` (repeat the edge) or ``"circular"`` (wrap around).
        """
        if low == 0 and high == 0:
            return x
        if mode not in PADDING_MODES:
            raise ValueError(f"padding_mode={mode!r} is not one of {PADDING_MODES}")
        size = x.shape[axis]
        check_padding_fits(mode, low, high, size, f"axis {axis}")

        def take(start, stop):
            index = [slice(None)] * x.ndim
            index[axis] = slice(start, stop)
            return x[tuple(index)]

        pieces = []
        if low:
            if mode == "zeros":
                shape = list(x.shape)
                shape[axis] = low
                pieces.append(self.zeros(tuple(shape), like=x))
            elif mode == "reflect":
                pieces.append(self.flip(take(1, low + 1), axis))
            elif mode == "replicate":
                pieces.append(self.concat([take(0, 1)] * low, axis))
            else:
                pieces.append(take(size - low, size))
        pieces.append(x)
        if high:
            if mode == "zeros":
                shape = list(x.shape)
                shape[axis] = high
                pieces.append(self.zeros(tuple(shape), like=x))
            elif mode == "reflect":
                pieces.append(self.flip(take(size - 1 - high, size - 1), axis))
            elif mode == "replicate":
                pieces.append(self.concat([take(size - 1, size)] * high, axis))
            else:
                pieces.append(take(0, high))
        return self.concat(pieces, axis)

    def pad(self, x, pads, mode="zeros"):
        """Pad several axes; ``pads`` maps axis -> (low, high)."""
        for axis, (low, high) in pads.items():
            x = self.pad_axis(x, axis, low, high, mode)
        return x
