"""JAX backend: the shared array-module code with ``xp = jax.numpy``, made functional.

JAX arrays are immutable and traced under ``jax.jit`` / ``jax.grad`` / ``jax.vmap``, so only
what differs from NumPy lives here: out-of-place accumulation, dtype checks (float64 needs
``jax_enable_x64``), and native convolutions through ``jax.lax.conv_general_dilated`` (XLA).
Plans depend on shapes only, which JAX keeps static under tracing, so a traced call plans
exactly as an eager one; nothing here reads an array's values except :meth:`all_finite`,
which cannot look inside a trace and says so by returning True there.
"""

from __future__ import annotations

import numpy

from ._base import ArrayBackend
from ._native import NativeConvs
from ._runtime import Runtime

_WIDE = {numpy.dtype("float64"), numpy.dtype("complex128")}


class JaxBackend(ArrayBackend):
    name = "jax"

    def __init__(self):
        import jax
        import jax.numpy as jnp

        super().__init__(jnp)
        self.jax = jax
        self.lax = jax.lax
        self.native = JaxConvs(self)
        self.runtime = JaxRuntime(self)

    # -- array attributes and creation -------------------------------------------------
    def device(self, x):
        # JAX places arrays itself (device_put, committed arrays); a traced value has no
        # device to compare, so kernels and plans do not key on it
        return None

    def _is_tracer(self, x):
        return isinstance(x, self.jax.core.Tracer)

    def resolve_dtype(self, dtype):
        dt = numpy.dtype(dtype) if dtype is not None else numpy.dtype("float64")
        if dt in _WIDE and not self.jax.config.jax_enable_x64:
            # jax would truncate to 32 bits with only a warning
            raise ValueError(
                f"dtype={dt.name} on jax needs 64-bit mode: call jax.config.update('jax_enable_x64', True) "
                f"before creating arrays, or pass dtype='float32'"
            )
        return dt

    def asarray(self, data, *, dtype=None, device=None):
        out = self.xp.asarray(data, dtype=self.resolve_dtype(dtype) if dtype is not None else None)
        return self.jax.device_put(out, device) if device is not None else out

    def astype(self, x, dtype):
        return x.astype(self.resolve_dtype(dtype))

    def random_normal(self, shape, *, seed, dtype=None, device=None):
        # drawn on the host with NumPy's generator: the same numbers as the numpy backend
        host = numpy.random.default_rng(seed).standard_normal(shape)
        return self.asarray(host, dtype=self.resolve_dtype(dtype), device=device)

    def all_finite(self, x):
        if self._is_tracer(x):
            return True  # values are unknown while tracing; checked on concrete arrays only
        return bool(self.xp.isfinite(x).all())

    # -- conversion --------------------------------------------------------------------
    def to_numpy(self, x):
        if self._is_tracer(x):
            raise TypeError(
                "a traced jax value (inside jax.jit / grad / vmap) cannot be copied to the host; "
                "call this outside the transformed function"
            )
        return numpy.asarray(x)

    def from_numpy(self, a, *, like=None, dtype=None, device=None):
        if like is not None:
            dt = like.dtype
        elif dtype is not None:
            dt = self.resolve_dtype(dtype)
        else:
            dt = numpy.asarray(a).dtype
            if dt in _WIDE:
                dt = self.resolve_dtype(dt)
        out = self.xp.asarray(a, dtype=dt)
        return self.jax.device_put(out, device) if device is not None else out

    # -- shape manipulation and contractions ---------------------------------------------
    def contiguous(self, x):
        return x  # XLA chooses layouts

    def einsum(self, subscripts, *operands):
        return self.xp.einsum(subscripts, *operands)

    def add_(self, out, term):
        return out + term  # immutable arrays: the caller keeps the returned value

    def mul_add_(self, out, a, b):
        return out + a * b

    def pad_axis(self, x, axis, low, high, mode):
        if mode == "zeros" and (low or high):
            widths = [(0, 0)] * x.ndim
            widths[axis % x.ndim] = (low, high)
            return self.xp.pad(x, widths)
        return super().pad_axis(x, axis, low, high, mode)


class JaxConvs(NativeConvs):
    """XLA's convolutions (``lax.conv_general_dilated``) behind :class:`NativeConvs`."""

    exists = True

    def has_dims(self, n):
        return n >= 1  # lax.conv_general_dilated takes any number

    def available(self, itemsize, device=None):
        return True  # XLA compiles grouped N-D convolutions for every float dtype and device

    def _conv(self, x, weight, *, channels_last, stride, dilation, groups, padding, padding_mode):
        n = x.ndim - 2
        first = 1 if channels_last else 2
        pads = [(0, 0)] * n
        if padding is not None and any(lo or hi for lo, hi in padding):
            if padding_mode == "zeros":
                pads = [tuple(p) for p in padding]  # XLA pads inside the conv (asymmetric allowed)
            else:
                x = self.backend.pad(x, {first + m: p for m, p in enumerate(padding) if p != (0, 0)}, padding_mode)
        spatial = tuple(range(first, first + n))
        lhs = (0, x.ndim - 1) + spatial if channels_last else (0, 1) + spatial
        dims = self.backend.lax.ConvDimensionNumbers(lhs_spec=lhs, rhs_spec=tuple(range(n + 2)), out_spec=lhs)
        return self.backend.lax.conv_general_dilated(
            x,
            weight,
            tuple(stride),
            pads,
            rhs_dilation=tuple(dilation),
            dimension_numbers=dims,
            feature_group_count=groups,
        )

    def dense(self, x, weight, *, stride, dilation, groups=1, padding=None, padding_mode="zeros"):
        return self._conv(
            x,
            weight,
            channels_last=False,
            stride=stride,
            dilation=dilation,
            groups=groups,
            padding=padding,
            padding_mode=padding_mode,
        )

    def channels_last(
        self, act_shape, weight_shape, *, stride, dilation, padding, padding_mode, groups, itemsize=4, device=None
    ):
        """``run(act, weight, out=None)``: one XLA convolution of channels-last (B, *D, C) activations, or
        None for depthwise steps: XLA's CPU grouped convolution with one channel per group runs
        far below its elementwise code, so the caller's tap loop (fused by XLA) runs those."""
        if groups > 1 and int(weight_shape[1]) == 1:
            return None

        def run(act, weight, out=None):  # out is ignored: jax arrays are immutable
            return self._conv(
                act,
                weight,
                channels_last=True,
                stride=stride,
                dilation=dilation,
                groups=groups,
                padding=padding,
                padding_mode=padding_mode,
            )

        return run


class JaxRuntime(Runtime):
    """jax's runtime: a plan runs as one jitted program."""

    def compile_plan(self, run):
        # eager JAX compiles every op for every new shape; one program per plan compiles once
        # and lets XLA fuse the steps. Under a caller's jit it is inlined into the caller's trace.
        return self.backend.jax.jit(run)
