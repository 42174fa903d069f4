"""The depthwise stages of a CP plan on torch CPU: three 1-D convs, 2-D + 1-D, or one 3x3x3 conv.

    python benchmarks/depthwise.py            # prints markdown tables

A CP kernel's spatial factors can run as one depthwise conv per mode (9 MACs per voxel for
k = 3, three passes over memory) or merged (U_0 x U_1 x U_2 -> a 3x3x3 depthwise kernel: 27
MACs per voxel, one pass). What wins decides the torch CPU cost model's
``depthwise_macs_per_s`` (tensorconv/plans/cost.py) and so what ``strategy="auto"`` runs.
Input (B, R, 16, 32, 32) channels-last (as the plans hold it), oneDNN via F.conv3d, interleaved
medians of 11 runs after 2 warm-ups; glibc told not to trim (see docs/benchmarks.md).
"""

import platform

import torch
import torch.nn.functional as F

from tensorconv.cli.bench import _set_malloc_no_trim, measure_many

POINTS = [(1, 16), (1, 64), (1, 128), (8, 32), (8, 96), (8, 128), (8, 192)]


def variants(x, r):
    w3 = torch.randn(r, 1, 3, 3, 3)
    w2 = torch.randn(r, 1, 1, 3, 3)
    wa, wb, wc = torch.randn(r, 1, 3, 1, 1), torch.randn(r, 1, 1, 3, 1), torch.randn(r, 1, 1, 1, 3)
    return {
        "three 1-D": lambda: F.conv3d(
            F.conv3d(F.conv3d(x, wc, None, 1, (0, 0, 1), 1, r), wb, None, 1, (0, 1, 0), 1, r),
            wa,
            None,
            1,
            (1, 0, 0),
            1,
            r,
        ),
        "1x3x3 + 3x1x1": lambda: F.conv3d(F.conv3d(x, w2, None, 1, (0, 1, 1), 1, r), wa, None, 1, (1, 0, 0), 1, r),
        "3x3x3": lambda: F.conv3d(x, w3, None, 1, 1, 1, r),
    }


def main():
    _set_malloc_no_trim()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n"
    )
    print("| B | R | three 1-D ms | 1x3x3 + 3x1x1 ms | 3x3x3 ms | 3x3x3 GMAC/s | three 1-D / 3x3x3 |")
    print("|---|---|---|---|---|---|---|")
    with torch.no_grad():
        for b, r in POINTS:
            x = torch.randn(b, 16, 32, 32, r).movedim(-1, 1)  # channels-last (B, R, D, H, W) view
            t = {k: v["median_ms"] for k, v in measure_many(variants(x, r), repeat=11).items()}
            gmacs = b * 16 * 32 * 32 * r * 27 / t["3x3x3"] / 1e6
            print(
                f"| {b} | {r} | {t['three 1-D']:.2f} | {t['1x3x3 + 3x1x1']:.2f} | {t['3x3x3']:.2f} | "
                f"{gmacs:.0f} | {t['three 1-D'] / t['3x3x3']:.2f} |"
            )


if __name__ == "__main__":
    main()
