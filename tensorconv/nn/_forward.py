"""How a layer runs its convolution: eagerly through :func:`tensorconv.conv`, and under a tracer
(jit.trace, torch.compile, torch.export, ONNX export) as the opaque op or standard convs."""

from __future__ import annotations

import torch

from .. import accelerators
from ..backends import backend_for_name
from ..kernels import KruskalKernel, TuckerKernel
from ..plans.plan import conv
from ..plans.spec import normalize_padding

#: looked up once at import: a tracer must not see the backend registry filled in the middle of
#: a trace (dynamo guards on what it reads)
_TORCH = backend_for_name("torch")

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def _run_conv(x, parts, bias, layer):
    """``conv`` as a torch layer runs it, with ``layer``'s geometry. ``parts`` = (kind, tensors,
    groups, block-diagonal): ("cp", (lambda, U_T, U_C, U_0, ..), 1, False) or ("tucker", (core,
    U_T, U_C), core groups, whether U_T and U_C are stored by their diagonal blocks); U_C may be
    None (applied before). The kernel object is built only where a plan runs.

    Under autocast it computes in the autocast dtype as ``nn.ConvNd`` does (``conv`` would cast
    the rest, the bias is cast here); traced or compiled it records standard convs (a plan is
    chosen per input shape in Python, which a trace would freeze to one shape, and which a
    compiler would have to trace through), or, under torch.compile / torch.export on CPU, the
    plan as one opaque op (:func:`_traced_plan`)."""
    kind, tensors, groups, block = parts
    torch_backend = _TORCH
    cast = torch_backend.autocast_dtype(x)
    if cast is not None and (x.dtype != cast or tensors[0].dtype != cast):
        # nn.ConvNd casts input, weight and bias to the autocast dtype and returns that dtype;
        # inside, autocast is off so that every step stays in it
        tensors = tuple(None if t is None else t.to(cast) for t in tensors)
        with torch_backend.autocast_off(x):
            return _run_conv(x.to(cast), (kind, tensors, groups, block), None if bias is None else bias.to(cast), layer)
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        # a tracer (jit.trace, torch.compile, torch.export) records standard ops, not the Python
        # planning: shape-generic, and quick to compile; or, on CPU, the plan as one custom op
        out = _traced_plan(x, parts, layer)
        if out is None:
            out = _graph_conv(x, parts, layer)
    else:
        first, *factors = tensors
        kernel = KruskalKernel(first, factors) if kind == "cp" else TuckerKernel(first, factors, groups=groups)
        out = conv(
            x,
            kernel,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            padding_mode=layer.padding_mode,
            strategy=layer.strategy,
        )
    if bias is not None:
        out = out + bias.reshape((-1,) + (1,) * len(layer.kernel_size))
    return out


def _traced_plan(x, parts, layer):
    """Under torch.compile / torch.export (not jit.trace, not ONNX export, which need standard
    ops), a CP layer on a device that an accelerator serves (:func:`tensorconv.accelerators.for_device`)
    records one opaque op, ``tensorconv::cp_conv``, which runs the layer's plan for the shapes it
    meets when it runs (the accelerator where ``auto`` picks it), with its fake kernel and
    autograd registered (:mod:`tensorconv.nn._ops`): the compiled model runs what eager runs, for
    any input shape. None: record standard ops (which the compiler can fuse on its own)."""
    kind, tensors, _, _ = parts
    if kind != "cp" or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return None
    if x.ndim != len(layer.kernel_size) + 2 or not accelerators.for_device("torch", x.device.type):
        return None
    from ._ops import cp_conv

    lam, u_t, u_c, *spatial = tensors
    pads = normalize_padding(layer.padding, layer.kernel_size, layer.stride, layer.dilation)
    return cp_conv(
        x,
        lam,
        u_t,
        u_c,
        list(spatial),
        list(layer.stride),
        [p for pair in pads for p in pair],
        list(layer.dilation),
        layer.padding_mode,
        layer.strategy,
    )


def _graph_conv(x, parts, layer):
    """The conv as standard torch ops that a tracer records for any input shape (no plan, no
    compiled kernel): a CP kernel as 1x1 -> one depthwise conv per mode -> 1x1, a Tucker kernel
    as 1x1 -> (grouped) core conv -> 1x1, each an ``F.convNd``. Every op that is not a conv is
    code that torch.compile generates and compiles (seconds each on CPU), so weights are passed
    as views where the conv can read them so, and symmetric zero padding is left to the convs."""
    import torch.nn.functional as F

    n = len(layer.kernel_size)
    if n > 3:
        raise RuntimeError(
            f"tracing or compiling a {n}-D tensorconv layer: torch has no conv{n}d to record; "
            f"use 1-3 spatial dims there, or run it eagerly"
        )
    convnd = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    unit = (None,) * n  # indexing with these appends n unit modes to a weight (a view)
    unbatched = x.ndim == n + 1
    if unbatched:
        x = x.unsqueeze(0)
    pads = normalize_padding(layer.padding, layer.kernel_size, layer.stride, layer.dilation)
    native = layer.padding_mode == "zeros" and all(lo == hi for lo, hi in pads)
    if not native and any(p for lo_hi in pads for p in lo_hi):
        flat = [p for lo_hi in reversed(pads) for p in lo_hi]  # F.pad lists the last mode first
        pad = lambda h: F.pad(h, flat, mode=_PAD_MODES[layer.padding_mode])  # noqa: E731
    else:
        pad = lambda h: h  # noqa: E731
    kind, tensors, groups, block = parts
    if kind == "cp":
        lam, u_t, u_c, *spatial = tensors
        rank = int(lam.shape[0])
        # a 1x1 conv with U_C^T (R, C) as its weight, a transposed view: exported graphs hold a plain
        # Conv (ONNX Runtime's CPU kernels are tuned for Conv, not for a 1x1 ConvTranspose)
        h = x if u_c is None else convnd(x, u_c.t()[(...,) + unit])
        h = pad(h)
        for m, u in enumerate(spatial):
            if m == n - 1:
                u = u * lam  # lambda rides on the last depthwise weight (one small op instead of two)
            taps = [None] * n
            taps[m] = slice(None)
            stride, dilation, padding = [1] * n, [1] * n, [0] * n
            stride[m], dilation[m] = layer.stride[m], layer.dilation[m]
            padding[m] = pads[m][0] if native else 0
            # (K, R) -> depthwise weight (R, 1, .., K at mode m, ..), a view
            h = convnd(
                h, u.t()[(slice(None), None) + tuple(taps)], None, tuple(stride), tuple(padding), tuple(dilation), rank
            )
        out = convnd(h, u_t[(...,) + unit])
    else:
        core, u_t, u_c = tensors
        h = x
        if u_c is not None:
            if block:  # (C, R_in / g) by blocks -> grouped 1x1 weight (R_in, C / g)
                cg, ig = int(u_c.shape[0]) // groups, int(u_c.shape[1])
                w = u_c.reshape(groups, cg, ig).transpose(1, 2).reshape(groups * ig, cg)
            else:
                w = u_c.t()  # a view: the conv reads it as it is
            h = convnd(h, w[(...,) + unit], None, 1, 0, 1, groups if block else 1)
        h = convnd(
            pad(h), core, None, layer.stride, tuple(lo for lo, _ in pads) if native else 0, layer.dilation, groups
        )
        out = convnd(h, u_t[(...,) + unit], None, 1, 0, 1, groups if block else 1)
    return out[0] if unbatched else out
