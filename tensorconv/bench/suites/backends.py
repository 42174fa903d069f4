"""``tensorconv bench backends``: see :func:`run`."""

from __future__ import annotations

from ...kernels import KruskalKernel, TuckerKernel
from ...plans.plan import conv, plan_conv
from ..common import _array_device, _jax_jitted, _label, _make_input, params_matched_rank
from ..timing import _Progress, measure


def run(args, targets):
    """The same plans on every backend present; forward (all) and forward+backward (torch, jax: jit-compiled)."""
    cases = []
    c = 32 if args.quick else 64
    for n, spatial in ((2, (64, 64)), (3, (16, 32, 32))):
        ks = (3,) * n
        cases.append(("CP", n, "R=C", (c, c) + ks, c, spatial))
        cases.append(("CP", n, "R=matched", (c, c) + ks, params_matched_rank(c, c, ks), spatial))
        cases.append(("Tucker", n, "R=C/2", (c, c) + ks, (c // 2, c // 2), spatial))
    rows = []
    prog = _Progress(len(cases) * len(targets), "backends")
    for kind, n, label, kshape, rank, spatial in cases:
        shape = (args.batch, kshape[1]) + spatial
        group = []
        for backend, device in targets:
            dev = _array_device(device)
            make = KruskalKernel.random if kind == "CP" else TuckerKernel.random
            k = make(kshape, rank, backend=backend, dtype="float32", device=dev, seed=3)
            x = _make_input(backend, device, shape)
            forward = lambda: conv(x, k, padding=1)  # noqa: E731
            if backend == "jax":
                forward = _jax_jitted(lambda x, k: conv(x, k, padding=1), x, k)
            t = measure(forward, device=device, repeat=args.repeat, budget_s=args.budget)
            plan = plan_conv(k, shape, padding=1, dtype="float32", backend=backend, device=device)
            row = dict(
                suite="backends",
                kernel=kind,
                n_spatial=n,
                rank=label,
                backend=_label(backend, device),
                pass_="forward",
                strategy=plan.strategy,
                macs=plan.macs,
                **t,
            )
            group.append(row)
            if backend == "jax":
                import jax

                def loss(x, k):
                    return conv(x, k, padding=1).sum()

                t = measure(
                    _jax_jitted(jax.grad(loss, argnums=(0, 1)), x, k),
                    device=device,
                    repeat=args.repeat,
                    budget_s=args.budget,
                )
                group.append(dict(row, pass_="forward+backward", **t))
            if backend == "torch":
                fused_plan = plan_conv(
                    k, shape, padding=1, strategy="fused", dtype="float32", backend=backend, device=device
                )
                with_fused = dict(row, strategy="fused", macs=fused_plan.macs)
                conv(x, k, padding=1, strategy="fused")
                with_fused.update(
                    measure(
                        lambda: conv(x, k, padding=1, strategy="fused"),
                        device=device,
                        repeat=args.repeat,
                        budget_s=args.budget,
                    )
                )
                group.append(with_fused)
                arrays = [k.weights] + list(k.factors) if kind == "CP" else [k.core] + list(k.factors)
                for a in arrays:
                    if a is not None:
                        a.requires_grad_(True)
                xg = _make_input(backend, device, shape, requires_grad=True)

                def fwd_bwd():
                    conv(xg, k, padding=1).sum().backward()

                t = measure(fwd_bwd, device=device, repeat=args.repeat, budget_s=args.budget)
                group.append(dict(row, pass_="forward+backward", **t))
            prog.step(f"{kind} N={n} {label} {backend}")
        for p in ("forward", "forward+backward"):
            sub = [r for r in group if r["pass_"] == p]
            best = min((r["median_ms"] for r in sub), default=None)
            for r in sub:
                r["ratio_to_fastest"] = r["median_ms"] / best
        rows += group
    prog.close()
    return rows
