"""A CP convolution as one torch operator, planned when it runs: ``torch.ops.tensorconv.cp_conv``.

What a ``KruskalConv`` records under ``torch.compile`` / ``torch.export`` on CPU: a
``torch.library`` custom op whose implementation is :func:`tensorconv.conv` (the plan for the
shapes it meets at run time, whatever ``auto`` chooses there: the compiled plane chain, the
unfused order, the rebuilt dense kernel), with a fake implementation (the output's shape, from
the geometry, symbolic sizes allowed) and autograd registered: its backward is the op
``tensorconv::cp_conv_backward``, which recomputes the forward under autograd and returns every
gradient (one forward more than eager autograd, which keeps the plan's intermediates instead).
A tracer sees neither the planner's Python nor the kernels: one opaque op per layer, for any
input shape. Higher-order gradients through it are not supported (eager ones are).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..kernels import KruskalKernel
from ..plans.plan import conv
from ..plans.traced import register_recorder

__all__ = ["cp_conv"]

Tensor = torch.Tensor


def _pairs(flat):
    return tuple((int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2))


def _flat(x, lam, u_t, u_c, spatial):
    """The op's tensors as one list (U_C left out where it is None), the order of its gradients."""
    return [x, lam, u_t] + ([] if u_c is None else [u_c]) + list(spatial)


def _unflat(tensors, has_u_c):
    """(x, lam, U_T, U_C or None, [U_n]) from :func:`_flat`'s list."""
    x, lam, u_t = tensors[:3]
    return x, lam, u_t, (tensors[3] if has_u_c else None), list(tensors[4 if has_u_c else 3 :])


def _run(x, lam, u_t, u_c, spatial, stride, padding, dilation, padding_mode, strategy):
    kernel = KruskalKernel(lam, [u_t, u_c, *spatial])
    return conv(
        x,
        kernel,
        stride=tuple(stride),
        padding=_pairs(padding),
        dilation=tuple(dilation),
        padding_mode=padding_mode,
        strategy=strategy,
    )


@torch.library.custom_op("tensorconv::cp_conv", mutates_args=())
def cp_conv(
    x: Tensor,
    lam: Tensor,
    u_t: Tensor,
    u_c: Optional[Tensor],
    spatial: list[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    padding_mode: str,
    strategy: str,
) -> Tensor:
    """x (B, C, *D) -> (B, T, *D'): ``conv`` with the CP kernel (lam, U_T, U_C, U_0, ..) (U_C None:
    the identity, x has R channels); ``padding`` as (low, high) pairs, flattened."""
    with torch.no_grad():  # autograd is the op's own (registered below)
        out = _run(x, lam, u_t, u_c, spatial, stride, padding, dilation, padding_mode, strategy)
    return _channels_last(out)


def _channels_last(t):
    """(B, T, *D) with channels-last strides, as the fake kernel promises whatever the plan ran:
    a factorized plan returns such a view already (no copy), and the next layer's plan reads it
    without a transpose (eager layers hand each other the same layout)."""
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


@cp_conv.register_fake
def _cp_conv_fake(x, lam, u_t, u_c, spatial, stride, padding, dilation, padding_mode, strategy):
    out = [x.shape[0], u_t.shape[0]]
    for m, u in enumerate(spatial):
        k = u.shape[0]
        size = x.shape[2 + m] + padding[2 * m] + padding[2 * m + 1] - dilation[m] * (k - 1) - 1
        out.append(size // stride[m] + 1)
    return x.new_empty(out[:1] + out[2:] + out[1:2]).movedim(-1, 1)


def _autograd_inside_an_op():
    """A custom op's implementation runs below autograd (its dispatch keys excluded for the
    thread); the backward op records its recomputed forward, so it lifts that exclusion."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in ("AutogradOther", "AutogradCPU", "AutogradCUDA", "ADInplaceOrView"):
        exclude = exclude.remove(getattr(torch._C.DispatchKey, key))
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


@torch.library.custom_op("tensorconv::cp_conv_backward", mutates_args=())
def cp_conv_backward(
    grad: Tensor,
    x: Tensor,
    lam: Tensor,
    u_t: Tensor,
    u_c: Optional[Tensor],
    spatial: list[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    padding_mode: str,
    strategy: str,
) -> list[Tensor]:
    """The gradients of :func:`cp_conv` for x, lam, U_T, U_C (if any) and each U_n, in that
    order: its forward recomputed under autograd (the plan's own backward, e.g. the chain's)."""
    leaves = [t.detach().requires_grad_(True) for t in _flat(x, lam, u_t, u_c, spatial)]
    with _autograd_inside_an_op(), torch.enable_grad():
        out = _run(*_unflat(leaves, u_c is not None), stride, padding, dilation, padding_mode, strategy)
        grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    # contiguous, as the fake kernel promises (the input's gradient may come back channels-last)
    return [torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, leaves)]


@cp_conv_backward.register_fake
def _cp_conv_backward_fake(grad, x, lam, u_t, u_c, spatial, stride, padding, dilation, padding_mode, strategy):
    # contiguous whatever the inputs' layout, as the real op returns (empty_like would keep a
    # channels-last x's strides, and a compiler would then read the real gradient wrongly)
    return [t.new_empty(t.shape) for t in _flat(x, lam, u_t, u_c, spatial)]


def _setup_context(ctx, inputs, output):
    x, lam, u_t, u_c, spatial, *geometry = inputs
    ctx.geometry = geometry
    ctx.has_u_c = u_c is not None
    ctx.save_for_backward(*_flat(x, lam, u_t, u_c, spatial))


def _backward(ctx, grad):
    inputs = _unflat(ctx.saved_tensors, ctx.has_u_c)
    grads = cp_conv_backward(grad.contiguous(), *inputs, *ctx.geometry)
    return (*_unflat(grads, ctx.has_u_c), None, None, None, None, None)


cp_conv.register_autograd(_backward, setup_context=_setup_context)


def _record(x, kernel, stride, pads, dilation, padding_mode, strategy):
    """What torch.compile / torch.export record for a CP kernel laid out as a layer's."""
    u_t, u_c, *spatial = kernel.factors
    flat = [p for pair in pads for p in pair]
    return cp_conv(x, kernel.weights, u_t, u_c, spatial, list(stride), flat, list(dilation), padding_mode, strategy)


register_recorder("torch", _record)
