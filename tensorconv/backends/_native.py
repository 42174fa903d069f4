"""A library's own convolutions, behind one small interface beside its array primitives.

A plan step that convolves (pointwise, depthwise, grouped) and a dense conv run on the
library's native kernels where it has fast ones (oneDNN / cuDNN through torch, XLA through
jax), and as loops over the kernel's taps, built from the array primitives, where it has none
(NumPy, CuPy). ``backend.native`` is the library's :class:`NativeConvs`.
"""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["NativeConvs"]


class NativeConvs:
    """What the plans ask of a library's convolutions; this base class has none (tap loops run)."""

    #: whether the library has native convs at all (a step asks :meth:`available` only then)
    exists = False

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def available(self, itemsize: int, device: Any = None) -> bool:
        """Whether plan steps of this dtype size on this device run as native convs (decided
        from the dtype and device alone: before any array exists, plans count what they allocate)."""
        return False

    def has_dims(self, n: int) -> bool:
        """Whether the library has native convs with ``n`` spatial dims (what a tracer records)."""
        return False

    def channels_last(
        self, act_shape, weight_shape, *, stride, dilation, padding, padding_mode, groups, itemsize=4, device=None
    ) -> Callable[..., Any] | None:
        """A grouped N-D convolution of channels-last activations (B, *D, C) of these static
        shapes, dtype size and device as ``run(act, weight, out=None)``, prepared once; None
        where the caller's tap loop runs. ``out``: a flat buffer of at least the output's size
        that ``run`` may write the output into (returning a view of it) instead of allocating
        one; ``run`` may ignore it."""
        return None

    def dense(self, x, weight, *, stride, dilation, groups=1, padding=None, padding_mode="zeros") -> Any:
        """The dense N-D cross-correlation, channels first: x (B, C, *D), weight (T, C/g, *K),
        ``padding`` one (low, high) pair per spatial mode; None where the library has none."""
        return None
