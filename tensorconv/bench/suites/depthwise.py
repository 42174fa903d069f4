"""``tensorconv bench depthwise``: see :func:`run`."""

from __future__ import annotations

from ..common import _ms, _torch_cpu
from ..timing import _Progress, measure_many


def run(args, targets):
    """A CP plan's depthwise stages on torch CPU, channels-last (B, R, 16, 32, 32): three 1-D
    convs (9 MACs per voxel, three passes), 1x3x3 + 3x1x1, or one merged 3x3x3 (27 MACs, one
    pass). What wins sets the torch CPU cost model's ``depthwise_macs_per_s``."""
    import torch
    import torch.nn.functional as F

    if not _torch_cpu(targets):
        return []
    points = [(1, 64), (8, 96)] if args.quick else [(1, 16), (1, 64), (1, 128), (8, 32), (8, 96), (8, 128), (8, 192)]
    rows = []
    prog = _Progress(len(points), "depthwise")
    for b, r in points:
        x = torch.randn(b, 16, 32, 32, r).movedim(-1, 1)  # channels-last (B, R, D, H, W) view
        w3, w2 = torch.randn(r, 1, 3, 3, 3), torch.randn(r, 1, 1, 3, 3)
        wa, wb, wc = torch.randn(r, 1, 3, 1, 1), torch.randn(r, 1, 1, 3, 1), torch.randn(r, 1, 1, 1, 3)
        variants = {
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
        with torch.no_grad():
            t = measure_many(variants, repeat=args.repeat, budget_s=args.budget)
        rows.append(
            dict(
                suite="depthwise",
                B=b,
                R=r,
                **{f"{name} ms": _ms(t, name) for name in variants},
                **{"3x3x3 GMAC/s": round(b * 16 * 32 * 32 * r * 27 / t["3x3x3"]["median_ms"] / 1e6)},
                **{"three 1-D / 3x3x3": round(t["three 1-D"]["median_ms"] / t["3x3x3"]["median_ms"], 2)},
            )
        )
        prog.step(f"B={b} R={r}")
    prog.close()
    return rows
