"""``tensorconv bench accelerators``: see :func:`run`."""

from __future__ import annotations

import sys

from ...kernels import KruskalKernel
from ...plans.plan import conv, plan_conv
from ..common import _array_device, _label, _make_input, _ms
from ..timing import _Progress, measure_many


def run(args, targets):
    """Each registered accelerator that ``auto`` weighs, on every target it serves
    (:func:`tensorconv.accelerators.for_device`; the plane chain on torch CPU), forward and,
    on torch, forward+backward: (B, C, 16, 32, 32), CP C -> C, 3x3x3, rank R, padding 1,
    float32, against the dense conv and the plan ``auto`` makes without any accelerator
    (``plan_conv(accelerators=())``); "auto runs" is what ``auto`` picks with them."""
    from ... import accelerators

    work = []
    for backend, device in targets:
        for acc in accelerators.for_device(backend, device):
            if not acc.build() or not acc.ready(backend, device, 4):
                print(f"accelerators: {acc.name} is not available here ({acc.status()}); skipped", file=sys.stderr)
                continue
            work.append((backend, device, acc))
    points = [(1, 32, 32), (8, 32, 96)] if args.quick else [(1, 16, 16), (1, 64, 64), (1, 128, 128), (8, 32, 32)]
    points += [] if args.quick else [(8, 32, 96), (8, 32, 192), (8, 128, 128)]
    rows = []
    prog = _Progress(2 * len(points) * len(work), "accelerators")
    for backend, device, acc in work:
        for b, c, r in points:
            shape = (b, c, 16, 32, 32)
            passes = (False, True) if backend == "torch" else (False,)
            for grad in passes:
                x = _make_input(backend, device, shape, requires_grad=grad)
                w = _make_input(backend, device, (c, c, 3, 3, 3), requires_grad=grad)
                k = KruskalKernel.random(
                    (c, c, 3, 3, 3), r, backend=backend, dtype="float32", device=_array_device(device), seed=1
                )
                if grad:
                    for leaf in [k.weights] + list(k.factors):
                        leaf.requires_grad_(True)
                unfused = plan_conv(k, shape, padding=1, accelerators=())
                mine = plan_conv(k, shape, padding=1, strategy="fused", accelerators=(acc.name,))
                auto = plan_conv(k, shape, padding=1)

                def timed(fn, grad=grad):
                    out = fn()
                    if grad:
                        out.sum().backward()
                    return out

                if backend == "torch":  # the library's own conv, without conv()'s planning
                    import torch

                    dense = lambda: torch.nn.functional.conv3d(x, w, padding=1)  # noqa: E731
                else:
                    dense = lambda: conv(x, w, padding=1)  # noqa: E731
                entries = {
                    "dense": lambda: timed(dense),
                    "unfused": lambda: timed(lambda: unfused(x, k)),
                    "accelerator": lambda: timed(lambda: mine(x, k)),
                }
                t = measure_many(
                    entries, device=device, repeat=max(3, args.repeat // (2 if grad else 1)), budget_s=args.budget
                )
                rows.append(
                    dict(
                        suite="accelerators",
                        accelerator=acc.name,
                        backend=_label(backend, device),
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
