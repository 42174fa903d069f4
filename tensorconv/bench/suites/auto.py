"""``tensorconv bench auto``: see :func:`run`."""

from __future__ import annotations

from ...kernels import KruskalKernel
from ...plans.plan import conv, plan_conv
from ..timing import _Progress, measure_many


def run(args, targets):
    """Does ``auto`` pick the faster plan? CP kernels at R = C, 3x3(x3), padding 1, input
    (2, C, 64, 64) and (2, C, 16, 32, 32), float32 and float64, each backend present: the plan
    ``auto`` runs against ``factorized`` and ``reconstructed``, interleaved. "auto / best": the
    time of what auto runs over the faster of the two fixed strategies."""
    from ...backends import backend_for_name
    from ..common import _array_device

    rows = []
    channels = (8, 64) if args.quick else (4, 8, 16, 32, 64)
    shapes = ((2, (64, 64)), (3, (16, 32, 32)))
    cases = [(n, spatial, dtype) for n, spatial in shapes for dtype in ("float32", "float64")]
    todo = [(b, d) for b, d in targets if b in ("numpy", "torch") and d in (None, "cpu")]
    prog = _Progress(len(todo) * len(cases) * len(channels), "auto")
    for backend, device in todo:
        xb = backend_for_name(backend)
        for n, spatial, dtype in cases:
            for c in channels:
                k = KruskalKernel.random((c, c) + (3,) * n, c, backend=backend, dtype=dtype, seed=0)
                x = xb.random_normal((2, c) + spatial, seed=0, dtype=dtype, device=_array_device(device))
                plan = plan_conv(k, tuple(x.shape), padding=1)
                runs = plan.accelerator or (f"{plan.strategy}, {plan.order}" if plan.order else plan.strategy)
                strategies = ("factorized", "reconstructed", "auto")
                t = measure_many(
                    {s: (lambda s=s: conv(x, k, padding=1, strategy=s)) for s in strategies},
                    repeat=args.repeat,
                    budget_s=args.budget,
                )
                f, r, a = (t[s]["median_ms"] for s in ("factorized", "reconstructed", "auto"))
                rows.append(
                    dict(
                        suite="auto",
                        backend=backend,
                        N=n,
                        dtype=dtype,
                        C=c,
                        **{
                            "auto runs": runs,
                            "factorized ms": round(f, 2),
                            "reconstructed ms": round(r, 2),
                            "auto ms": round(a, 2),
                            "auto / best": round(a / min(f, r), 2),
                        },
                    )
                )
                prog.step(f"{backend} N={n} {dtype} C={c}")
    prog.close()
    return rows
