"""``ConvProblem``: what a plan is made for, checked once, frozen, and the key of conv()'s cache.

Everything a plan's decisions depend on is here and nothing else: the kernel's structure, the
input's shape, the geometry as given, the dtype's size, whose cost model prices the steps,
which accelerators are ready (auto weighs only those) and which the caller allows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ..accelerators import registered as registered_accelerators
from ..backends import device_type, get_backend
from ..backends._base import FLOAT_ITEMSIZES
from ..kernels import KruskalKernel, TuckerKernel
from .cost import CostModel, cost_model_for
from .planner import STRATEGIES
from .spec import ConvGeometry, make_geometry
from .structure import KernelStructure, structure_of

__all__ = ["ConvProblem", "problem_for", "itemsize_of", "check_arrays", "kernel_arrays"]


def itemsize_of(dtype):
    """Bytes per element of ``dtype`` (a name, a numpy / torch dtype, or an itemsize in bytes)."""
    if dtype is None:
        return 4
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        if dtype not in (2, 4, 8, 16):
            raise ValueError(f"dtype={dtype!r} as an itemsize must be 2, 4, 8 or 16 bytes")
        return dtype
    name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
    if name not in FLOAT_ITEMSIZES:
        raise ValueError(f"dtype={dtype!r} is not one of {sorted(FLOAT_ITEMSIZES)}")
    return FLOAT_ITEMSIZES[name]


def _check_shape(shape, name="input_shape"):
    """A tuple of ints from ``shape``; floats, bools and negative sizes are errors, never truncated."""
    try:
        entries = tuple(shape)
    except TypeError:
        raise TypeError(f"{name} must be a tuple of ints, got {shape!r}") from None
    out = []
    for v in entries:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise TypeError(f"{name}={shape!r} must hold ints, got {v!r} ({type(v).__name__})")
        v = int(v.__index__())
        if v < 0:
            raise ValueError(f"{name}={shape!r} has a negative size {v}")
        out.append(v)
    return tuple(out)


def kernel_arrays(kernel):
    """The arrays of a kernel (none for a shape tuple or a structure)."""
    if isinstance(kernel, KruskalKernel):
        return [kernel.weights] + [f for f in kernel.factors if f is not None]
    if isinstance(kernel, TuckerKernel):
        return [kernel.core] + [f for f in kernel.factors if f is not None]
    if isinstance(kernel, (tuple, KernelStructure)):
        return []
    return [kernel]


def check_arrays(x, kernel, backend=None):
    """The backend of x and every array of the kernel (one library, one dtype, or an error);
    ``backend``: theirs, where the caller has looked it up already."""
    arrays = [x] + (kernel_arrays(kernel) or [kernel])
    backend = backend or get_backend(*arrays)
    ref = arrays[1]
    for name, a in (("x", x), ("the kernel", ref)):
        if not backend.is_inexact(a):
            # integer products would wrap around silently (int8: 540000 -> 96); torch's conv refuses them too
            raise TypeError(
                f"{name} has dtype {backend.dtype_name(a)}: convolutions need a floating (or complex) "
                f"dtype; convert it first, e.g. x.astype('float32') / x.float()"
            )
    if backend.dtype(x) != backend.dtype(ref):
        raise TypeError(
            f"x has dtype {backend.dtype_name(x)} but the kernel has dtype {backend.dtype_name(ref)}; "
            f"convert one of them (nothing is cast implicitly)"
        )
    return backend


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


@dataclass(frozen=True, eq=False)
class ConvProblem:
    """One convolution to plan; equal problems get equal plans (conv() caches plans by it).

    ``stride``, ``padding`` and ``dilation`` are held as given (hashable); :attr:`geometry`
    normalises and checks them against the input's shape."""

    structure: KernelStructure
    input_shape: tuple
    stride: Any
    padding: Any
    dilation: Any
    padding_mode: str
    strategy: str
    itemsize: int
    backend_name: str
    cost_model: CostModel
    #: accelerators ready here (built before, never now): auto weighs them in
    ready_accelerators: tuple = ()
    #: the accelerators the caller allows by name (None: all)
    allowed_accelerators: tuple | None = None
    #: selects the cost model and what the library's convs allocate (its type is compared)
    device: Any = None

    def __post_init__(self):
        # conv() looks a plan up by its problem on every call: the key and its hash once
        key = (
            self.structure,
            self.input_shape,
            self.stride,
            self.padding,
            self.dilation,
            self.padding_mode,
            self.strategy,
            self.itemsize,
            self.backend_name,
            self.cost_model,
            self.ready_accelerators,
            self.allowed_accelerators,
            device_type(self.device),
        )
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_hash", hash(key))

    def __eq__(self, other):
        return isinstance(other, ConvProblem) and self._hash == other._hash and self._key == other._key

    def __hash__(self):
        return self._hash

    @functools.cached_property
    def batched(self) -> bool:
        """Whether the input has a batch mode: (B, C, *D) rather than (C, *D)."""
        st, shape = self.structure, self.input_shape
        n = st.n_spatial
        if len(shape) not in (n + 1, n + 2):
            raise ValueError(
                f"input of shape {shape} does not match a kernel with {n} spatial dims "
                f"(kernel shape {st.shape}): expected (B, C, *{n} dims) or (C, *{n} dims)"
            )
        batched = len(shape) == n + 2
        c = shape[1] if batched else shape[0]
        if c != st.in_channels:
            raise ValueError(
                f"channel mismatch: the input has {c} channels (shape {shape}) but the kernel expects "
                f"{st.in_channels} (kernel shape {st.shape}" + (f", groups={st.groups})" if st.groups > 1 else ")")
            )
        return batched

    @property
    def batch(self) -> int:
        return self.input_shape[0] if self.batched else 1

    @functools.cached_property
    def geometry(self) -> ConvGeometry:
        spatial = self.input_shape[2:] if self.batched else self.input_shape[1:]
        return make_geometry(
            spatial,
            self.structure.shape[2:],
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            padding_mode=self.padding_mode,
        )


def problem_for(
    kernel_or_shape,
    input_shape,
    *,
    stride=1,
    padding=0,
    dilation=1,
    groups=1,
    padding_mode="zeros",
    strategy="auto",
    dtype=None,
    backend=None,
    device=None,
    cost_model=None,
    accelerators=None,
) -> ConvProblem:
    """The problem of :func:`~tensorconv.plans.plan_conv`'s arguments, checked (errors name the
    argument); the geometry is checked when a plan asks for it."""
    structure = structure_of(kernel_or_shape, groups)
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    arrays = kernel_arrays(kernel_or_shape) if backend is None or dtype is None else []
    if arrays:
        owner = get_backend(*arrays)
        if backend is None:
            backend, device = owner, owner.device(arrays[0]) if device is None else device
        if dtype is None:
            dtype = owner.itemsize(arrays[0])
    backend_name = getattr(backend, "name", backend) or "numpy"
    if cost_model is not None and not isinstance(cost_model, CostModel):
        raise TypeError(f"cost_model={cost_model!r} is not a CostModel (or None for the backend's default)")
    model = cost_model or cost_model_for(backend_name, device)
    input_shape = _check_shape(input_shape)
    itemsize = itemsize_of(dtype)
    if accelerators is not None:
        if isinstance(accelerators, str):
            raise TypeError(f"accelerators={accelerators!r} must be a sequence of names, e.g. ({accelerators!r},)")
        known = [a.name for a in registered_accelerators()]
        unknown = [a for a in accelerators if a not in known]
        if unknown:
            raise ValueError(f"accelerators={tuple(accelerators)!r}: {unknown} not registered; registered: {known}")
    ready = ()
    if strategy == "auto" and structure.kind != "dense" and len(input_shape) == 2 + structure.n_spatial:
        # part of the problem: building an accelerator later changes what conv() plans next
        ready = tuple(
            a.name
            for a in registered_accelerators()
            if (accelerators is None or a.name in accelerators)
            and "auto" in a.serves
            and a.applies(structure)
            and a.ready(backend_name, device, itemsize)
        )
    return ConvProblem(
        structure,
        input_shape,
        _hashable(stride),
        _hashable(padding),
        _hashable(dilation),
        padding_mode,
        strategy,
        itemsize,
        backend_name,
        model,
        ready,
        None if accelerators is None else tuple(accelerators),
        device,
    )
