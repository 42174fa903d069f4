"""Timing: medians of interleaved runs (what ``tensorconv bench`` and a latency
:func:`tensorconv.nn.plan_compression` measure with). Imports no array library until asked."""

from __future__ import annotations

import random
import sys
import time

__all__ = ["measure", "measure_many"]


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    elif device == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()


def measure(fn, *, device=None, warmup=2, repeat=5, budget_s=None):
    """median / min / max milliseconds of ``fn()`` over ``repeat`` runs after ``warmup`` runs
    (stopping early, after at least 3 runs, once ``budget_s`` seconds are spent)."""
    return measure_many({"fn": fn}, device=device, warmup=warmup, repeat=repeat, budget_s=budget_s)["fn"]


def measure_many(entries, *, device=None, warmup=2, repeat=5, budget_s=None, seed=0):
    """Like :func:`measure` for several functions, interleaved run by run, so that every
    candidate sees the same machine state (a 2-core VM drifts by tens of percent over seconds).
    The order is shuffled every round (seeded): a call right after a large one finds its input
    evicted from cache (a visible slow-down for sub-millisecond convs), and no candidate
    should always follow the same neighbour."""
    names = list(entries)
    for name in names:
        for _ in range(warmup):
            _ready(entries[name]())
    _sync(device)
    times = {name: [] for name in names}
    start = time.perf_counter()
    order = list(names)
    shuffle = random.Random(seed).shuffle
    for i in range(repeat):
        shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            _ready(entries[name]())
            _sync(device)
            times[name].append(time.perf_counter() - t0)
        if budget_s is not None and i >= 2 and time.perf_counter() - start > budget_s * len(names):
            break
    out = {}
    for name, ts in times.items():
        ts.sort()
        out[name] = {
            "median_ms": 1e3 * ts[len(ts) // 2],
            "min_ms": 1e3 * ts[0],
            "max_ms": 1e3 * ts[-1],
            "runs": len(ts),
        }
    return out


def _ready(result):
    """Wait for an asynchronously dispatched result (jax returns before computing; any pytree)."""
    jax = sys.modules.get("jax")
    if jax is not None:
        jax.block_until_ready(result)
