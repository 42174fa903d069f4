"""NumPy: does `auto`'s fastest order beat the fewest-MAC chain? (CP, R = C, 3x3x3, padding 1)

    python benchmarks/numpy_orders.py            # prints a markdown table

For each channel count and dtype: what `auto` runs (the cost model's choice) and the measured
forward time of `strategy="factorized"` (the paper's chain) and of `auto`, interleaved, median
of 5 runs; input (2, C, 16, 32, 32). Where auto's order is the fewest-MAC one, the two columns
time the same plan (their difference is noise). Checks the NumPy cost model
(tensorconv/plans/cost.py): merged channel + tap steps should be chosen only where they win.
"""
import numpy as np

from tensorconv import KruskalKernel, conv, plan_conv
from tensorconv.cli.bench import _set_malloc_no_trim, measure_many


def main():
    _set_malloc_no_trim()
    print(f"numpy {np.__version__}\n")
    print("| dtype | C = R | auto runs | factorized ms | auto ms | factorized / auto |")
    print("|---|---|---|---|---|---|")
    for dtype in ("float32", "float64"):
        for c in (4, 8, 16, 32, 64):
            k = KruskalKernel.random((c, c, 3, 3, 3), rank=c, seed=0, dtype=dtype)
            x = np.random.default_rng(0).standard_normal((2, c, 16, 32, 32)).astype(dtype)
            plan = plan_conv(k, x.shape, padding=1)
            runs = f"{plan.strategy}, {plan.order}" if plan.order else plan.strategy
            t = measure_many({"factorized": lambda: conv(x, k, padding=1, strategy="factorized"),
                              "auto": lambda: conv(x, k, padding=1)}, repeat=5)
            f, a = t["factorized"]["median_ms"], t["auto"]["median_ms"]
            print(f"| {dtype} | {c} | {runs} | {f:.2f} | {a:.2f} | {f / a:.2f} |")


if __name__ == "__main__":
    main()
