"""The paper's experiment (sec. 5) at small scale: pre-train an HO-CP ResNet-18 on static images,
transduct it to video, and compare with a 3-D net trained from scratch and a 2-D net per frame.

Data (no download: scikit-learn ships the 1,797 8x8 handwritten digits of UCI inside its wheel):

- static images: a digit at a random place on a 16x16 canvas; target *valence* =
  (digit - 4.5) / 4.5, a continuous value in [-1, 1];
- clips of 6 frames: the same digit moving horizontally at a constant random velocity, a
  different band hidden in each frame; targets *valence* (as above) and *arousal* = the
  velocity scaled to [-1, 1]. One frame shows neither the whole digit nor its motion: the
  arousal can only be read from several frames, the valence is easier with several.

Variants, on the same few training clips and the same number of optimizer steps:

- ``transduction``: the 2-D net pre-trained on the static images (valence), transducted
  (``tensorconv.nn.transduct``, temporal factors initialised to the center tap), its temporal
  factors trained alone first, then everything (paper sec. 4);
- ``scratch_3d``: the same 3-D HO-CP net, from a random initialisation;
- ``frame_2d``: the pre-trained 2-D net fine-tuned on the clips' frames, its outputs averaged
  over the frames.

Loss: the paper's shake-shake weighted RMSE / PCC / CCC loss (``tensorconv.metrics.affect_loss``;
valence only while pre-training on static images). Scores: CCC, PCC, RMSE, SAGR on held-out
clips, mean and spread over seeds.

Rank selection (``--sweep``, on by default): the 2-D net trained with an L1 penalty gamma on
every lambda (``tensorconv.nn.lasso``), then pruned (components with |lambda| <= 5 % of the
layer's largest removed): fraction of rank components and of parameters removed vs CCC.

Run: ``python examples/transduction.py --quick --out results/``; writes results.json and
transduction.png (and rank_selection.png).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from tensorconv.metrics import affect_loss, ccc, pcc, rmse, sagr
from tensorconv.nn import factorized_layers, hocp_resnet18, lasso, prune, transduct

CANVAS = 16
FRAMES = 6
MAX_SPEED = 1.5  # pixels per frame


# -- data ---------------------------------------------------------------------------------------------------------
def load_digits():
    try:
        from sklearn.datasets import load_digits as sk_load
    except ImportError:  # pragma: no cover - the test extra installs it
        raise SystemExit("this example needs scikit-learn (its wheel ships the digits): pip install scikit-learn")
    d = sk_load()
    return d.images.astype(np.float64) / 16.0, d.target


def _occlude(frame, rng):
    """Hide a random band (a third of the canvas) of rows or columns."""
    width = CANVAS // 3
    start = rng.integers(0, CANVAS - width + 1)
    if rng.random() < 0.5:
        frame[start : start + width, :] = 0.0
    else:
        frame[:, start : start + width] = 0.0
    return frame


def _place(digit, x, y):
    """The 8x8 digit on the canvas at (sub-pixel) column x, row y (linear interpolation in x)."""
    canvas = np.zeros((CANVAS, CANVAS))
    x0 = int(np.floor(x))
    frac = x - x0
    for dx, w in ((0, 1 - frac), (1, frac)):
        c = x0 + dx
        lo, hi = max(c, 0), min(c + 8, CANVAS)
        if hi > lo:
            canvas[y : y + 8, lo:hi] += w * digit[:, lo - c : hi - c]
    return canvas


def static_images(images, labels, n, rng, occlude=True):
    idx = rng.integers(0, len(images), n)
    out = np.zeros((n, 1, CANVAS, CANVAS))
    for i, j in enumerate(idx):
        frame = _place(images[j], rng.uniform(0, CANVAS - 8), int(rng.integers(0, CANVAS - 7)))
        out[i, 0] = _occlude(frame, rng) if occlude else frame
    valence = (labels[idx] - 4.5) / 4.5
    return out, np.stack([valence, np.zeros(n)], 1)


def clips(images, labels, n, rng):
    idx = rng.integers(0, len(images), n)
    out = np.zeros((n, 1, FRAMES, CANVAS, CANVAS))
    speed = rng.uniform(-MAX_SPEED, MAX_SPEED, n)
    travel = (FRAMES - 1) * np.abs(speed)
    for i, j in enumerate(idx):
        start = rng.uniform(0, CANVAS - 8 - travel[i]) + (travel[i] if speed[i] < 0 else 0.0)
        row = int(rng.integers(0, CANVAS - 7))
        for t in range(FRAMES):
            out[i, 0, t] = _occlude(_place(images[j], start + speed[i] * t, row), rng)
    return out, np.stack([(labels[idx] - 4.5) / 4.5, speed / MAX_SPEED], 1)


# -- training -----------------------------------------------------------------------------------------------------
def make_net(cfg, seed):
    torch.manual_seed(seed)
    return hocp_resnet18(
        1, 2, n_spatial=2, head=cfg["head"], stem="small", width=cfg["width"], blocks=cfg["blocks"], rank=cfg["rank"]
    )


def train(net, x, y, steps, lr, seed, *, valence_only=False, frame_average=False, gamma=0.0, batch=32):
    """Adam on the affect loss (shake-shake coefficients from a seeded generator)."""
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        xb, yb = x[idx], y[idx]
        out = forward(net, xb, frame_average)
        if valence_only:
            # no arousal label on static images: the valence column stands for both signals
            loss = affect_loss(out[:, :1].repeat(1, 2), yb[:, :1].repeat(1, 2), generator=gen)
        else:
            loss = affect_loss(out, yb, generator=gen)
        if gamma:
            loss = loss + gamma * lasso(net, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def forward(net, x, frame_average=False):
    if not frame_average:
        return net(x)
    b, c, t = x.shape[:3]
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, *x.shape[3:])
    return net(frames).reshape(b, t, -1).mean(1)


@torch.no_grad()
def evaluate(net, x, y, frame_average=False):
    net.eval()
    out = forward(net, x, frame_average)
    p, t = out.T.contiguous(), y.T.contiguous()  # (2, N): valence, arousal
    scores = {"ccc": ccc(p, t), "pcc": pcc(p, t), "rmse": rmse(p, t), "sagr": sagr(p, t)}
    return {f"{name}_{sig}": float(v[i]) for name, v in scores.items() for i, sig in enumerate(("valence", "arousal"))}


def pretrain(cfg, data, seed, gamma=0.0):
    """The 2-D net on the static images (valence), optionally with the L1 penalty on lambda."""
    (xs, ys) = data[0]
    return train(make_net(cfg, seed), xs, ys, cfg["pretrain_steps"], cfg["lr"], seed, valence_only=True, gamma=gamma)


def run_seed(cfg, data, seed, pre):
    (xs, ys), (xc, yc), (xt, yt), _ = data
    lr = cfg["lr"]
    results = {}
    t0 = time.perf_counter()
    # transduction: temporal factors alone, then everything (same total steps as the others)
    net = transduct(copy.deepcopy(pre), 3, init="center", freeze=True)
    bc = cfg["clip_batch"]
    train(net, xc, yc, cfg["steps"] // 3, lr, seed, batch=bc)
    net.requires_grad_(True)
    train(net, xc, yc, cfg["steps"] - cfg["steps"] // 3, lr, seed + 1, batch=bc)
    results["transduction"] = dict(evaluate(net, xt, yt), seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    scratch = transduct(make_net(cfg, seed + 100), 3, init="ones", freeze=False)  # a 3-D HO-CP net, random init
    train(scratch, xc, yc, cfg["steps"], lr, seed, batch=bc)
    results["scratch_3d"] = dict(evaluate(scratch, xt, yt), seconds=time.perf_counter() - t0)
    t0 = time.perf_counter()
    frame = copy.deepcopy(pre)
    train(frame, xc, yc, cfg["steps"], lr, seed, frame_average=True, batch=bc)
    results["frame_2d"] = dict(evaluate(frame, xt, yt, frame_average=True), seconds=time.perf_counter() - t0)
    return results


def rank_sweep(cfg, data, gammas, seed, unpenalised):
    """Train with each lasso weight gamma, prune, score; gamma = 0 is the pre-trained net itself."""
    _, _, _, (xv, yv) = data
    rows = []
    for gamma in gammas:
        net = copy.deepcopy(unpenalised) if gamma == 0 else pretrain(cfg, data, seed, gamma)
        before = {
            "params": sum(p.numel() for p in net.parameters()),
            "rank": sum(layer.rank for _, layer in factorized_layers(net)),
        }
        score_before = evaluate(net, xv, yv)["ccc_valence"]
        prune(net, relative=cfg["prune_relative"])
        after = {
            "params": sum(p.numel() for p in net.parameters()),
            "rank": sum(layer.rank for _, layer in factorized_layers(net)),
        }
        rows.append(
            dict(
                gamma=gamma,
                ccc_valence_before=score_before,
                ccc_valence_pruned=evaluate(net, xv, yv)["ccc_valence"],
                rank_removed=1 - after["rank"] / before["rank"],
                params_removed=1 - after["params"] / before["params"],
            )
        )
        print(
            f"  gamma={gamma:g}: {100 * rows[-1]['rank_removed']:.1f} % of rank components and "
            f"{100 * rows[-1]['params_removed']:.1f} % of parameters removed; CCC valence "
            f"{score_before:.3f} -> {rows[-1]['ccc_valence_pruned']:.3f}",
            flush=True,
        )
    return rows


def summarize(per_seed):
    out = {}
    for variant in per_seed[0]:
        keys = [k for k in per_seed[0][variant] if k != "seconds"]
        out[variant] = {
            k: {
                "mean": float(np.mean([r[variant][k] for r in per_seed])),
                "std": float(np.std([r[variant][k] for r in per_seed])),
                "per_seed": [r[variant][k] for r in per_seed],
            }
            for k in keys
        }
    return out


def plot(summary, sweep, out_dir):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return []
    files = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    variants = list(summary)
    for i, sig in enumerate(("valence", "arousal")):
        means = [summary[v][f"ccc_{sig}"]["mean"] for v in variants]
        stds = [summary[v][f"ccc_{sig}"]["std"] for v in variants]
        ax.bar(np.arange(len(variants)) + 0.38 * i, means, 0.38, yerr=stds, label=sig, capsize=3)
    ax.set_xticks(np.arange(len(variants)) + 0.19, variants)
    ax.set_ylabel("CCC on held-out clips (mean, std over seeds)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend()
    fig.tight_layout()
    files.append(os.path.join(out_dir, "transduction.png"))
    fig.savefig(files[-1], dpi=110)
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.plot([100 * r["rank_removed"] for r in sweep], [r["ccc_valence_pruned"] for r in sweep], "o-")
        for r in sweep:
            ax.annotate(f"γ={r['gamma']:g}", (100 * r["rank_removed"], r["ccc_valence_pruned"]), fontsize=8)
        ax.set_xlabel("rank components removed (%)")
        ax.set_ylabel("CCC valence after pruning")
        fig.tight_layout()
        files.append(os.path.join(out_dir, "rank_selection.png"))
        fig.savefig(files[-1], dpi=110)
    return files


CONFIGS = {
    "quick": dict(
        width=0.125,
        blocks=(1, 1, 1, 1),
        rank="same",
        head="trl",
        lr=3e-3,
        n_static=4000,
        n_clips=200,
        n_test=300,
        pretrain_steps=500,
        steps=150,
        clip_batch=16,
        seeds=3,
        gammas=(0.0, 0.003, 0.01, 0.03),
        prune_relative=0.05,
    ),
    "full": dict(
        width=0.25,
        blocks=(2, 2, 2, 2),
        rank="same",
        head="trl",
        lr=2e-3,
        n_static=6000,
        n_clips=400,
        n_test=600,
        pretrain_steps=1000,
        steps=500,
        clip_batch=32,
        seeds=5,
        gammas=(0.0, 0.001, 0.003, 0.01, 0.03),
        prune_relative=0.05,
    ),
    "smoke": dict(
        width=0.125,
        blocks=(1, 1, 1, 1),
        rank="same",
        head="trl",
        lr=3e-3,
        n_static=64,
        n_clips=16,
        n_test=16,
        pretrain_steps=2,
        steps=3,
        clip_batch=8,
        seeds=1,
        gammas=(0.0, 0.01),
        prune_relative=0.05,
    ),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small configuration (< 10 min on 2 CPU cores)")
    parser.add_argument("--smoke", action="store_true", help="a few steps only (what CI runs)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for results.json and the plots")
    parser.add_argument("--no-sweep", action="store_true", help="skip the rank-selection sweep")
    args = parser.parse_args(argv)
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = CONFIGS[name]
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()
    images, labels = load_digits()
    # held-out digits: the test clips use images no training example has seen
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, test_idx = order[: int(0.7 * len(order))], order[int(0.7 * len(order)) :]
    per_seed = []
    sweep = []
    for s in range(cfg["seeds"]):
        rng = np.random.default_rng(1000 + s)
        as_t = lambda a: torch.from_numpy(a).float()  # noqa: E731
        xs, ys = static_images(images[train_idx], labels[train_idx], cfg["n_static"], rng, occlude=False)
        xc, yc = clips(images[train_idx], labels[train_idx], cfg["n_clips"], rng)
        xt, yt = clips(images[test_idx], labels[test_idx], cfg["n_test"], rng)
        xv, yv = static_images(images[test_idx], labels[test_idx], cfg["n_test"], rng, occlude=False)
        data = ((as_t(xs), as_t(ys)), (as_t(xc), as_t(yc)), (as_t(xt), as_t(yt)), (as_t(xv), as_t(yv)))
        print(f"seed {s}: training the three variants", flush=True)
        pre = pretrain(cfg, data, s)
        per_seed.append(run_seed(cfg, data, s, pre))
        for v, r in per_seed[-1].items():
            print(f"  {v:<13} CCC valence {r['ccc_valence']:+.3f}  arousal {r['ccc_arousal']:+.3f}", flush=True)
        if s == 0 and not args.no_sweep:
            print("rank selection sweep (2-D net, static images)", flush=True)
            sweep = rank_sweep(cfg, data, cfg["gammas"], s, pre)
    summary = summarize(per_seed)
    result = {
        "config": name,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
        "variants": summary,
        "rank_selection": sweep,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
        },
        "seconds": round(time.perf_counter() - t_start, 1),
        "command": "python examples/transduction.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    result["plots"] = [os.path.basename(f) for f in plot(summary, sweep, args.out)]
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"\nCCC on held-out clips, mean ± std over {cfg['seeds']} seed(s):")
    for v, r in summary.items():
        print(
            f"  {v:<13} valence {r['ccc_valence']['mean']:+.3f} ± {r['ccc_valence']['std']:.3f}   "
            f"arousal {r['ccc_arousal']['mean']:+.3f} ± {r['ccc_arousal']['std']:.3f}"
        )
    print(f"({result['seconds']} s; results in {args.out})")
    return result


if __name__ == "__main__":
    main()
