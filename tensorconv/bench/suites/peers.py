"""``tensorconv bench peers``: see :func:`run`."""

from __future__ import annotations

from ...kernels import KruskalKernel
from ...plans.plan import conv, plan_conv
from ..common import _gemm_floor, _picked, _r2plus1d_matched, import_tltorch, params_matched_rank
from ..timing import _Progress, measure_many


def run(args, targets):
    """(B, C, 16, 32, 32), k=3, C = T: dense Conv3d, (2+1)D, tensorly-torch, tensorconv strategies."""
    import tensorly

    with tensorly.backend_context("pytorch"):  # what tensorly-torch's layers need (see import_tltorch)
        return _suite_peers(args, targets)


def _suite_peers(args, targets):
    import torch

    tltorch = import_tltorch()
    channels = (16, 32) if args.quick else (16, 32, 64, 128)
    devices = [d for b, d in targets if b == "torch"]
    rows = []
    prog = _Progress(len(channels) * 2 * len(devices), "peers")
    for device in devices:
        for c in channels:
            for rank_label in ("R=C", "R=matched"):
                r = c if rank_label == "R=C" else params_matched_rank(c, c, (3, 3, 3))
                shape = (args.batch, c, 16, 32, 32)
                x = torch.randn(shape, device=device)
                dense = torch.nn.Conv3d(c, c, 3, padding=1, bias=False, device=device)
                k = KruskalKernel.random(
                    (c, c, 3, 3, 3), rank=r, backend="torch", dtype="float32", device=device, seed=4
                )
                for t_ in [k.weights] + list(k.factors):
                    t_.requires_grad_(False)
                m = _r2plus1d_matched(c, device)
                entries = {
                    "dense Conv3d": lambda: dense(x),
                    "(2+1)D matched params": lambda: m(x),
                    "floor: the two 1x1 GEMMs alone": _gemm_floor(args.batch, c, r, c, shape[2:], device),
                }
                for strategy in ("factorized", "reconstructed", "auto", "fused"):
                    entries[f"tensorconv {strategy}"] = (lambda s: lambda: conv(x, k, padding=1, strategy=s))(strategy)
                if tltorch is not None:
                    for impl in ("factorized", "reconstructed"):
                        layer = tltorch.FactorizedConv(
                            c, c, 3, order=3, rank=r, factorization="cp", implementation=impl, padding=1, bias=False
                        ).to(device)
                        entries[f"tltorch {impl}"] = (lambda m: lambda: m(x))(layer)
                plan = plan_conv(
                    k, shape, padding=1, strategy="factorized", dtype="float32", backend="torch", device=device
                )
                auto = plan_conv(k, shape, padding=1, strategy="auto", dtype="float32", backend="torch", device=device)
                group = []
                with torch.no_grad():
                    results = measure_many(entries, device=device, repeat=args.repeat, budget_s=args.budget)
                for name, t in results.items():
                    group.append(
                        dict(
                            suite="peers",
                            device=device,
                            channels=c,
                            rank=rank_label,
                            r=r,
                            impl=name,
                            pass_="forward",
                            **t,
                        )
                    )
                # forward + backward (gradients for the input and every parameter)
                xg = x.clone().requires_grad_(True)
                for t_ in [k.weights] + list(k.factors):
                    t_.requires_grad_(True)
                train = {
                    "dense Conv3d": lambda: dense(xg).sum().backward(),
                    "tensorconv factorized": lambda: conv(xg, k, padding=1, strategy="factorized").sum().backward(),
                    "tensorconv fused": lambda: conv(xg, k, padding=1, strategy="fused").sum().backward(),
                }
                if tltorch is not None:
                    layer = tltorch.FactorizedConv(
                        c, c, 3, order=3, rank=r, factorization="cp", implementation="factorized", padding=1, bias=False
                    ).to(device)
                    train["tltorch factorized"] = lambda: layer(xg).sum().backward()
                results = measure_many(train, device=device, repeat=max(3, args.repeat // 2), budget_s=args.budget)
                for t_ in [k.weights] + list(k.factors):
                    t_.requires_grad_(False)
                for name, t in results.items():
                    group.append(
                        dict(
                            suite="peers",
                            device=device,
                            channels=c,
                            rank=rank_label,
                            r=r,
                            impl=name,
                            pass_="forward+backward",
                            **t,
                        )
                    )
                for g in group:
                    times = {h["impl"]: h["median_ms"] for h in group if h["pass_"] == g["pass_"]}
                    g["vs_dense"] = times["dense Conv3d"] / g["median_ms"]
                    if "tltorch factorized" in times:
                        g["vs_tltorch_factorized"] = times["tltorch factorized"] / g["median_ms"]
                    g["mac_ratio"] = plan.dense_macs / plan.macs
                    g["auto_picked"] = _picked(auto)
                rows += group
                prog.step(f"{device} C={c} {rank_label}")
    prog.close()
    return rows
