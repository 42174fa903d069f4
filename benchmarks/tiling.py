"""Tile-size sweep of the tiled fused runner (tensorconv.plans.fused.FusedRunner), against the
unfused plan, on torch CPU and NumPy. This is the measurement behind two choices: torch's
`fused` strategy uses torch.compile rather than tiles, and NumPy's tiles are 8 MiB.

    python benchmarks/tiling.py
"""

import numpy as np

from tensorconv import KruskalKernel, plan_conv
from tensorconv.backends import get_backend
from tensorconv.cli.bench import _set_malloc_no_trim, measure
from tensorconv.plans.fused import FusedRunner
from tensorconv.plans.structure import weight_arrays

TILES = (256 << 10, 1 << 20, 4 << 20, 8 << 20)


def med(fn):
    return measure(fn, warmup=1, repeat=5)["median_ms"]


def sweep(backend_name, batch, c, mult):
    k = KruskalKernel.random((c, c, 3, 3, 3), rank=mult * c, backend=backend_name, dtype="float32", seed=0)
    host = np.random.default_rng(0).standard_normal((batch, c, 16, 32, 32)).astype(np.float32)
    if backend_name == "torch":
        import torch

        x = torch.from_numpy(host)
    else:
        x = host
    plan = plan_conv(k, x.shape, padding=1, strategy="factorized", dtype="float32", backend=backend_name)
    b = get_backend(x)
    arrays = weight_arrays(k, plan.structure, b)
    unfused = med(lambda: plan(x, k))
    cells = []
    for tile in TILES:
        runner = FusedRunner(plan, tile_bytes=tile)
        cells.append(med(lambda: runner(b, x, [None] + list(arrays))))
    print(
        f"| {backend_name} | {batch} | {c} | {mult}C | {unfused:.1f} | " + " | ".join(f"{t:.1f}" for t in cells) + " |"
    )


def main():
    _set_malloc_no_trim()
    print("| backend | B | C | R | unfused ms | " + " | ".join(f"tiles {t >> 10} KiB ms" for t in TILES) + " |")
    print("|---|---|---|---|---|" + "---|" * len(TILES))
    try:
        import torch

        torch.set_num_threads(2)
        for c, mult in ((32, 3), (32, 1), (128, 1)):
            sweep("torch", 8, c, mult)
    except ImportError:
        pass
    for c, mult in ((32, 3), (32, 1)):
        sweep("numpy", 2, c, mult)


if __name__ == "__main__":
    main()
