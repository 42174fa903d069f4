"""Convolution geometry: stride / padding / dilation normalised per spatial mode.

Conventions are torch's ``ConvNd``: cross-correlation, output size
``floor((D + pad_lo + pad_hi - dilation * (K - 1) - 1) / stride) + 1``, and ``padding="same"``
puts the odd extra element on the high side.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from .._checks import is_integral
from ..backends import PADDING_MODES
from ..backends._base import check_padding_fits

__all__ = ["ConvGeometry", "make_geometry", "normalize_int_tuple", "normalize_padding"]


def normalize_int_tuple(value, n, name, *, minimum):
    """``value`` (int or length-``n`` sequence) -> tuple of ``n`` ints >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    if is_integral(value):
        values = (value,) * n
    else:
        try:
            values = tuple(value)
        except TypeError:
            raise TypeError(f"{name} must be an int or a tuple of {n} ints, got {value!r}") from None
        if len(values) != n:
            raise ValueError(f"{name}={value!r} has {len(values)} entries but the convolution has {n} spatial dims")
    for v in values:
        if not is_integral(v):
            raise TypeError(f"{name} must hold ints, got {value!r}")
        if operator.index(v) < minimum:
            raise ValueError(f"{name}={value!r}: every entry must be >= {minimum}")
    return tuple(operator.index(v) for v in values)


def normalize_padding(padding, kernel_size, stride, dilation):
    """Per-mode (low, high) pairs from an int, per-mode ints / pairs, "same" or "valid"."""
    n = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * n
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(
                    f"padding='same' needs stride 1 in every mode, got stride={stride}: with a "
                    f"larger stride no padding makes the output as large as the input"
                )
            pads = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"padding={padding!r} is not one of 'same', 'valid', an int or a tuple")
    if isinstance(padding, bool):
        raise TypeError(f"padding must be an int, a tuple or 'same'/'valid', got {padding!r}")
    if isinstance(padding, int):
        if padding < 0:
            raise ValueError(f"padding={padding} must be >= 0")
        return ((padding, padding),) * n
    try:
        entries = tuple(padding)
    except TypeError:
        raise TypeError(f"padding must be an int, a tuple or 'same'/'valid', got {padding!r}") from None
    if len(entries) != n:
        raise ValueError(f"padding={padding!r} has {len(entries)} entries but the convolution has {n} spatial dims")
    pads = []
    for entry in entries:
        if isinstance(entry, int) and not isinstance(entry, bool):
            pair = (entry, entry)
        else:
            try:
                pair = tuple(entry)
            except TypeError:
                raise TypeError(f"padding entries must be ints or (low, high) pairs, got {padding!r}") from None
            if len(pair) != 2 or any(isinstance(p, bool) or not isinstance(p, int) for p in pair):
                raise ValueError(f"padding entries must be ints or (low, high) pairs of ints, got {padding!r}")
        if min(pair) < 0:
            raise ValueError(f"padding={padding!r}: every entry must be >= 0")
        pads.append((int(pair[0]), int(pair[1])))
    return tuple(pads)


@dataclass(frozen=True)
class ConvGeometry:
    """Per-mode geometry of one convolution; every field has one entry per spatial mode."""

    in_spatial: tuple
    kernel_size: tuple
    stride: tuple
    padding: tuple  # ((low, high), ...)
    dilation: tuple
    padding_mode: str = "zeros"

    @property
    def n_spatial(self):
        return len(self.kernel_size)

    @property
    def out_spatial(self):
        return tuple(
            (d + lo + hi - dil * (k - 1) - 1) // s + 1
            for d, (lo, hi), dil, k, s in zip(
                self.in_spatial, self.padding, self.dilation, self.kernel_size, self.stride
            )
        )

    @property
    def padded_spatial(self):
        """The input's size per mode once padded."""
        return tuple(d + lo + hi for d, (lo, hi) in zip(self.in_spatial, self.padding))

    @property
    def is_symmetric_padding(self):
        return all(lo == hi for lo, hi in self.padding)


def make_geometry(in_spatial, kernel_size, *, stride=1, padding=0, dilation=1, padding_mode="zeros"):
    """Validate and normalise a convolution's geometry (errors name the argument)."""
    n = len(kernel_size)
    if n < 1:
        raise ValueError("a convolution needs at least one spatial mode")
    in_spatial = tuple(int(d) for d in in_spatial)
    if len(in_spatial) != n:
        raise ValueError(
            f"the input has {len(in_spatial)} spatial dims {in_spatial} but the kernel has {n} "
            f"(kernel_size={tuple(kernel_size)}); expected input shape (B, C, {', '.join('D%d' % i for i in range(n))})"
        )
    kernel_size = normalize_int_tuple(tuple(kernel_size), n, "kernel_size", minimum=1)
    stride = normalize_int_tuple(stride, n, "stride", minimum=1)
    dilation = normalize_int_tuple(dilation, n, "dilation", minimum=1)
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode={padding_mode!r} is not one of {PADDING_MODES}")
    pads = normalize_padding(padding, kernel_size, stride, dilation)
    for i, (d, (lo, hi), k, dil) in enumerate(zip(in_spatial, pads, kernel_size, dilation)):
        span = dil * (k - 1) + 1
        if d < 1:
            raise ValueError(f"input spatial mode {i} is empty (input spatial shape {in_spatial})")
        if span > d + lo + hi:
            raise ValueError(
                f"kernel_size={kernel_size} with dilation={dilation} spans {span} positions along spatial "
                f"mode {i}, but the padded input has only {d + lo + hi} ({d} + padding {lo}+{hi})"
            )
        check_padding_fits(padding_mode, lo, hi, d, f"spatial mode {i}")
    return ConvGeometry(in_spatial, kernel_size, stride, pads, dilation, padding_mode)
