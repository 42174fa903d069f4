"""What a tracer records for :func:`tensorconv.conv`: the plan's steps as the library's standard
convs, or one opaque op that a framework registered for it.

A plan is chosen in Python for one input shape; a tracer (torch.jit.trace, ONNX export,
torch.compile, torch.export) would freeze that choice to the shape it saw. So under a tracer
``conv()`` records a shape-generic form instead: a CP kernel as 1x1 -> one depthwise conv per
spatial mode -> 1x1, a Tucker kernel as 1x1 -> (grouped) core conv -> 1x1, each a native conv of
the library (``backend.native.dense``), any other kernel rebuilt dense and convolved once (a CP
kernel too where a trace for export sees fixed sizes and the eager plan for them rebuilds it:
:func:`rebuilt_when_traced`). Where a
compiler may record a custom op (:meth:`Runtime.tracer` says ``"compile"``) and an accelerator
serves the input's device, a CP kernel is recorded as the op registered with
:func:`register_recorder` (torch's ``tensorconv::cp_conv``, which runs the plan when the compiled
program runs).
"""

from __future__ import annotations

from typing import Callable

from .. import accelerators
from ..backends import PADDING_MODES, device_type
from ..kernels import KruskalKernel, TuckerKernel
from .planner import STRATEGIES
from .spec import normalize_int_tuple, normalize_padding

__all__ = ["rebuilt_when_traced", "register_recorder", "traced_conv", "traced_geometry"]

#: backend name -> record(x, kernel, stride, pads, dilation, padding_mode, strategy) -> array or None
_RECORDERS: dict = {}


def register_recorder(backend_name: str, record: Callable) -> None:
    """Let a compiler record a CP conv on ``backend_name`` as one opaque op: ``record(x, kernel,
    stride, pads, dilation, padding_mode, strategy)`` returns the op's output (or None: record
    standard convs). Registered by the layer package that defines the op (:mod:`tensorconv.nn`)."""
    _RECORDERS[backend_name] = record


def traced_geometry(x, kernel, stride, padding, dilation, padding_mode, strategy):
    """The geometry checked and normalised from the kernel alone: under a tracer the input's sizes
    may be symbolic, and nothing that a tracer would turn into a guard is read from them."""
    kernel_size = tuple(int(k) for k in kernel.shape[2:])
    n = len(kernel_size)
    if x.ndim not in (n + 1, n + 2):
        raise ValueError(
            f"x has {x.ndim} dims but a kernel with {n} spatial modes expects (B, C, *{n} dims) or (C, *{n} dims)"
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode={padding_mode!r} is not one of {PADDING_MODES}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {STRATEGIES}")
    stride = normalize_int_tuple(stride, n, "stride", minimum=1)
    dilation = normalize_int_tuple(dilation, n, "dilation", minimum=1)
    pads = normalize_padding(padding, kernel_size, stride, dilation)
    return dict(stride=stride, pads=pads, dilation=dilation, padding_mode=padding_mode, strategy=strategy)


def _has_layer_layout(kernel, n):
    """A CP kernel laid out as a layer's: [U_T, U_C or None, U_0, ..., U_{n-1}], one mode each."""
    return (
        kernel.modes == [(i,) for i in range(n + 2)]
        and kernel.factors[0] is not None
        and all(f is not None for f in kernel.factors[2:])
    )


def rebuilt_when_traced(runtime, tracer, x, kernel, strategy, plan_for):
    """Whether a traced CP conv records its kernel rebuilt dense: ``strategy="reconstructed"``,
    or ``"auto"`` under a trace for export at fixed sizes where the eager plan for the traced
    shape (``plan_for(shape)``) rebuilds it, or runs an accelerator (which the graph cannot
    hold) where the plan without one (``plan_for(shape, ())``) rebuilds it. The graph holds one
    form for every shape, and ONNX Runtime runs what it holds: a factors' chain where the plan
    rebuilds the kernel runs slower there as well. (CP kernels laid out as a layer's, with U_C:
    a Tucker kernel's chain is the bottleneck, one core conv.)"""
    if not (
        isinstance(kernel, KruskalKernel)
        and _has_layer_layout(kernel, len(kernel.shape) - 2)
        and kernel.factors[1] is not None
    ):
        return False
    if strategy != "auto" or tracer != "trace":
        return strategy == "reconstructed"
    with runtime.untraced():  # nothing planning reads is recorded
        shape = runtime.static_shape(x)
        if shape is None:
            return False
        plan = plan_for(shape)
        if plan.accelerator is not None:
            plan = plan_for(shape, ())
        return plan.strategy == "reconstructed"


def traced_conv(backend, tracer, x, kernel, *, stride, pads, dilation, groups, padding_mode, strategy, rebuild=False):
    """``conv(x, kernel, ...)`` as a tracer should record it; ``pads``: (low, high) per mode.
    ``rebuild``: record the kernel rebuilt dense and one conv (as :func:`rebuilt_when_traced`
    decides)."""
    n = len(pads)
    if rebuild:  # rebuilt_when_traced said yes: a layer-shaped CP kernel with U_C
        chain = _kruskal_rebuilt
    elif isinstance(kernel, KruskalKernel) and _has_layer_layout(kernel, n):
        record = _RECORDERS.get(backend.name) if tracer == "compile" else None
        if (
            record is not None
            and x.ndim == n + 2
            and accelerators.for_device(backend.name, device_type(backend.device(x)))
        ):
            out = record(x, kernel, stride, pads, dilation, padding_mode, strategy)
            if out is not None:
                return out
        chain = _kruskal_steps
    elif isinstance(kernel, TuckerKernel) and all(f is None for f in kernel.factors[2:]):
        chain = _tucker_steps
    else:
        chain = _dense
    if not backend.native.has_dims(n):
        raise RuntimeError(
            f"tracing or compiling a {n}-D convolution on {backend.name}: the library has no native "
            f"{n}-D conv to record; use 1-3 spatial dims there, or run it eagerly"
        )
    unbatched = x.ndim == n + 1
    h = x[None] if unbatched else x
    native = padding_mode == "zeros" and all(lo == hi for lo, hi in pads)
    if not native and any(p for pair in pads for p in pair):
        h = backend.pad(h, {2 + m: pair for m, pair in enumerate(pads)}, padding_mode)
        pads = ((0, 0),) * n
    out = chain(backend, h, kernel, stride, pads, dilation, groups)
    return out[0] if unbatched else out


def _one_mode(n, m, value, rest):
    out = [rest] * n
    out[m] = value
    return tuple(out)


def _kruskal_steps(backend, h, kernel, stride, pads, dilation, groups):
    conv = backend.native.dense
    n = len(pads)
    unit = (None,) * n  # indexing with these appends n unit modes to a weight (a view)
    u_t, u_c, *spatial = kernel.factors
    rank = kernel.rank
    if u_c is not None:
        # U_C^T (R, C) as a 1x1 weight, a transposed view: exported graphs hold a plain Conv (ONNX
        # Runtime's CPU kernels are tuned for Conv, not for a 1x1 ConvTranspose)
        h = conv(h, u_c.T[(...,) + unit], stride=(1,) * n, dilation=(1,) * n)
    for m, u in enumerate(spatial):
        if m == n - 1:
            u = u * kernel.weights  # lambda rides on the last depthwise weight (one small op, not two)
        taps = _one_mode(n, m, slice(None), None)
        # (K, R) -> depthwise weight (R, 1, .., K at mode m, ..), a view
        h = conv(
            h,
            u.T[(slice(None), None) + taps],
            stride=_one_mode(n, m, stride[m], 1),
            dilation=_one_mode(n, m, dilation[m], 1),
            padding=_one_mode(n, m, pads[m], (0, 0)),
            groups=rank,
        )
    return conv(h, u_t[(...,) + unit], stride=(1,) * n, dilation=(1,) * n)


def _kruskal_rebuilt(backend, h, kernel, stride, pads, dilation, groups):
    """The CP kernel rebuilt dense and convolved once, by broadcast products and one matmul: ops
    a tracer records as they are (an einsum of more than two operands plans its order from the
    factors' sizes, which a trace would read and freeze)."""
    u_t, u_c, *spatial = kernel.factors
    p = u_c * kernel.weights  # (C, R)
    for m, u in enumerate(spatial):  # (C, K_0, .., K_m, R): one more mode each
        p = p[(slice(None),) * (m + 1) + (None,)] * u[(None,) * (m + 1)]
    weight = backend.moveaxis(backend.matmul(p, backend.moveaxis(u_t, 0, 1)), -1, 0)  # (T, C, *K)
    return backend.native.dense(h, weight, stride=stride, dilation=dilation, padding=pads, groups=groups)


def _tucker_steps(backend, h, kernel, stride, pads, dilation, groups):
    conv = backend.native.dense
    n = len(pads)
    unit = (None,) * n
    g = kernel.groups
    u_t, u_c = kernel.factors[:2]
    block_t, block_c = kernel.block_diagonal
    if u_c is not None:
        if block_c:  # (C, R_in / g) by blocks -> grouped 1x1 weight (R_in, C / g)
            cg = kernel.shape[1] // g
            w = backend.reshape(backend.permute(backend.reshape(u_c, (g, cg, -1)), (0, 2, 1)), (-1, cg))
        else:
            w = u_c.T  # a view: the conv reads it as it is
        h = conv(h, w[(...,) + unit], stride=(1,) * n, dilation=(1,) * n, groups=g if block_c else 1)
    h = conv(h, kernel.core, stride=stride, dilation=dilation, padding=pads, groups=g)
    if u_t is None:
        return h
    return conv(h, u_t[(...,) + unit], stride=(1,) * n, dilation=(1,) * n, groups=g if block_t else 1)


def _dense(backend, h, kernel, stride, pads, dilation, groups):
    if isinstance(kernel, TuckerKernel) and kernel.is_grouped_conv:
        weight, groups = kernel.to_grouped_dense(), kernel.groups
    elif isinstance(kernel, (KruskalKernel, TuckerKernel)):
        weight = kernel.to_dense()
    else:
        weight = kernel
    return backend.native.dense(h, weight, stride=stride, dilation=dilation, padding=pads, groups=groups)
