"""``tensorconv bench varlen``: see :func:`run`."""

from __future__ import annotations

import json
import os
import statistics
import sys

from ..timing import _Progress

WIDTHS = (32, 48, 64, 80, 96, 112, 128)
LENGTHS = range(100, 250)
FIXED_LENGTH = 175
CASES = ("dense, 150 lengths", "factorized, 150 lengths", "dense, one length", "factorized, one length")

_CASE = r"""
import json, sys
import torch
torch.set_num_threads(int(sys.argv[2]))
from tensorconv.bench.suites.varlen import case_ms
print(json.dumps(case_ms(sys.argv[1], int(sys.argv[3]), int(sys.argv[4]))))
"""


def case_ms(case, sweeps, warmup=2):
    """Milliseconds per forward of ``case`` (one of :data:`CASES`) in each of ``sweeps`` timed
    sweeps of 150 forwards, after ``warmup`` sweeps: what the process it runs in measures."""
    import time

    import torch

    from ...nn import factorize

    torch.manual_seed(0)
    layers = []
    for c, t in zip(WIDTHS, WIDTHS[1:]):
        layers += [torch.nn.Conv1d(c, t, 3, padding=1), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers).eval()
    if case.startswith("factorized"):
        model = factorize(model, 0.25, n_iter_max=10).eval()
    g = torch.Generator().manual_seed(1)
    if case.endswith("150 lengths"):
        inputs = [torch.randn(8, WIDTHS[0], n, generator=g) for n in LENGTHS]
    else:  # a stream of distinct batches, as the 150 lengths are (and as users feed one length)
        inputs = [torch.randn(8, WIDTHS[0], FIXED_LENGTH, generator=g) for _ in LENGTHS]
    out = []
    with torch.no_grad():
        for i in range(warmup + sweeps):
            t0 = time.perf_counter()
            for x in inputs:
                model(x)
            if i >= warmup:
                out.append((time.perf_counter() - t0) / len(inputs) * 1e3)
    return out


def run(args, targets):
    """Planning once, not per shape: a Conv1d model (6 convs of kernel 3 widening 32 -> 128
    channels, batch 8) dense and ``factorize(model, 0.25)``, fed 150 different lengths
    (100..249) in turn, against the same models fed 150 batches of one length (175). A timed
    sweep is 150 forwards; after the warm-up sweeps every length has been seen, so what a sweep
    costs beyond the fixed length is what a new or evicted shape costs (tensorconv's plans, and
    the native convs' own per-shape caches: oneDNN keeps ONEDNN_PRIMITIVE_CACHE_CAPACITY
    primitives, 1024 by default, which the row's environment prints).

    Each case runs in a process of its own, as a user's process runs one model on one stream of
    inputs (in one process, the dense model's primitives for 150 lengths evicted the factorized
    one's), the four in turn over ``max(3, --repeat)`` rounds; a case's figure is the median of
    its rounds' medians, with the range of those medians."""
    import subprocess

    import torch

    if not any(b == "torch" for b, _ in targets):
        return []
    rounds, sweeps, warmup = (1, 2, 1) if args.quick else (max(3, args.repeat), 5, 2)
    threads = torch.get_num_threads()
    per_round = {case: [] for case in CASES}
    prog = _Progress(rounds, "varlen")
    for r in range(rounds):
        for case in CASES:
            done = subprocess.run(
                [sys.executable, "-c", _CASE, case, str(threads), str(sweeps), str(warmup)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                raise RuntimeError(f"bench varlen: the process timing {case!r} failed: {last}")
            per_round[case].append(statistics.median(json.loads(done.stdout.strip().splitlines()[-1])))
        prog.step(f"round {r + 1}")
    prog.close()
    per = {case: statistics.median(v) for case, v in per_round.items()}
    return [
        dict(
            suite="varlen",
            model="6 x Conv1d(32 -> 128, 3), batch 8",
            process="one per case",
            onednn_primitive_cache=os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024 (default)"),
            case=case,
            ms_per_forward=round(per[case], 3),
            rounds_ms=f"{min(per_round[case]):.3f}-{max(per_round[case]):.3f}",
            vs_factorized_one_length=round(per[case] / per["factorized, one length"], 2),
            dense_over_factorized=round(per[case.replace("factorized", "dense")] / per[case], 2)
            if case.startswith("factorized")
            else None,
        )
        for case in CASES
    ]
