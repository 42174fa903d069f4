"""What each option of a compression plan costs: its plan's MACs and seconds, or its time measured.

Times are measured interleaved: every candidate of one layer (or the dense and the compressed
model) runs once per round, in an order shuffled each round, and each gets the median of its
rounds, because the project's VMs drift by tens of percent over seconds and a candidate timed
alone, before or after the others, carries that drift into the comparison.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._timing import measure_many
from ..plans.plan import plan_conv
from ._observe import observe
from .compress import _example_inputs
from .layers import KruskalConv, TuckerConv
from .lowrank import LowRankLinear


def record_input_shapes(model, example_inputs, wanted):
    """Each wanted module's input shape, from one forward pass (eval mode, no gradients)."""
    shapes = {}

    def record(name):
        def hook(module, args):
            shapes.setdefault(name, tuple(args[0].shape))  # returns None: the input is unchanged

        return hook

    observe(
        model,
        [(m, "pre", record(name)) for name, m in model.named_modules() if wanted(m)],
        [_example_inputs(model, example_inputs)],
    )
    return shapes


def plan_of(weight_or_kernel, shape, p, cost_model, **geometry):
    """The plan ``conv()`` makes for this weight (a shape) or kernel, in ``p``'s dtype and device."""
    return plan_conv(
        weight_or_kernel, shape, **geometry, dtype=p.dtype, backend="torch", device=p.device, cost_model=cost_model
    )


def dense_plan(module, shape, cost_model=None):
    """The plan of a conv or linear layer as it is (a linear layer: a 1x1 conv over its rows)."""
    p = module.weight
    if isinstance(module, nn.Linear):
        rows = (math.prod(shape[:-1]), module.in_features, 1)
        return plan_of((module.out_features, module.in_features, 1), rows, p, cost_model)
    geometry = dict(
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
        padding_mode=module.padding_mode,
    )
    return plan_of(tuple(p.shape), shape, p, cost_model, **geometry)


def option_cost(module, layer, shape, cost_model=None):
    """(params, MACs, cost-model seconds) of a built (skeleton) option."""
    params = sum(p.numel() for p in layer.parameters())
    if isinstance(layer, (KruskalConv, TuckerConv)):
        plan = plan_of(layer.kernel, shape, module.weight, cost_model, **layer._conv_arguments())
        # MACs of the factorized form (the fewest-MAC order): a count that holds on every machine,
        # where ``auto`` may still run a small layer's rebuilt dense kernel if that is faster there
        return params, plan.min_macs, plan.seconds
    first = dense_plan(layer.first, shape, cost_model)
    if isinstance(layer, LowRankLinear):
        inner = shape[:-1] + (layer.first.out_features,)
    else:
        inner = first.output_shape
    second = dense_plan(layer.second, inner, cost_model)
    return params, first.macs + second.macs, first.seconds + second.seconds


def svd_errors(module):
    """The truncated SVD's relative error at every rank (index r), from one SVD."""
    w = module.weight.detach().reshape(module.weight.shape[0], -1).to(torch.float64)
    # squared singular values as the eigenvalues of the smaller Gram matrix: a tenth of an SVD's
    # time, and the tail energies the errors need stay exact to rounding of the total energy
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    s = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    tail = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0]).tolist() + [0.0]
    total = float(s.sum())
    return [math.sqrt(t / total) if total > 0 else 0.0 for t in tail]


def time_interleaved(modules, inputs, repeat, seed=0):
    """Median seconds of each of ``modules`` on ``inputs`` (a shape: one random input of that shape
    in the first module's dtype and device; or a tuple of tensors), run round-robin in a seeded
    shuffled order (:func:`tensorconv._timing.measure_many`), ``repeat`` rounds after one warm-up
    round; eval mode, no gradients."""
    p = next(modules[0].parameters())
    if not isinstance(inputs, tuple) or not isinstance(inputs[0], torch.Tensor):
        inputs = (torch.randn(inputs, dtype=p.dtype, device=p.device),)
    modes = [m.training for m in modules]
    entries = {i: (lambda m=m: m(*inputs)) for i, m in enumerate(modules)}
    try:
        for m in modules:
            m.eval()
        with torch.no_grad():
            device = "cuda" if p.device.type == "cuda" else None
            times = measure_many(entries, device=device, warmup=1, repeat=repeat, seed=seed)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return [times[i]["median_ms"] / 1e3 for i in range(len(modules))]


def timing_inputs(model, example_inputs):
    """The model's inputs for timing: the tensors given, or random ones for shapes (zeros, which
    ``_example_inputs`` makes for shapes, could take a kernel's fast path)."""
    given = isinstance(example_inputs, torch.Tensor) or (
        isinstance(example_inputs, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in example_inputs)
    )
    inputs = _example_inputs(model, example_inputs)
    if given:
        return inputs
    generator = torch.Generator(device="cpu").manual_seed(0)
    return tuple(torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in inputs)
