"""``tensorconv bench accelerators``: see :func:`run`."""

from __future__ import annotations

import sys

from ...kernels import KruskalKernel
from ...plans.plan import plan_conv
from ..common import _ms, _torch_cpu
from ..timing import _Progress, measure_many


def run(args, targets):
    """Each registered accelerator that ``auto`` weighs (the plane chain on torch CPU), forward
    and forward+backward: (B, C, 16, 32, 32), CP C -> C, 3x3x3, rank R, padding 1, float32,
    against dense Conv3d and the plan ``auto`` makes without any accelerator
    (``plan_conv(accelerators=())``); "auto runs" is what ``auto`` picks with them."""
    import torch

    from ... import accelerators

    if not _torch_cpu(targets):
        return []
    accs = [a for a in accelerators.registered() if "auto" in a.serves]
    points = [(1, 32, 32), (8, 32, 96)] if args.quick else [(1, 16, 16), (1, 64, 64), (1, 128, 128), (8, 32, 32)]
    points += [] if args.quick else [(8, 32, 96), (8, 32, 192), (8, 128, 128)]
    rows = []
    prog = _Progress(2 * len(points) * len(accs), "accelerators")
    for acc in accs:
        if not acc.build():
            print(f"accelerators: {acc.name} is not available here ({acc.status()}); skipped", file=sys.stderr)
            continue
        for b, c, r in points:
            shape = (b, c, 16, 32, 32)
            w = torch.randn(c, c, 3, 3, 3)
            x = torch.randn(shape)
            for grad in (False, True):
                k = KruskalKernel.random((c, c, 3, 3, 3), r, backend="torch", dtype="float32", seed=1)
                xx, ww = (x.clone().requires_grad_(True), w.clone().requires_grad_(True)) if grad else (x, w)
                for leaf in [k.weights] + list(k.factors):
                    leaf.requires_grad_(grad)
                unfused = plan_conv(k, shape, padding=1, accelerators=())
                mine = plan_conv(k, shape, padding=1, strategy="fused", accelerators=(acc.name,))
                auto = plan_conv(k, shape, padding=1)

                def run(fn, grad=grad):
                    out = fn()
                    if grad:
                        out.sum().backward()
                    return out

                entries = {
                    "dense": lambda: run(lambda: torch.nn.functional.conv3d(xx, ww, padding=1)),
                    "unfused": lambda: run(lambda: unfused(xx, k)),
                    "accelerator": lambda: run(lambda: mine(xx, k)),
                }
                with torch.set_grad_enabled(grad):
                    t = measure_many(entries, repeat=max(3, args.repeat // (2 if grad else 1)), budget_s=args.budget)
                rows.append(
                    dict(
                        suite="accelerators",
                        accelerator=acc.name,
                        pass_="forward+backward" if grad else "forward",
                        B=b,
                        C=c,
                        R=r,
                        **{
                            "dense ms": _ms(t, "dense"),
                            "unfused auto ms": _ms(t, "unfused"),
                            "accelerator ms": _ms(t, "accelerator"),
                            "auto runs": "-" if grad else (auto.accelerator or auto.strategy),
                            "unfused / accelerator": round(
                                t["unfused"]["median_ms"] / t["accelerator"]["median_ms"], 2
                            ),
                            "dense / accelerator": round(t["dense"]["median_ms"] / t["accelerator"]["median_ms"], 2),
                        },
                    )
                )
                prog.step(f"{acc.name} {'fwd+bwd' if grad else 'fwd'} B={b} C={c} R={r}")
    prog.close()
    return rows
