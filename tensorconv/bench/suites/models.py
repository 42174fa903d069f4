"""``tensorconv bench models``: see :func:`run`."""

from __future__ import annotations

from ..common import _r3d18
from ..timing import _Progress, measure_many


def run(args, targets):
    """A whole r3d_18 forward, dense against factorized (``tensorconv.nn.factorize``, CP at a
    quarter of each conv's parameters), torch CPU, eval, interleaved. Target: >= 2x at batch 1."""
    import torch

    from ...nn import factorize

    if not any(b == "torch" for b, _ in targets):
        return []
    rows = []
    batches = (1,) if args.quick else (1, 8)
    frames, size = (8, 112) if args.quick else (16, 112)
    torch.manual_seed(0)
    dense, source = _r3d18()
    dense = dense.eval()
    # one ALS sweep per layer: the speed of a layer does not depend on how well it fits
    factorized = factorize(dense, 0.25, factorization="cp", n_iter_max=1).eval()
    from ...nn.layers import _FactorizedConv

    def conv_params(model):
        return sum(
            m.weight.numel() if isinstance(m, torch.nn.modules.conv._ConvNd) else m.n_params
            for m in model.modules()
            if isinstance(m, (torch.nn.modules.conv._ConvNd, _FactorizedConv))
        )

    prog = _Progress(len(batches), "models")
    for batch in batches:
        x = torch.randn(batch, 3, frames, size, size)
        with torch.no_grad():
            t = measure_many(
                {"dense": lambda: dense(x), "factorized": lambda: factorized(x)},
                repeat=max(3, args.repeat // 2),
                budget_s=args.budget,
            )
        rows.append(
            dict(
                suite="models",
                model=source,
                batch=batch,
                input=[3, frames, size, size],
                dense_params=conv_params(dense),
                factorized_params=conv_params(factorized),
                **{
                    "dense ms": round(t["dense"]["median_ms"], 1),
                    "factorized ms": round(t["factorized"]["median_ms"], 1),
                },
                speedup=round(t["dense"]["median_ms"] / t["factorized"]["median_ms"], 2),
            )
        )
        prog.step(f"batch {batch}")
    prog.close()
    return rows
