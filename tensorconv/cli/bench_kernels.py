"""``tensorconv bench`` suites that look inside a plan on torch CPU: each accelerator against the
unfused plan and dense convolution, depthwise stages merged or not, whether ``auto`` picks the
faster plan, peak memory of a training step, and per-layer times of a factorized r3d_18.

Each suite returns rows (dicts) like the others in :mod:`tensorconv.cli.bench`; every ratio
is measured in one run, interleaved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from ..kernels import KruskalKernel
from ..plans.plan import conv, plan_conv
from .bench import _Progress, _r3d18, measure_many

__all__ = ["suite_accelerators", "suite_depthwise", "suite_auto", "suite_memory", "suite_layers", "suite_varlen"]


def _torch_cpu(targets):
    return any(b == "torch" and str(d).startswith("cpu") for b, d in targets)


def _ms(t, name):
    return round(t[name]["median_ms"], 2)


def _ratio(t, a, b):
    return round(t[a]["median_ms"] / t[b]["median_ms"], 2)


def suite_accelerators(args, targets):
    """Each registered accelerator that ``auto`` weighs (the plane chain on torch CPU), forward
    and forward+backward: (B, C, 16, 32, 32), CP C -> C, 3x3x3, rank R, padding 1, float32,
    against dense Conv3d and the plan ``auto`` makes without any accelerator
    (``plan_conv(accelerators=())``); "auto runs" is what ``auto`` picks with them."""
    import torch

    from .. import accelerators

    if not _torch_cpu(targets):
        return []
    accs = [a for a in accelerators.registered() if "auto" in a.serves]
    points = [(1, 32, 32), (8, 32, 96)] if args.quick else [(1, 16, 16), (1, 64, 64), (1, 128, 128), (8, 32, 32)]
    points += [] if args.quick else [(8, 32, 96), (8, 32, 192), (8, 128, 128)]
    rows = []
    prog = _Progress(2 * len(points) * len(accs), "accelerators")
    for acc in accs:
        if not acc.build():
            print(f"accelerators: {acc.name} is not available here ({acc.status()}); skipped", file=sys.stderr)
            continue
        for b, c, r in points:
            shape = (b, c, 16, 32, 32)
            w = torch.randn(c, c, 3, 3, 3)
            x = torch.randn(shape)
            for grad in (False, True):
                k = KruskalKernel.random((c, c, 3, 3, 3), r, backend="torch", dtype="float32", seed=1)
                xx, ww = (x.clone().requires_grad_(True), w.clone().requires_grad_(True)) if grad else (x, w)
                for leaf in [k.weights] + list(k.factors):
                    leaf.requires_grad_(grad)
                unfused = plan_conv(k, shape, padding=1, accelerators=())
                mine = plan_conv(k, shape, padding=1, strategy="fused", accelerators=(acc.name,))
                auto = plan_conv(k, shape, padding=1)

                def run(fn, grad=grad):
                    out = fn()
                    if grad:
                        out.sum().backward()
                    return out

                entries = {
                    "dense": lambda: run(lambda: torch.nn.functional.conv3d(xx, ww, padding=1)),
                    "unfused": lambda: run(lambda: unfused(xx, k)),
                    "accelerator": lambda: run(lambda: mine(xx, k)),
                }
                with torch.set_grad_enabled(grad):
                    t = measure_many(entries, repeat=max(3, args.repeat // (2 if grad else 1)), budget_s=args.budget)
                rows.append(
                    dict(
                        suite="accelerators",
                        accelerator=acc.name,
                        pass_="forward+backward" if grad else "forward",
                        B=b,
                        C=c,
                        R=r,
                        **{
                            "dense ms": _ms(t, "dense"),
                            "unfused auto ms": _ms(t, "unfused"),
                            "accelerator ms": _ms(t, "accelerator"),
                            "auto runs": "-" if grad else (auto.accelerator or auto.strategy),
                            "unfused / accelerator": round(
                                t["unfused"]["median_ms"] / t["accelerator"]["median_ms"], 2
                            ),
                            "dense / accelerator": round(t["dense"]["median_ms"] / t["accelerator"]["median_ms"], 2),
                        },
                    )
                )
                prog.step(f"{acc.name} {'fwd+bwd' if grad else 'fwd'} B={b} C={c} R={r}")
    prog.close()
    return rows


def suite_depthwise(args, targets):
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


def suite_auto(args, targets):
    """Does ``auto`` pick the faster plan? CP kernels at R = C, 3x3(x3), padding 1, input
    (2, C, 64, 64) and (2, C, 16, 32, 32), float32 and float64, each backend present: the plan
    ``auto`` runs against ``factorized`` and ``reconstructed``, interleaved. "auto / best": the
    time of what auto runs over the faster of the two fixed strategies."""
    from ..backends import backend_for_name
    from .bench import _array_device

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


_MEMORY = r"""
import json, sys
import torch
from tensorconv import KruskalKernel, conv
from tensorconv.cli.bench import _set_malloc_no_trim
_set_malloc_no_trim()
torch.set_num_threads(2)
b, c, mult, how = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
x = torch.randn(b, c, 16, 32, 32, requires_grad=True)
k = KruskalKernel.random((c, c, 3, 3, 3), rank=mult * c, backend="torch", dtype="float32", seed=0)
w = torch.randn(c, c, 3, 3, 3, requires_grad=True)
for t in [k.weights] + list(k.factors):
    t.requires_grad_(True)
def step():
    y = torch.nn.functional.conv3d(x, w, padding=1) if how == "dense" else conv(x, k, padding=1, strategy=how)
    y.sum().backward()
def rss():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
conv(torch.randn(1, c, 4, 4, 4), k, padding=1, strategy="fused")  # the kernel's library loaded first
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts from here
base, _ = rss()
step()
_, peak = rss()
print(json.dumps({"mib": (peak - base) / 2**20}))
"""


def suite_memory(args, targets):
    """Peak memory of one forward+backward (torch CPU, float32, (B, C, 16, 32, 32), 3x3x3, rank
    R): dense Conv3d, the unfused CP plan, and ``fused`` (the plane chain and its backward, which
    keeps only the input and the factors). Each in a fresh process (Linux): its peak resident
    set (VmHWM, reset just before the step) minus its resident set then."""
    if not _torch_cpu(targets):
        return []
    points = [(8, 32, 1)] if args.quick else [(8, 32, 1), (8, 32, 3), (8, 64, 1)]
    rows = []
    prog = _Progress(len(points), "memory")
    for b, c, mult in points:
        cells = {}
        for how in ("dense", "factorized", "fused"):
            out = subprocess.run(
                [sys.executable, "-c", _MEMORY, str(b), str(c), str(mult), how], capture_output=True, text=True
            )
            cells[f"{how} MiB"] = (
                round(json.loads(out.stdout.strip().splitlines()[-1])["mib"]) if out.returncode == 0 else "failed"
            )
        rows.append(dict(suite="memory", B=b, C=c, R=f"{mult}C", **cells))
        prog.step(f"B={b} C={c} R={mult}C")
    prog.close()
    return rows


def suite_layers(args, targets):
    """Per-layer forward times of r3d_18 (batch 1, 3x16x112x112; quick: 8 frames), dense against
    ``factorize(model, 0.25)`` (CP), from forward hooks on every conv, medians: which layers a
    whole-network ratio (``models``) comes from, and what ``auto`` runs there."""
    import torch

    if not _torch_cpu(targets):
        return []
    from ..nn import factorize
    from ..nn.layers import _FactorizedConv

    torch.manual_seed(0)
    dense, source = _r3d18()
    dense = dense.eval()
    fact = factorize(dense, 0.25, n_iter_max=1).eval()
    frames = 8 if args.quick else 16
    x = torch.randn(1, 3, frames, 112, 112)
    times = {}
    for tag, model in (("dense", dense), ("factorized", fact)):
        for name, m in model.named_modules():
            if isinstance(m, (torch.nn.modules.conv._ConvNd, _FactorizedConv)):
                m.register_forward_pre_hook(lambda mod, a: setattr(mod, "_t0", time.perf_counter()))
                m.register_forward_hook(
                    lambda mod, a, o, key=(tag, name): times.setdefault(key, []).append(time.perf_counter() - mod._t0)
                )
    inputs = {}

    def record_input(name):
        def hook(module, args, output):  # returns None: the output stays as it is
            inputs.setdefault(name, tuple(args[0].shape))

        return hook

    for name, m in fact.named_modules():
        if isinstance(m, _FactorizedConv):
            m.register_forward_hook(record_input(name))
    with torch.no_grad():
        for _ in range(max(3, args.repeat)):
            dense(x)
            fact(x)
    rows = []
    layers = dict(fact.named_modules())
    for name in sorted({n for _, n in times}):
        med = {tag: 1e3 * sorted(times[(tag, name)])[len(times[(tag, name)]) // 2] for tag in ("dense", "factorized")}
        layer = layers[name]
        runs = "-"
        if name in inputs:
            plan = plan_conv(
                layer.kernel,
                inputs[name],
                stride=layer.stride,
                padding=layer.padding,
                dilation=layer.dilation,
                strategy=layer.strategy,
            )
            runs = plan.accelerator or (f"{plan.strategy}, {plan.order}" if plan.order else plan.strategy)
        rows.append(
            dict(
                suite="layers",
                model=source,
                layer=name,
                kind=type(layer).__name__,
                rank=getattr(layer, "rank", "-"),
                **{
                    "dense ms": round(med["dense"], 2),
                    "factorized ms": round(med["factorized"], 2),
                    "dense / factorized": round(med["dense"] / med["factorized"], 2),
                    "auto runs": runs,
                },
            )
        )
    return rows


def suite_varlen(args, targets):
    """Planning once, not per shape: a Conv1d model (6 convs of kernel 3 widening 32 -> 128
    channels, batch 8) dense and ``factorize(model, 0.25)``, fed 150 different lengths
    (100..249) in turn, against the same models at one length (175). A timed run is one sweep of
    150 forwards; after the warm-up sweeps every length has been seen, so what a sweep costs
    beyond the fixed length is what a new or evicted shape costs (tensorconv's plans, and the
    native convs' own per-shape caches: oneDNN keeps ONEDNN_PRIMITIVE_CACHE_CAPACITY primitives,
    1024 by default, which the row's environment prints)."""
    import torch

    from ..nn import factorize

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
    fixed = [torch.randn(8, widths[0], 175)] * len(inputs)

    def sweep(model, xs):
        def run():
            with torch.no_grad():
                for x in xs:
                    model(x)

        return run

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
