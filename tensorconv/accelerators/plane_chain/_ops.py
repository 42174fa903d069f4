"""The plane chain as torch operators: ``torch.ops.tensorconv.cp_chain`` and its backward.

Both are ``torch.library`` custom ops with fake (shape-only) implementations, so
``torch.compile`` and ``torch.export`` see one opaque op where the kernel runs instead of tracing
into it; the forward op's autograd is registered with it (the backward op, stride 1). A call
that needs no gradients and is not traced goes to the library directly (the dispatcher's
per-call work shows at small channel counts). Importing this module imports torch.
"""

from __future__ import annotations

import torch

from . import _build

__all__ = ["cp_chain_forward", "reference_chain"]

Tensor = torch.Tensor


def _forward_impl(x, lam, u_t, u_c, u0, u1, u2, out_spatial, stride, pad_lo, dilation, out=None):
    module = _build.load()
    if module is None:
        raise RuntimeError("tensorconv::cp_chain: the plane chain's library is not available here")
    # lambda folded and the factors laid out in C++ (cheaper there than five torch ops here)
    return module.cp_chain_forward_kruskal(
        x, lam, u_t, u_c, u0, u1, u2, list(out_spatial), list(stride), list(pad_lo), list(dilation), out
    )


@torch.library.custom_op("tensorconv::cp_chain", mutates_args=())
def cp_chain(
    x: Tensor,
    lam: Tensor,
    u_t: Tensor,
    u_c: Tensor,
    u0: Tensor,
    u1: Tensor,
    u2: Tensor,
    out_spatial: list[int],
    stride: list[int],
    pad_lo: list[int],
    dilation: list[int],
) -> Tensor:
    """x (B, C, D, H, W) -> (B, D', H', W', T) channels-last (see :func:`cp_chain_forward`)."""
    return _forward_impl(x, lam, u_t, u_c, u0, u1, u2, out_spatial, stride, pad_lo, dilation)


@cp_chain.register_fake
def _cp_chain_fake(x, lam, u_t, u_c, u0, u1, u2, out_spatial, stride, pad_lo, dilation):
    return x.new_empty((x.shape[0], *out_spatial, u_t.shape[0]))


@torch.library.custom_op("tensorconv::cp_chain_backward", mutates_args=())
def cp_chain_backward(
    x: Tensor,
    u_c: Tensor,
    u0: Tensor,
    u1: Tensor,
    u2: Tensor,
    wt: Tensor,
    grad: Tensor,
    pad_lo: list[int],
    dilation: list[int],
    need_gx: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`cp_chain` at stride 1: (x as (B, D, H, W, C), or empty without
    ``need_gx``; U_C; U_0; U_1; U_2; ``wt`` = (U_T * lambda)^T)."""
    module = _build.load()
    if module is None:
        raise RuntimeError("tensorconv::cp_chain_backward: the plane chain's library is not available here")
    gx, duc, du0, du1, du2, dwt = module.cp_chain_backward(
        x, u_c, u0, u1, u2, wt, grad, list(pad_lo), list(dilation), bool(need_gx)
    )
    return gx, duc, du0, du1, du2, dwt


@cp_chain_backward.register_fake
def _cp_chain_backward_fake(x, u_c, u0, u1, u2, wt, grad, pad_lo, dilation, need_gx):
    b, c, d, h, w = x.shape
    gx = x.new_empty((b, d, h, w, c)) if need_gx else x.new_empty((0,))
    return (
        gx,
        torch.empty_like(u_c),
        torch.empty_like(u0),
        torch.empty_like(u1),
        torch.empty_like(u2),
        torch.empty_like(wt),
    )


def _setup_context(ctx, inputs, output):
    x, lam, u_t, u_c, u0, u1, u2, out_spatial, stride, pad_lo, dilation = inputs
    ctx.geo = (tuple(out_spatial), tuple(stride), tuple(pad_lo), tuple(dilation))
    ctx.save_for_backward(x, lam, u_t, u_c, u0, u1, u2)


def _backward(ctx, grad):
    x, lam, u_t, u_c, u0, u1, u2 = ctx.saved_tensors
    _, stride, pad_lo, dilation = ctx.geo
    if any(s != 1 for s in stride):
        raise RuntimeError(
            "the plane chain's backward needs stride 1 (the plans send strided calls with gradients elsewhere)"
        )
    needs = ctx.needs_input_grad[:7]
    if torch.is_grad_enabled():
        # backward(create_graph=True): higher-order gradients through the same chain in plain torch ops
        inputs = (x, lam, u_t, u_c, u0, u1, u2)
        with torch.enable_grad():
            out = reference_chain(*inputs, ctx.geo)
        wanted = [t for t, need in zip(inputs, needs) if need]
        got = iter(torch.autograd.grad(out, wanted, grad, create_graph=True, allow_unused=True))
        return tuple(next(got) if need else None for need in needs) + (None,) * 4
    wt = (u_t * lam).t().contiguous()  # (R, T): U_T with lambda folded in, as the kernel's backward takes it
    gx, duc, du0, du1, du2, dwt = cp_chain_backward(
        x,
        u_c.contiguous(),
        u0.contiguous(),
        u1.contiguous(),
        u2.contiguous(),
        wt,
        grad.contiguous(),
        list(pad_lo),
        list(dilation),
        bool(needs[0]),
    )
    gx = gx.permute(0, 4, 1, 2, 3) if needs[0] else None
    dwt_t = dwt.t()  # (T, R): the gradient of U_T * lambda
    return (gx, (dwt_t * u_t).sum(0), dwt_t * lam, duc, du0, du1, du2) + (None,) * 4


cp_chain.register_autograd(_backward, setup_context=_setup_context)


def cp_chain_forward(x, lam, u_t, u_c, spatial, *, out_spatial, stride, pad_lo, dilation, out=None):
    """``x`` (B, C, D, H, W) -> (B, D', H', W', T) channels-last, or None without the library.

    ``spatial`` = (U_0, U_1, U_2), each (K_n, R); zero padding ``pad_lo`` (low side per mode;
    the high side follows from ``out_spatial``). Differentiable where ``stride`` is 1 in every
    mode; for a strided conv the caller must not need gradients. ``out``: a contiguous tensor of
    the output's shape to write into, only for a call that records nothing (no gradients, no
    tracer: the caller asked :meth:`Runtime.reuses_buffers`)."""
    geo = (list(out_spatial), list(stride), list(pad_lo), list(dilation))
    args = (x, lam, u_t, u_c, *spatial)
    if torch.compiler.is_compiling():
        return torch.ops.tensorconv.cp_chain(*args, *geo)  # the library is loaded when the graph runs
    if _build.load() is None:
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return cp_chain(*args, *geo)
    return _forward_impl(*args, *geo, out)  # nothing to record: no dispatcher, no autograd node


def reference_chain(x, lam, u_t, u_c, u0, u1, u2, geo):
    """What the kernel computes, in differentiable torch ops (stride 1, zero padding): x (B, C,
    D, H, W) -> (B, D', H', W', T). Used for higher-order gradients, which the kernel lacks."""
    import torch.nn.functional as F

    out_spatial, _, pad_lo, dilation = geo[:4]
    h = torch.einsum("bcdhw,cr->brdhw", x, u_c)
    rank = int(lam.shape[0])
    for m, u in enumerate((u0, u1, u2)):
        k = int(u.shape[0])
        hi = out_spatial[m] + dilation[m] * (k - 1) - h.shape[2 + m] - pad_lo[m]
        pads = [0, 0] * 3
        pads[2 * (2 - m)], pads[2 * (2 - m) + 1] = pad_lo[m], hi
        h = F.pad(h, pads)
        shape = [rank, 1, 1, 1, 1]
        shape[2 + m] = k
        dil = [1, 1, 1]
        dil[m] = dilation[m]
        h = F.conv3d(h, u.t().reshape(shape), None, 1, 0, tuple(dil), rank)
    return torch.einsum("brdhw,tr->bdhwt", h, u_t * lam)
