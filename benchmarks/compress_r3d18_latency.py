"""plan_compression(budget="latency", target=2.0) on torchvision's r3d_18 (random weights: the
errors mean nothing here, the times do): the plan's predicted time (``plan.total()``: after a
verification, what it measured of the compressed architecture) against the applied model's time,
at batch 1 (3 x 16 x 112 x 112), dense and compressed timed interleaved in this plain process (no
allocator settings) after the plan is applied. Three plans: the plans' cost model
alone (verify=0), the cost model with the default verification rounds, and measure=True with them.

    python benchmarks/compress_r3d18_latency.py --out results/r3d18-latency.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from tensorconv._torchvision import torchvision_models
from tensorconv.nn import plan_compression

SHAPE = (1, 3, 16, 112, 112)


def interleaved(dense, small, x, repeat):
    times = {"dense": [], "small": []}
    with torch.no_grad():
        dense(x), small(x)
        for _ in range(repeat):
            for name, model in (("dense", dense), ("small", small)):
                t0 = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--repeat", type=int, default=7, help="rounds of the final timing")
    parser.add_argument(
        "--mode",
        action="append",
        choices=["cost model", "cost model, verified", "measured, verified"],
        help="which plans (repeatable; default all three)",
    )
    parser.add_argument("--plan-repeat", type=int, default=5, help="plan_compression's repeat=")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = torchvision_models().video.r3d_18().eval()
    x = torch.randn(SHAPE)
    runs = {}
    modes = {"cost model": (False, 0), "cost model, verified": (False, None), "measured, verified": (True, None)}
    for mode in args.mode or list(modes):
        measure, verify = modes[mode]
        t0 = time.perf_counter()
        plan = plan_compression(
            model,
            SHAPE,
            target=2.0,
            budget="latency",
            factorizations=("cp", "tucker"),
            fractions=(1 / 16, 1 / 8, 1 / 4, 1 / 2),
            fit_iterations=1,
            measure=measure,
            verify=verify,
            repeat=args.plan_repeat,
        )
        planning = time.perf_counter() - t0
        small = plan.apply(model, n_iter_max=1).eval()
        got = interleaved(model, small, x, args.repeat)
        runs[mode] = {
            "planning_s": round(planning, 1),
            "predicted_dense_ms": round(plan.dense_total * 1e3, 1),
            "predicted_small_ms": round(plan.total() * 1e3, 1),
            "measured_dense_ms": round(got["dense"] * 1e3, 1),
            "measured_small_ms": round(got["small"] * 1e3, 1),
            "measured_speedup": round(got["dense"] / got["small"], 2),
            "prediction_error": round(plan.total() / got["small"] - 1, 3),
            # the prediction the plan made before its last verification measured it
            "predicted_before_verify_ms": round(plan.verified["predicted"] * 1e3, 1) if plan.verified else None,
            "verify_rounds": plan.verified["rounds"] if plan.verified else 0,
            "time_scale": {k: round(v, 3) for k, v in plan.time_scale.items()},
            "choices": {k: [f, r] for k, (f, r) in plan.choices.items()},
        }
        r = runs[mode]
        print(
            f"{mode}: predicted {r['predicted_dense_ms']} -> {r['predicted_small_ms']} ms, measured "
            f"{r['measured_dense_ms']} -> {r['measured_small_ms']} ms ({r['measured_speedup']}x), "
            f"prediction off by {r['prediction_error']:+.0%}; {r['verify_rounds']} verify round(s), scales {r['time_scale']}",
            flush=True,
        )
    result = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": runs,
    }
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
