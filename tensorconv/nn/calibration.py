"""Fit compressed layers to the activations they see: the output factor by least squares.

A factorized layer ends in a linear map of its last intermediate ``H`` (a CP layer's ``U_T``
after the depthwise steps, a Tucker layer's ``U_T`` after the core, a low-rank layer's second
half). Given inputs and the outputs the dense layer gives, that map (and the bias) has a closed
form: the least-squares solution of ``Y = W H + b`` over the output positions. :func:`calibrate`
does it layer by layer in network order, on the inputs the *compressed* model gives each layer
and against the outputs the *dense* model's layer gives on the dense model's own inputs, so that
each layer also corrects what the layers before it changed. Positions are subsampled (``rows``
in all, seeded): memory is bounded by ``rows x channels`` per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import KruskalKernel, TuckerKernel
from ..plans.plan import conv
from ._observe import observe
from ._progress import steps
from .layers import KruskalConv, TuckerConv
from .lowrank import LowRankConv, LowRankLinear

__all__ = ["calibrate", "can_refit", "fit_to", "output_rows", "refit"]


def can_refit(layer) -> bool:
    """Whether :func:`refit` knows ``layer``'s last linear map (not a Tucker layer of a grouped
    conv, whose U_T is block-diagonal)."""
    if isinstance(layer, TuckerConv):
        return layer.groups == 1
    return isinstance(layer, (KruskalConv, LowRankConv, LowRankLinear))


def _hidden(layer, x):
    """The last intermediate ``H`` of ``layer`` on ``x``, channels in dim 1 (the last for linear)."""
    if isinstance(layer, (LowRankConv, LowRankLinear)):
        return layer.first(x)
    geometry = layer._conv_arguments()
    if isinstance(layer, KruskalConv):
        kernel = KruskalKernel(layer.weights, [None] + list(layer.factors[1:]))
    else:
        kernel = TuckerKernel(layer.core, [None, layer.factors[1]], groups=layer._core_split)
    return conv(x, kernel, **geometry)


def _rows_of(t, linear):
    """(positions, channels) rows of an activation: channels last for linear layers, dim 1 for convs."""
    if linear:
        return t.reshape(-1, t.shape[-1])
    return t.movedim(1, -1).reshape(-1, t.shape[1])


def output_rows(layer, x, positions=None):
    """``H`` of ``layer`` on ``x`` as (positions, channels) rows (the rows ``positions`` selects)."""
    h = _rows_of(_hidden(layer, x), isinstance(layer, LowRankLinear))
    return h if positions is None else h[positions]


def _solve(h, y):
    """(W, b) minimising ``||y - h W^T - b||`` in float64 (the centred problem, so the bias is exact).

    Directions of ``h`` below the precision it was computed in are dropped (the minimum-norm
    solution): a layer behind a low-rank one sees inputs in a subspace, and fitting float32
    rounding noise there would give huge weights that blow up on any other input."""
    h64, y64 = h.to(torch.float64), y.to(torch.float64)
    hm, ym = h64.mean(0), y64.mean(0)
    hc, yc = h64 - hm, y64 - ym
    rcond = 100 * torch.finfo(h.dtype).eps
    w = torch.linalg.lstsq(hc, yc, rcond=rcond, driver="gelsd").solution.T  # (T, R)
    return w, ym - w @ hm


def refit(layer, h, y):
    """Set ``layer``'s last linear map (and bias, where it has one) to the least-squares fit of
    rows ``y`` (positions, T) from rows ``h`` (positions, R). Returns the relative error of the fit."""
    if not can_refit(layer):
        raise TypeError(f"refit: {type(layer).__name__} has no output factor to fit (grouped Tucker or unknown)")
    w, b = _solve(h, y)
    with torch.no_grad():
        if isinstance(layer, (LowRankConv, LowRankLinear)):
            weight, bias = layer.second.weight, layer.second.bias
            weight.copy_(w.reshape(weight.shape).to(weight.dtype))
        else:
            weight, bias = layer.factors[0], layer.bias
            weight.copy_(w.to(weight.dtype))
        if bias is not None:
            bias.copy_(b.to(bias.dtype))
    fitted = h.to(torch.float64) @ w.T + (b if bias is not None else 0.0)
    y64 = y.to(torch.float64)
    return float((fitted - y64).norm() / y64.norm().clamp_min(1e-300))


def capture(model, names, batches, what):
    """Per batch, each named module's input (``what="in"``), output (``"out"``) or both as an
    ``(input, output)`` pair (``"both"``), from one forward per batch."""
    modules = dict(model.named_modules())
    seen = {name: [] for name in names}
    pick = {"in": lambda x, y: x, "out": lambda x, y: y, "both": lambda x, y: (x, y)}[what]

    def hook(name):
        def record(module, args, out):
            seen[name].append(pick(args[0].detach(), out.detach()))  # returns None: out unchanged

        return record

    observe(model, [(modules[name], "post", hook(name)) for name in names], _as_tuples(batches))
    return seen


def _as_tuples(batches):
    return [batch if isinstance(batch, (tuple, list)) else (batch,) for batch in batches]


def _sample(n_rows_per_batch, rows, seed):
    """Row indices per batch: ``rows`` in all, spread over the batches, seeded."""
    total = sum(n_rows_per_batch)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for n in n_rows_per_batch:
        k = min(n, max(1, round(rows * n / total)))
        picks.append(torch.randperm(n, generator=g)[:k])
    return picks


def calibrate(
    compressed: nn.Module, dense: nn.Module, batches, *, rows: int = 8192, seed: int = 0, progress=None
) -> dict:
    """Refit every refittable compressed layer of ``compressed`` to ``dense``'s outputs, in
    network order (see the module docstring). ``batches``: inputs (tensors, or tuples of them).
    Modules are matched by name; returns each refitted layer's relative output error on the
    rows it was fitted to. ``progress``: True / False, or None for "where stderr is a terminal"."""
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate: batches is empty; pass a few input batches (tensors or tuples of tensors)")
    dense_modules = dict(dense.named_modules())
    layers = dict(compressed.named_modules())
    # the refittable layers in the order their forward runs, where the dense model has them too
    names = [n for n in _forward_order(compressed, batches[0]) if n in dense_modules]
    if not names:
        return {}
    targets = capture(dense, names, batches, "out")
    errors = {}
    for i, name in steps(list(enumerate(names)), what="calibrate", progress=progress, name=lambda item: item[1]):
        layer = layers[name]
        inputs = capture(compressed, [name], batches, "in")[name]
        errors[name] = fit_to(layer, inputs, targets[name], rows=rows, seed=seed + i)
    return errors


def fit_to(layer, inputs, outputs, *, rows: int = 8192, seed: int = 0) -> float:
    """Fit ``layer`` (:func:`refit`) to map ``inputs`` (one tensor per batch) to ``outputs`` at
    ``rows`` sampled positions; a layer that cannot be refitted is left as it is. Returns the
    relative output error on those rows."""
    linear = isinstance(layer, (LowRankLinear, nn.Linear))
    ys = [_rows_of(y, linear) for y in outputs]
    picks = _sample([len(y) for y in ys], rows, seed)
    y = torch.cat([y[p] for y, p in zip(ys, picks)])
    with torch.no_grad():
        if can_refit(layer):
            h = torch.cat([output_rows(layer, x, p) for x, p in zip(inputs, picks)])
            return refit(layer, h, y)
        got = torch.cat([_rows_of(layer(x), linear)[p] for x, p in zip(inputs, picks)])
    y64 = y.to(torch.float64)
    return float((got.to(torch.float64) - y64).norm() / y64.norm().clamp_min(1e-300))


def _forward_order(model, batch):
    """The refittable modules' names (:func:`can_refit`) in the order their forward first runs on ``batch``."""
    order = []

    def first_call(name):
        def hook(module, args):
            if name not in order:
                order.append(name)  # returns None: the input is unchanged

        return hook

    observe(
        model, [(m, "pre", first_call(name)) for name, m in model.named_modules() if can_refit(m)], _as_tuples([batch])
    )
    return order
