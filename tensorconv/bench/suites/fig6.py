"""``tensorconv bench fig6``: see :func:`run`."""

from __future__ import annotations

import numpy as np

from ...backends import backend_for_name
from ...kernels import KruskalKernel
from ...plans.plan import conv, plan_conv
from ..common import _array_device, _label, _make_input
from ..timing import _Progress, measure


def run(args, targets):
    """Paper Figure 6: input 16x32x32, 3x3x3 kernel, C = T, dense 3-D conv vs CP at R = 6C and R = 3C."""
    channels = (16, 64) if args.quick else (16, 32, 64, 128, 256)
    rows = []
    prog = _Progress(len(channels) * len(targets) * 3, "fig6")
    for c in channels:
        shape = (args.batch, c, 16, 32, 32)
        dense_shape = (c, c, 3, 3, 3)
        for backend, device in targets:
            if backend == "numpy" and c > 64:
                for _ in range(3):
                    prog.step("skip numpy (too slow)")
                continue
            x = _make_input(backend, device, shape)
            dense = backend_for_name(backend).random_normal(
                dense_shape, seed=1, dtype="float32", device=_array_device(device)
            )
            t = measure(lambda: conv(x, dense, padding=1), device=device, repeat=args.repeat, budget_s=args.budget)
            plan = plan_conv(dense, shape, padding=1)
            rows.append(
                dict(
                    suite="fig6",
                    channels=c,
                    model="3D-Conv",
                    backend=_label(backend, device),
                    macs=plan.dense_macs,
                    analytic_macs=plan.dense_macs,
                    params=int(np.prod(dense_shape)),
                    **t,
                )
            )
            prog.step(f"C={c} dense {backend}")
            for mult in (6, 3):
                k = KruskalKernel.random(
                    dense_shape, rank=mult * c, backend=backend, dtype="float32", device=_array_device(device), seed=2
                )
                plan = plan_conv(k, shape, padding=1, strategy="factorized", dtype="float32", backend=backend)
                # the paper's count: 1x1, one depthwise 1-D conv per mode, 1x1 (the torch plan's order)
                canonical = plan_conv(k, shape, padding=1, strategy="factorized", dtype="float32", backend="torch")
                t = measure(
                    lambda: conv(x, k, padding=1, strategy="factorized"),
                    device=device,
                    repeat=args.repeat,
                    budget_s=args.budget,
                )
                rows.append(
                    dict(
                        suite="fig6",
                        channels=c,
                        model=f"CP-HOConv-{mult}",
                        backend=_label(backend, device),
                        macs=plan.macs,
                        analytic_macs=canonical.macs,
                        params=k.n_params,
                        **t,
                    )
                )
                if backend == "torch" and not args.quick:  # (compiling each point would not fit --quick)
                    conv(x, k, padding=1, strategy="fused")  # compile outside the timing
                    t = measure(
                        lambda: conv(x, k, padding=1, strategy="fused"),
                        device=device,
                        repeat=args.repeat,
                        budget_s=args.budget,
                    )
                    rows.append(
                        dict(
                            suite="fig6",
                            channels=c,
                            model=f"CP-HOConv-{mult}",
                            backend=_label(backend, device) + " fused",
                            macs=plan.macs,
                            analytic_macs=canonical.macs,
                            params=k.n_params,
                            **t,
                        )
                    )
                prog.step(f"C={c} CP-{mult} {backend}")
    prog.close()
    return rows
