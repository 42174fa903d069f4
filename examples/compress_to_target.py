"""Compress trained nets to a target: one global rank fraction against a budgeted plan.

Two nets are trained in this script, seeded (no pretrained weights are needed):

- ``digits``: a small 2-D CNN on scikit-learn's 8x8 digits, scored by accuracy;
- ``clips``: a small 3-D CNN on the moving-digits clips of ``examples/transduction.py`` (6 frames
  of 16x16; targets valence and arousal), scored by CCC (the mean of the two).

Each is compressed to fewer multiply-adds (2x, 4x; the digits also 8x) and to 2x less measured
time (a latency target, timed here at an evaluation batch), three ways:

- ``global``: ``factorize(model, fraction)`` with CP, one fraction of parameters for every conv
  with a spatial kernel (the largest fraction of a grid whose model meets the target);
- ``plan``: ``plan_compression(model, ..., target, budget=)``, which chooses per layer between
  keeping it dense, CP at one of several ranks, and a truncated SVD for the 1x1 convs and the
  linear layers, at the least sum of squared weight errors (a latency plan is measured and
  verified here);
- ``calibrated``: the same with ``calibration=`` four training batches: the errors are the
  layers' output errors after a least-squares refit of their output factors, and ``apply`` refits
  the chosen layers in network order on the compressed model's own activations.

Each is scored on held-out data right after compression and after a short fine-tune (the same
steps for all): on the labels, and distilled from the dense model (``distillation_loss``), over
several seeds; its MACs, parameters and measured speed-up against the dense net (interleaved) are
recorded. A target a method cannot reach is recorded as such. ``--quick`` is the run the docs
quote; ``--smoke`` is CI's (one seed, a few steps).

    python examples/compress_to_target.py --quick --out results/compress
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from tensorconv.metrics import ccc
from tensorconv.nn import (
    KruskalConv,
    LowRankConv,
    LowRankLinear,
    TuckerConv,
    distillation_loss,
    factorize,
    plan_compression,
)

FRACTIONS = (0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.075, 0.05)
TARGETS = (2.0, 4.0, 8.0)  # the digits' MAC targets (the docs' table and the smoke test read them)
METHODS = ("global", "plan", "calibrated")


# -- the two tasks ---------------------------------------------------------------------------------------------
def _sklearn_digits():
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:  # pragma: no cover - the test extra installs it
        raise SystemExit("this example needs scikit-learn (its wheel ships the digits): pip install scikit-learn")
    return sk_load()


def load_digits(seed, n_train=1400):
    d = _sklearn_digits()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[1400:]
    return (x[train], y[train]), (x[test], y[test])


def make_model():
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(128, 128, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * 2 * 2, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )


def _transduction_example():
    """examples/transduction.py, whose moving-digits clips the 3-D task uses."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "transduction.py")
    spec = importlib.util.spec_from_file_location("transduction_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: its dataclasses read their module there
    spec.loader.exec_module(module)
    return module


def load_clips(seed, n_train=1200, n_test=400):
    clips = _transduction_example()
    images, labels = clips.load_digits()
    rng = np.random.default_rng(seed)
    (xa, ya), (xb, yb) = clips.clips(images, labels, n_train, rng), clips.clips(images, labels, n_test, rng)
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return (as_t(xa), as_t(ya)), (as_t(xb), as_t(yb))


def make_clip_model():
    return nn.Sequential(
        nn.Conv3d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool3d((1, 2, 2)),
        nn.Conv3d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 2),
    )


@torch.no_grad()
def accuracy(model, data):
    x, y = data
    return float((model.eval()(x).argmax(1) == y).float().mean())


@torch.no_grad()
def clip_ccc(model, data):
    """Lin's concordance of valence and arousal on held-out clips, the mean of the two."""
    x, y = data
    out = model.eval()(x)
    return float(ccc(out.T.contiguous(), y.T.contiguous()).mean())


@dataclass(frozen=True)
class Task:
    name: str
    score_name: str
    load: Callable  # seed -> (train, test)
    make: Callable
    score: Callable  # (model, data) -> float
    kind: str  # distillation_loss's kind: "kl" for logits, "mse" for regression
    sample: tuple  # one sample's shape (batch 1): what the plan sees
    latency_batch: int  # the batch the latency target and the speed-ups are measured at
    mac_targets: tuple
    lr: float
    batch: int  # training batch


TASKS = {
    "digits": Task("digits", "accuracy", load_digits, make_model, accuracy, "kl", (1, 1, 8, 8), 256, TARGETS, 2e-3, 64),
    "clips": Task(
        "clips", "CCC", load_clips, make_clip_model, clip_ccc, "mse", (1, 1, 6, 16, 16), 64, (2.0, 4.0), 2e-3, 32
    ),
}
LATENCY_TARGET = 2.0


# -- training and measuring ------------------------------------------------------------------------------------
def train(task, model, data, steps, lr, seed, teacher=None):
    """Adam on the labels (cross-entropy or MSE); with a ``teacher``, on ``distillation_loss``."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (task.batch,), generator=g)
        out = model(x[idx])
        if teacher is not None:
            with torch.no_grad():
                soft = teacher(x[idx])
            temperature = 4.0 if task.kind == "kl" else 1.0
            loss = distillation_loss(out, soft, y[idx], temperature=temperature, alpha=0.5, kind=task.kind)
        elif task.kind == "kl":
            loss = nn.functional.cross_entropy(out, y[idx])
        else:
            loss = nn.functional.mse_loss(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def macs(model, shape):
    """Multiply-adds per sample of every conv and linear layer (factorized ones: their fewest-MAC order)."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, (KruskalConv, TuckerConv)):
            total += m.plan(tuple(args[0].shape)).min_macs  # the factorized form's, on any machine
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            total += out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in hooks:
        h.remove()
    return total


def params(model):
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def speedup(task, dense, small, repeat):
    """Dense time over compressed time at the task's latency batch: medians of runs interleaved
    (this VM's speed drifts over seconds; both models see the same drift), after a warm-up."""
    x = torch.randn((task.latency_batch,) + task.sample[1:], generator=torch.Generator().manual_seed(0))
    times = {dense: [], small: []}
    for model in times:
        model.eval()(x)
    for _ in range(repeat):
        for model, got in times.items():
            t0 = time.perf_counter()
            model(x)
            got.append(time.perf_counter() - t0)
    return float(np.median(times[dense]) / np.median(times[small]))


def global_fraction(task, model, budget, target, iters, repeat):
    """The largest CP fraction (of FRACTIONS) whose model meets the target (MACs counted, latency
    measured); the smallest one, marked unmet, if none does."""
    dense_macs = macs(model, task.sample)
    for fraction in FRACTIONS:
        small = factorize(model, fraction, factorization="cp", n_iter_max=1, layers=lambda n, m: m.in_channels > 1)
        met = (
            macs(small, task.sample) * target <= dense_macs
            if budget == "macs"
            else speedup(task, model, small, repeat) >= target
        )
        if met:
            break
    small = factorize(model, fraction, factorization="cp", n_iter_max=iters, layers=lambda n, m: m.in_channels > 1)
    return small, {"fraction": fraction, "met": met}


def compress(task, model, method, budget, target, iters, batches, repeat, fractions):
    """The compressed model and what to record of how it was made, or (None, why) if the target
    cannot be reached."""
    if method == "global":
        return global_fraction(task, model, budget, target, iters, repeat)
    sample = task.sample if budget == "macs" else (task.latency_batch,) + task.sample[1:]
    calibration = batches if method == "calibrated" else None
    kw = dict(target=target, budget=budget, factorizations=("cp", "svd"), fit_iterations=iters, repeat=repeat)
    if fractions is not None:
        kw["fractions"] = fractions
    try:
        plan = plan_compression(model, sample, **kw, calibration=calibration)
    except ValueError as e:  # the parts it cannot factorize already cost more than the target allows
        return None, {"unreachable": str(e)}
    small = plan.apply(model, n_iter_max=iters, calibration=calibration)
    extra = {"choices": {k: [f, r] for k, (f, r) in plan.choices.items()}}
    if plan.verified:
        v = plan.verified
        extra.update(verified_speedup=round(v["dense"] / v["compressed"], 3), verify_rounds=v["rounds"])
    return small, extra


def run(task, seeds, train_steps, tune_steps, iters, repeat, fractions=None):
    rows = []
    targets = [("macs", t) for t in task.mac_targets] + [("latency", LATENCY_TARGET)]
    for seed in seeds:
        torch.manual_seed(seed)
        train_data, test_data = task.load(seed)
        model = train(task, task.make(), train_data, train_steps, task.lr, seed)
        base = {"score": task.score(model, test_data), "params": params(model), "macs": macs(model, task.sample)}
        base.update(score_tuned=base["score"], score_distilled=base["score"], speedup=1.0)
        rows.append({"task": task.name, "seed": seed, "method": "dense", "budget": "-", "target": 1.0, **base})
        batches = [train_data[0][i : i + 128] for i in range(0, 512, 128)]
        for budget, target in targets:
            for method in METHODS:
                t0 = time.perf_counter()
                small, extra = compress(task, model, method, budget, target, iters, batches, repeat, fractions)
                row = {"task": task.name, "seed": seed, "method": method, "budget": budget, "target": target}
                row.update(seconds=round(time.perf_counter() - t0, 2), **extra)
                if small is None:
                    rows.append(row)
                    print(f"{task.name} seed {seed} {target}x {budget} {method}: not reachable", flush=True)
                    continue
                row.update(score=task.score(small, test_data), params=params(small), macs=macs(small, task.sample))
                row["speedup"] = speedup(task, model, small, repeat)
                row["low_rank_layers"] = sum(isinstance(m, (LowRankConv, LowRankLinear)) for m in small.modules())
                student = copy.deepcopy(small)
                tuned = train(task, small, train_data, tune_steps, task.lr / 4, seed + 1)
                row["score_tuned"] = task.score(tuned, test_data)
                taught = train(task, student, train_data, tune_steps, task.lr / 4, seed + 1, teacher=model)
                row["score_distilled"] = task.score(taught, test_data)
                rows.append(row)
                print(
                    f"{task.name} seed {seed} {target}x {budget} {method:10s}: {task.score_name} {row['score']:.3f} "
                    f"-> tuned {row['score_tuned']:.3f} / distilled {row['score_distilled']:.3f}, MACs "
                    f"{base['macs'] / row['macs']:.2f}x fewer, params {base['params'] / row['params']:.2f}x fewer, "
                    f"{row['speedup']:.2f}x faster",
                    flush=True,
                )
    return rows


# -- reporting -------------------------------------------------------------------------------------------------
def summary(rows, task):
    lines = [
        f"| target | method | {task.score_name} (after compression) | fine-tuned on labels | distilled from dense | "
        f"MACs fewer | params fewer | measured speed-up (batch {task.latency_batch}) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for r in rows if r["task"] == task.name]
    dense = {r["seed"]: r for r in rows if r["method"] == "dense"}
    keys = [("-", 1.0)] + [("macs", t) for t in task.mac_targets] + [("latency", LATENCY_TARGET)]
    for budget, target in keys:
        label = "1x" if budget == "-" else f"{target:g}x {'MACs' if budget == 'macs' else 'latency'}"
        for method in ("dense",) if budget == "-" else METHODS:
            sel = [r for r in rows if r["budget"] == budget and r["target"] == target and r["method"] == method]
            if any("score" not in r for r in sel):
                lines.append(f"| {label} | {method} | not reachable | - | - | - | - | - |")
                continue
            if any(r.get("met") is False for r in sel):
                method += " (target not met)"
            got = [r["score"] for r in sel]
            ratio = lambda key: np.median([dense[r["seed"]][key] / r[key] for r in sel])  # noqa: E731
            lines.append(
                f"| {label} | {method} | {np.median(got):.3f} ({min(got):.3f}-{max(got):.3f}) | "
                f"{np.median([r['score_tuned'] for r in sel]):.3f} | "
                f"{np.median([r['score_distilled'] for r in sel]):.3f} | {ratio('macs'):.2f}x | "
                f"{ratio('params'):.2f}x | {np.median([r['speedup'] for r in sel]):.2f}x |"
            )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TASKS), figsize=(9, 3.2))
    for ax, task in zip(axes, TASKS.values()):
        keys = [("macs", t) for t in task.mac_targets] + [("latency", LATENCY_TARGET)]
        for method, marker, shift in (("global", "o", -0.15), ("plan", "s", 0.0), ("calibrated", "^", 0.15)):
            for key, alpha in (("score", 1.0), ("score_tuned", 0.4)):
                sel = [
                    (i, r)
                    for i, k in enumerate(keys)
                    for r in rows
                    if r["task"] == task.name and (r["budget"], r["target"]) == k and r["method"] == method and key in r
                ]
                ax.scatter(
                    [i + shift for i, _ in sel],
                    [r[key] for _, r in sel],
                    marker=marker,
                    alpha=alpha,
                    label=f"{method} ({'after fine-tune' if key.endswith('tuned') else 'compressed'})",
                )
        ax.set_xticks(range(len(keys)), [f"{t:g}x {'MACs' if b == 'macs' else 'time'}" for b, t in keys])
        ax.set_ylabel(f"test {task.score_name} ({task.name})")
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, the run the docs quote")
    parser.add_argument("--smoke", action="store_true", help="1 seed, a few steps (CI)")
    parser.add_argument("--task", action="append", choices=list(TASKS), help="which nets (default both)")
    parser.add_argument("--out", default="results/compress_to_target")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # (seeds, train steps, fine-tune steps, fit iterations, timing rounds[, the plans' fractions]) per task
    if args.smoke:
        few = (1 / 16, 1 / 4)  # fewer options to fit and time: the smoke run checks the plumbing
        settings = {"digits": ((0,), 30, 5, 3, 2, few), "clips": ((0,), 10, 3, 3, 2, few)}
    elif args.quick:
        settings = {"digits": ((0, 1, 2), 600, 40, 25, 5), "clips": ((0, 1, 2), 600, 25, 25, 5)}
    else:
        settings = {"digits": ((0, 1, 2, 3, 4), 1500, 300, 50, 7), "clips": ((0, 1, 2, 3, 4), 1500, 150, 50, 7)}
    t0 = time.perf_counter()
    rows, tables = [], []
    for name in args.task or list(TASKS):
        task = TASKS[name]
        rows += run(task, *settings[name])
        tables.append(f"{task.name}:\n\n{summary(rows, task)}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        meta = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__}
        meta.update(threads=torch.get_num_threads(), seconds=round(time.perf_counter() - t0, 1))
        json.dump({"settings": settings, **meta, "rows": rows}, fh, indent=1)
    plot(rows, os.path.join(args.out, "compress_to_target.png"))
    table = "\n\n".join(tables)
    print(table)
    return table


if __name__ == "__main__":
    main()
