"""``tensorconv bench varlen``: see :func:`run`."""

from __future__ import annotations

import os

from ..timing import _Progress, measure_many


def run(args, targets):
    """Planning once, not per shape: a Conv1d model (6 convs of kernel 3 widening 32 -> 128
    channels, batch 8) dense and ``factorize(model, 0.25)``, fed 150 different lengths
    (100..249) in turn, against the same models fed 150 batches of one length (175). A timed run
    is one sweep of 150 forwards; after the warm-up sweeps every length has been seen, so what a
    sweep costs beyond the fixed length is what a new or evicted shape costs (tensorconv's plans,
    and the native convs' own per-shape caches: oneDNN keeps ONEDNN_PRIMITIVE_CACHE_CAPACITY
    primitives, 1024 by default, which the row's environment prints)."""
    import torch

    from ...nn import factorize

    if not any(b == "torch" for b, _ in targets):
        return []
    torch.manual_seed(0)
    layers = []
    widths = (32, 48, 64, 80, 96, 112, 128)
    for c, t in zip(widths, widths[1:]):
        layers += [torch.nn.Conv1d(c, t, 3, padding=1), torch.nn.ReLU()]
    dense = torch.nn.Sequential(*layers).eval()
    factorized = factorize(dense, 0.25, n_iter_max=10).eval()
    lengths = range(100, 250)
    inputs = [torch.randn(8, widths[0], n) for n in lengths]
    # a stream of distinct batches, as the 150 lengths are (and as users feed one length)
    fixed = [torch.randn(8, widths[0], 175) for _ in inputs]

    def sweep(model, xs):
        def forward_all():
            with torch.no_grad():
                for x in xs:
                    model(x)

        return forward_all

    entries = {
        "dense, 150 lengths": sweep(dense, inputs),
        "factorized, 150 lengths": sweep(factorized, inputs),
        "dense, one length": sweep(dense, fixed),
        "factorized, one length": sweep(factorized, fixed),
    }
    prog = _Progress(1, "varlen")
    t = measure_many(entries, repeat=max(3, args.repeat), budget_s=args.budget)
    prog.step("Conv1d x4")
    prog.close()
    per = {name: t[name]["median_ms"] / len(inputs) for name in t}
    return [
        dict(
            suite="varlen",
            model="6 x Conv1d(32 -> 128, 3), batch 8",
            onednn_primitive_cache=os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024 (default)"),
            case=name,
            ms_per_forward=round(per[name], 3),
            vs_factorized_one_length=round(per[name] / per["factorized, one length"], 2),
            dense_over_factorized=round(per[name.replace("factorized", "dense")] / per[name], 2)
            if name.startswith("factorized")
            else None,
        )
        for name in entries
    ]
