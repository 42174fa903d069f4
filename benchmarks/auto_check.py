"""Does `strategy="auto"` pick well? CP kernels at R = C, k = 3, padding 1, one backend.

    python benchmarks/auto_check.py numpy      # or: torch  (prints a markdown table)

For each spatial order, channel count and dtype: what `auto` runs (the cost model's choice)
and the measured forward times of `factorized` (the paper's fewest-MAC chain),
`reconstructed` (dense conv with the rebuilt kernel) and `auto`, interleaved, median of 5
runs; input (2, C, 16, 32, 32) for N = 3, (2, C, 64, 64) for N = 2. "pick / best": the time
of the plan auto runs over the faster of factorized and reconstructed. Where auto runs one of
those two plans, its time is that plan's own column (the `auto` column then times the same
plan at another place in the interleaved rounds: a call right after `reconstructed` pays for
its large buffers, up to 1.4x on float64). Where auto runs the compiled plane chain (torch CPU,
N = 3, once built: `tensorconv build-kernel`), it is the `auto` column. Checks the cost models
in tensorconv/plans/cost.py.
"""

import sys

import numpy as np

from tensorconv import KruskalKernel, conv, plan_conv
from tensorconv.cli.bench import _set_malloc_no_trim, measure_many


def _array(backend, a):
    if backend == "torch":
        import torch

        return torch.from_numpy(a)
    return a


def main(backend):
    _set_malloc_no_trim()
    print(f"backend {backend}, numpy {np.__version__}\n")
    print("| N | dtype | C = R | auto runs | factorized ms | reconstructed ms | auto ms | pick / best |")
    print("|---|---|---|---|---|---|---|---|")
    for n, spatial in ((2, (64, 64)), (3, (16, 32, 32))):
        for dtype in ("float32", "float64"):
            for c in (4, 8, 16, 32, 64):
                k = KruskalKernel.random((c, c) + (3,) * n, rank=c, seed=0, dtype=dtype).to_backend(backend)
                x = _array(backend, np.random.default_rng(0).standard_normal((2, c) + spatial).astype(dtype))
                plan = plan_conv(k, tuple(x.shape), padding=1)
                runs = (
                    "fused (plane chain)"
                    if plan.plane_chain
                    else (f"{plan.strategy}, {plan.order}" if plan.order else plan.strategy)
                )
                t = measure_many(
                    {
                        s: (lambda s: lambda: conv(x, k, padding=1, strategy=s))(s)
                        for s in ("factorized", "reconstructed", "auto")
                    },
                    repeat=5,
                )
                f, r, a = (t[s]["median_ms"] for s in ("factorized", "reconstructed", "auto"))
                pick = a if plan.plane_chain else {"fewest-macs": f, None: r}.get(plan.order, a)
                print(f"| {n} | {dtype} | {c} | {runs} | {f:.2f} | {r:.2f} | {a:.2f} | {pick / min(f, r):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "numpy")
