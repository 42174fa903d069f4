"""``tensorconv bench layers``: see :func:`run`."""

from __future__ import annotations

import time

from ...plans.plan import plan_conv
from ..common import _r3d18, _torch_cpu


def run(args, targets):
    """Per-layer forward times of r3d_18 (batch 1, 3x16x112x112; quick: 8 frames), dense against
    ``factorize(model, 0.25)`` (CP), from forward hooks on every conv, medians: which layers a
    whole-network ratio (``models``) comes from, and what ``auto`` runs there."""
    import torch

    if not _torch_cpu(targets):
        return []
    from ...nn import factorize
    from ...nn.layers import _FactorizedConv

    torch.manual_seed(0)
    dense, source = _r3d18()
    dense = dense.eval()
    fact = factorize(dense, 0.25, n_iter_max=1).eval()
    frames = 8 if args.quick else 16
    x = torch.randn(1, 3, frames, 112, 112)
    times = {}
    for tag, model in (("dense", dense), ("factorized", fact)):
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.modules.conv._ConvNd, _FactorizedConv)):
                m.register_forward_pre_hook(lambda mod, a: setattr(mod, "_t0", time.perf_counter()))
                m.register_forward_hook(
                    lambda mod, a, o, key=(tag, name): times.setdefault(key, []).append(time.perf_counter() - mod._t0)
                )
    inputs = {}

    def record_input(name):
        def hook(module, args, output):  # returns None: the output stays as it is
            inputs.setdefault(name, tuple(args[0].shape))

        return hook

    for name, m in fact.named_modules():
        if isinstance(m, _FactorizedConv):
            m.register_forward_hook(record_input(name))
    with torch.no_grad():
        for _ in range(max(3, args.repeat)):
            dense(x)
            fact(x)
    rows = []
    layers = dict(fact.named_modules())
    for name in sorted({n for _, n in times}):
        med = {tag: 1e3 * sorted(times[(tag, name)])[len(times[(tag, name)]) // 2] for tag in ("dense", "factorized")}
        layer = layers[name]
        runs = "-"
        if name in inputs:
            plan = plan_conv(
                layer.kernel,
                inputs[name],
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                strategy=layer.strategy,
            )
            runs = plan.accelerator or (f"{plan.strategy}, {plan.order}" if plan.order else plan.strategy)
        rows.append(
            dict(
                suite="layers",
                model=source,
                layer=name,
                kind=type(layer).__name__,
                rank=getattr(layer, "rank", "-"),
                **{
                    "dense ms": round(med["dense"], 2),
                    "factorized ms": round(med["factorized"], 2),
                    "dense / factorized": round(med["dense"] / med["factorized"], 2),
                    "auto runs": runs,
                },
            )
        )
    return rows
