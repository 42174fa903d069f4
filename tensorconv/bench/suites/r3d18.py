"""``tensorconv bench r3d18``: see :func:`run`."""

from __future__ import annotations

from ...kernels import KruskalKernel
from ...plans.plan import conv, plan_conv
from ..common import R3D18_CONVS, _array_device, _label, _make_input, _priced_accelerator, params_matched_rank
from ..timing import _Progress, measure_many


def run(args, targets):
    """auto against its own options on r3d_18's conv shapes, CP kernels at the parameter-matched
    rank (the paper's): the time auto's choice takes over the best of factorized, reconstructed
    and (where built) the plane chain, interleaved. Target: <= 1.15 at every layer."""
    rows = []
    convs = R3D18_CONVS[1:4] if args.quick else R3D18_CONVS
    torch_targets = [(b, d) for b, d in targets if b == "torch"]
    prog = _Progress(len(convs) * len(torch_targets), "r3d18")
    for backend, device in torch_targets:
        for name, c, t, ks, stride, padding, spatial in convs:
            shape = (args.batch, c) + spatial
            x = _make_input(backend, device, shape)
            k = KruskalKernel.random(
                (t, c) + ks,
                params_matched_rank(c, t, ks),
                backend=backend,
                dtype="float32",
                device=_array_device(device),
                seed=3,
            )
            geo = dict(stride=stride, padding=padding)
            options = {s: plan_conv(k, shape, strategy=s, **geo) for s in ("auto", "factorized", "reconstructed")}
            candidates = {
                s: (lambda s=s: conv(x, k, strategy=s, **geo)) for s in ("auto", "factorized", "reconstructed")
            }
            fused = plan_conv(k, shape, strategy="fused", **geo)
            if _priced_accelerator(fused) and getattr(args, "accelerators_built", {}).get(fused.accelerator):
                candidates["fused"] = lambda: conv(x, k, strategy="fused", **geo)
            import torch  # torch targets only

            with torch.no_grad():
                t_all = measure_many(candidates, device=device, repeat=args.repeat, budget_s=args.budget)
            chosen = options["auto"].strategy + (f" ({options['auto'].order})" if options["auto"].order else "")
            best = min((s for s in t_all if s != "auto"), key=lambda s: t_all[s]["median_ms"])
            rows.append(
                dict(
                    suite="r3d18",
                    layer=name,
                    backend=_label(backend, device),
                    batch=args.batch,
                    channels=c,
                    out_channels=t,
                    rank=k.rank,
                    auto=chosen,
                    **{f"{s} ms": round(v["median_ms"], 3) for s, v in t_all.items()},
                    best=best,
                    auto_over_best=round(t_all["auto"]["median_ms"] / t_all[best]["median_ms"], 3),
                    estimates={s: round(v * 1e3, 3) for s, v in options["auto"].estimates.items()},
                )
            )
            prog.step(f"{name} {backend}")
    prog.close()
    return rows
