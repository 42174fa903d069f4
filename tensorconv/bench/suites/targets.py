"""``tensorconv bench targets``: see :func:`run`."""

from __future__ import annotations

from ...kernels import KruskalKernel
from ...plans.plan import conv, plan_conv
from ..common import _gemm_floor, _picked
from ..timing import _Progress, measure_many


def run(args, targets):
    """The wall-clock targets (docs/benchmarks.md, "Targets"): (B, C, 16, 32, 32), k = 3, batch 1 and 8, torch.

    Dense Conv3d vs the factorized CP plan at R = C (C in 32, 64, 128) and at the Figure 6
    ranks R = 3C, 6C (C = 32); forward and forward+backward; the MAC ratio beside each.
    """
    import torch

    devices = [d for b, d in targets if b == "torch"]
    points = [(c, c) for c in (32, 64, 128)] + [(32, 3 * 32), (32, 6 * 32)]
    batches = (1,) if args.quick else (1, 8)
    if args.quick:
        points = points[:1] + points[3:4]
    rows = []
    prog = _Progress(len(devices) * len(points) * len(batches), "targets")
    for device in devices:
        for batch in batches:
            for c, r in points:
                shape = (batch, c, 16, 32, 32)
                x = torch.randn(shape, device=device)
                w = torch.randn(c, c, 3, 3, 3, device=device) * 0.05
                k = KruskalKernel.random(
                    (c, c, 3, 3, 3), rank=r, backend="torch", dtype="float32", device=device, seed=6
                )
                plan = plan_conv(
                    k, shape, padding=1, strategy="factorized", dtype="float32", backend="torch", device=device
                )
                with torch.no_grad():
                    conv(x, k, padding=1, strategy="fused")  # the plane chain (built in main)
                    fwd = measure_many(
                        {
                            "dense": lambda: torch.nn.functional.conv3d(x, w, padding=1),
                            "factorized": lambda: conv(x, k, padding=1, strategy="factorized"),
                            "fused": lambda: conv(x, k, padding=1, strategy="fused"),
                            "auto": lambda: conv(x, k, padding=1),
                            "gemm floor": _gemm_floor(batch, c, r, c, shape[2:], device),
                        },
                        device=device,
                        repeat=args.repeat,
                        budget_s=args.budget,
                    )
                xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
                for t_ in [k.weights] + list(k.factors):
                    t_.requires_grad_(True)
                conv(xg, k, padding=1, strategy="fused").sum().backward()  # first call outside the timing
                bwd = measure_many(
                    {
                        "dense": lambda: torch.nn.functional.conv3d(xg, wg, padding=1).sum().backward(),
                        "factorized": lambda: conv(xg, k, padding=1, strategy="factorized").sum().backward(),
                        "fused": lambda: conv(xg, k, padding=1, strategy="fused").sum().backward(),
                        "auto": lambda: conv(xg, k, padding=1).sum().backward(),
                    },
                    device=device,
                    repeat=max(3, args.repeat // 2),
                    budget_s=args.budget,
                )
                auto = plan_conv(k, shape, padding=1, dtype="float32", backend="torch", device=device)
                t_dense, t_fact, t_fused = fwd["dense"], fwd["factorized"], fwd["fused"]
                t_dense_b, t_fact_b, t_fused_b = bwd["dense"], bwd["factorized"], bwd["fused"]
                mac_ratio = plan.dense_macs / plan.macs
                rows.append(
                    dict(
                        suite="targets",
                        device=device,
                        batch=batch,
                        channels=c,
                        rank=r,
                        auto_picked=_picked(auto),
                        auto_fwd_ms=fwd["auto"]["median_ms"],
                        gemm_floor_ms=fwd["gemm floor"]["median_ms"],
                        auto_fwd_bwd_ms=bwd["auto"]["median_ms"],
                        auto_fwd_speedup=t_dense["median_ms"] / fwd["auto"]["median_ms"],
                        auto_fwd_bwd_speedup=t_dense_b["median_ms"] / bwd["auto"]["median_ms"],
                        fused_fwd_ms=t_fused["median_ms"],
                        fused_fwd_bwd_ms=t_fused_b["median_ms"],
                        fused_fwd_speedup=t_dense["median_ms"] / t_fused["median_ms"],
                        fused_fwd_bwd_speedup=t_dense_b["median_ms"] / t_fused_b["median_ms"],
                        mac_ratio=mac_ratio,
                        dense_fwd_ms=t_dense["median_ms"],
                        factorized_fwd_ms=t_fact["median_ms"],
                        fwd_speedup=t_dense["median_ms"] / t_fact["median_ms"],
                        fwd_speedup_over_mac_ratio=t_dense["median_ms"] / t_fact["median_ms"] / mac_ratio,
                        dense_fwd_bwd_ms=t_dense_b["median_ms"],
                        factorized_fwd_bwd_ms=t_fact_b["median_ms"],
                        fwd_bwd_speedup=t_dense_b["median_ms"] / t_fact_b["median_ms"],
                        plan_peak_bytes=plan.peak_bytes,
                    )
                )
                prog.step(f"{device} B={batch} C={c} R={r}")
    prog.close()
    return rows
