"""Compress a trained CNN to fewer multiply-adds: one global rank fraction against a budgeted plan.

A small CNN is trained on scikit-learn's digits (seeded, in this script: no pretrained weights
are needed), then compressed to 2x and 4x fewer MACs two ways:

- ``global``: ``factorize(model, fraction)`` with CP, one fraction of parameters for every conv
  with a spatial kernel (the largest fraction whose model meets the MAC target);
- ``plan``: ``plan_compression(model, ..., target, budget="macs")``, which chooses per layer between
  keeping it dense, CP at one of several ranks, and a truncated SVD for the 1x1 conv and the
  linear layers, at the least sum of squared weight errors;
- ``calibrated``: the same with ``calibration=`` four training batches: the errors are the
  layers' output errors after a least-squares refit of their output factors, and ``apply`` refits
  the chosen layers in network order on the compressed model's own activations.

Each is scored on the held-out digits right after compression and after a short fine-tune (the
same steps for all): on the labels, and distilled from the dense model (``distillation_loss``,
temperature 4, half labels, half teacher), over several seeds. ``--quick`` is the run the docs quote; ``--smoke`` is
CI's (one seed, a few steps).

    python examples/compress_to_target.py --quick --out results/compress
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
from torch import nn

from tensorconv.nn import (
    KruskalConv,
    LowRankConv,
    LowRankLinear,
    TuckerConv,
    distillation_loss,
    factorize,
    plan_compression,
)

TARGETS = (2.0, 4.0, 8.0)
FRACTIONS = (0.75, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.075, 0.05)


def load_digits(seed):
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:  # pragma: no cover - the test extra installs it
        raise SystemExit("this example needs scikit-learn (its wheel ships the digits): pip install scikit-learn")
    d = sk_load()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1400], order[1400:]
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


def train(model, data, steps, lr, seed, teacher=None):
    """Adam on cross-entropy; with a ``teacher``, on ``distillation_loss`` against its outputs."""
    x, y = data
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        out = model(x[idx])
        if teacher is None:
            loss = nn.functional.cross_entropy(out, y[idx])
        else:
            with torch.no_grad():
                soft = teacher(x[idx])
            loss = distillation_loss(out, soft, y[idx], temperature=4.0, alpha=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, data):
    x, y = data
    return float((model.eval()(x).argmax(1) == y).float().mean())


def macs(model, shape=(1, 1, 8, 8)):
    """Multiply-adds per sample of every conv and linear layer (factorized ones: their fewest-MAC order)."""
    total = 0

    def hook(m, args, out):
        nonlocal total
        if isinstance(m, (KruskalConv, TuckerConv)):
            total += m.plan(tuple(args[0].shape)).min_macs  # the factorized form's, on any machine
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features
        elif isinstance(m, nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * math.prod(m.kernel_size)

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in hooks:
        h.remove()
    return total


def params(model):
    return sum(p.numel() for p in model.parameters())


def global_fraction(model, target, iters):
    """The largest CP fraction (of FRACTIONS) whose model has at most 1/target of the MACs."""
    dense = macs(model)
    for fraction in FRACTIONS:
        small = factorize(model, fraction, factorization="cp", n_iter_max=iters, layers=lambda n, m: m.in_channels > 1)
        if macs(small) * target <= dense:
            return small, fraction
    return small, fraction


def run(seeds, train_steps, tune_steps, iters):
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        train_data, test_data = load_digits(seed)
        model = train(make_model(), train_data, train_steps, 2e-3, seed)
        base = {"accuracy": accuracy(model, test_data), "params": params(model), "macs": macs(model)}
        base.update(accuracy_tuned=base["accuracy"], accuracy_distilled=base["accuracy"])
        rows.append({"seed": seed, "method": "dense", "target": 1.0, **base})
        for target in TARGETS:
            t0 = time.perf_counter()
            small_g, fraction = global_fraction(model, target, iters)
            t1 = time.perf_counter()
            kw = dict(target=target, budget="macs", factorizations=("cp", "svd"), fit_iterations=iters)
            plan = plan_compression(model, (1, 1, 8, 8), **kw)
            small_p = plan.apply(model, n_iter_max=iters)
            t2 = time.perf_counter()
            # a few training batches: each option's error is its output error after a least-squares
            # refit, and apply refits the chosen layers in network order
            batches = [train_data[0][i : i + 128] for i in range(0, 512, 128)]
            plan_c = plan_compression(model, (1, 1, 8, 8), **kw, calibration=batches)
            small_c = plan_c.apply(model, n_iter_max=iters, calibration=batches)
            t3 = time.perf_counter()
            for method, small, seconds, extra in (
                ("global", small_g, t1 - t0, {"fraction": fraction}),
                ("plan", small_p, t2 - t1, {"choices": {k: [f, r] for k, (f, r) in plan.choices.items()}}),
                ("calibrated", small_c, t3 - t2, {"choices": {k: [f, r] for k, (f, r) in plan_c.choices.items()}}),
            ):
                row = {"seed": seed, "method": method, "target": target, "seconds": round(seconds, 2), **extra}
                row.update(accuracy=accuracy(small, test_data), params=params(small), macs=macs(small))
                student = copy.deepcopy(small)
                row["accuracy_tuned"] = accuracy(train(small, train_data, tune_steps, 5e-4, seed + 1), test_data)
                taught = train(student, train_data, tune_steps, 5e-4, seed + 1, teacher=model)
                row["accuracy_distilled"] = accuracy(taught, test_data)
                row["low_rank_layers"] = sum(isinstance(m, (LowRankConv, LowRankLinear)) for m in small.modules())
                rows.append(row)
                print(
                    f"seed {seed} target {target}x {method:10s}: acc {row['accuracy']:.3f} -> tuned "
                    f"{row['accuracy_tuned']:.3f} / distilled {row['accuracy_distilled']:.3f}, "
                    f"MACs {base['macs'] / row['macs']:.2f}x fewer, "
                    f"params {base['params'] / row['params']:.2f}x fewer",
                    flush=True,
                )
    return rows


def summary(rows):
    lines = [
        "| target | method | accuracy (after compression) | fine-tuned on labels | distilled from dense | "
        "MACs fewer | params fewer |"
    ]
    lines.append("|---|---|---|---|---|---|---|")
    dense = {r["seed"]: r for r in rows if r["method"] == "dense"}
    for target in (1.0,) + TARGETS:
        for method in ("dense",) if target == 1.0 else ("global", "plan", "calibrated"):
            sel = [r for r in rows if r["target"] == target and r["method"] == method]
            acc = [r["accuracy"] for r in sel]
            tuned = [r["accuracy_tuned"] for r in sel]
            taught = [r["accuracy_distilled"] for r in sel]
            mac = [dense[r["seed"]]["macs"] / r["macs"] for r in sel]
            par = [dense[r["seed"]]["params"] / r["params"] for r in sel]
            lines.append(
                f"| {target:g}x | {method} | {np.median(acc):.3f} ({min(acc):.3f}-{max(acc):.3f}) | "
                f"{np.median(tuned):.3f} | {np.median(taught):.3f} | {np.median(mac):.2f}x | {np.median(par):.2f}x |"
            )
    return "\n".join(lines)


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for method, marker, shift in (("global", "o", -0.12), ("plan", "s", 0.0), ("calibrated", "^", 0.12)):
        for key, alpha in (("accuracy", 1.0), ("accuracy_tuned", 0.4)):
            sel = [r for r in rows if r["method"] == method]
            ax.scatter(
                [r["target"] + shift for r in sel],
                [r[key] for r in sel],
                marker=marker,
                alpha=alpha,
                label=f"{method} ({'after fine-tune' if key.endswith('tuned') else 'compressed'})",
            )
    ax.set_xlabel("target: times fewer MACs")
    ax.set_ylabel("test accuracy (digits)")
    ax.set_xticks(TARGETS)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds, the run the docs quote")
    parser.add_argument("--smoke", action="store_true", help="1 seed, a few steps (CI)")
    parser.add_argument("--out", default="results/compress_to_target")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.smoke:
        seeds, train_steps, tune_steps, iters = (0,), 30, 5, 3
    elif args.quick:
        seeds, train_steps, tune_steps, iters = (0, 1, 2), 600, 100, 25
    else:
        seeds, train_steps, tune_steps, iters = (0, 1, 2, 3, 4), 1500, 300, 50
    rows = run(seeds, train_steps, tune_steps, iters)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(
            {"seeds": list(seeds), "train_steps": train_steps, "tune_steps": tune_steps, "rows": rows}, fh, indent=1
        )
    plot(rows, os.path.join(args.out, "compress_to_target.png"))
    table = summary(rows)
    print(table)
    return table


if __name__ == "__main__":
    main()
