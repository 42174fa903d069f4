"""What writing large intermediates into kept buffers saves in a plain process: the unfused plan
(``strategy="factorized"``) of a CP conv run with its buffers (intermediates of 32 MiB and up,
the default) and without (none buffered), alternated in one process; ms per call (median of 15
after 3) and minor page faults per call, without gradients, 2 threads.

- ``r3d_18 layer1``: rank 200, 64 -> 64 channels, 3x3x3, input 1x64x16x56x56 (four 40 MB
  intermediates),
- ``bench accelerators``: the point B=8, C=32, R=96 of that suite, input 8x32x16x32x32.

    python benchmarks/buffers_ab.py
"""

import resource
import statistics
import time

import torch

from tensorconv import KruskalKernel, plan_conv
from tensorconv.plans import workspace

torch.set_num_threads(2)


def timed(fn, runs=15):
    for _ in range(3):
        fn()
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / runs
    return statistics.median(times) * 1e3, faults


def main():
    cases = [
        ("r3d_18 layer1", (64, 64, 3, 3, 3), 200, (1, 64, 16, 56, 56)),
        ("bench accelerators", (32, 32, 3, 3, 3), 96, (8, 32, 16, 32, 32)),
    ]
    default = workspace.MIN_BYTES
    with torch.no_grad():
        for name, shape, rank, x_shape in cases:
            k = KruskalKernel.random(shape, rank, backend="torch", dtype="float32", seed=0)
            x = torch.randn(x_shape)
            plans = {}
            for label, min_bytes in (("buffers", default), ("no buffers", float("inf"))):
                workspace.MIN_BYTES = min_bytes
                plans[label] = plan_conv(k, x_shape, padding=1, strategy="factorized")
            workspace.MIN_BYTES = default
            results = {label: [] for label in plans}
            for _ in range(3):
                for label, plan in plans.items():
                    results[label].append(timed(lambda plan=plan: plan(x, k)))
            for label, runs in results.items():
                ms = ", ".join(f"{t:.1f}" for t, _ in runs)
                faults = ", ".join(f"{f:.0f}" for _, f in runs)
                print(f"{name:<20} {label:<11} ms per call: {ms}; page faults per call: {faults}")


if __name__ == "__main__":
    main()
