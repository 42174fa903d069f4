"""``tensorconv bench``: plans timed per backend against dense convolution and tensorly-torch.

Every ratio is measured in one run; results go to JSON (and a PNG for the Figure 6 suite)
with the machine, versions and allocator settings they were measured under.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time

import numpy as np

from ..backends import available_backends, backend_for_name
from ..kernels import KruskalKernel, TuckerKernel
from ..plans.cost import calibrate
from ..plans.plan import conv, plan_conv
from . import open_output, positive_int, write_output

#: suites in tensorconv/cli/bench_kernels.py (inside a plan, torch CPU)
_KERNEL_SUITES = ("accelerators", "depthwise", "auto", "memory", "layers", "varlen")
SUITES = ("fig6", "backends", "peers", "roofline", "targets", "r3d18", "models", "decompose") + _KERNEL_SUITES
#: what ``--quick`` runs when no suite is named: the headline comparisons, in about a minute
QUICK_SUITES = ("fig6", "backends", "peers", "models", "accelerators", "auto")


# -- timing ---------------------------------------------------------------------------------------------------
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


def measure_many(entries, *, device=None, warmup=2, repeat=5, budget_s=None):
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
    shuffle = random.Random(0).shuffle
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


class _Progress:
    def __init__(self, total, label):
        self.total, self.done, self.label = total, 0, label
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=label, file=sys.stderr, leave=False)
            except ImportError:
                pass

    def step(self, what):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what[:40])
            self.bar.update(1)
        else:
            print(f"[{self.label} {self.done}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -- environment ------------------------------------------------------------------------------------------------
def _set_malloc_no_trim():
    """glibc: never return freed memory to the OS, never mmap big blocks (process-wide; bench only).

    Without it, every large intermediate freed and allocated again costs first-touch page faults.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: no glibc to tune
        print("tensorconv bench: glibc's libc.so.6 is not here; the allocator is left as it is", file=sys.stderr)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = libc.mallopt(M_MMAP_THRESHOLD, 2**30) and libc.mallopt(M_TRIM_THRESHOLD, 2**62 - 1)
    return bool(ok)


def environment(args):
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "allocator": args.allocator_note,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"),
        "cpu_kernel": getattr(args, "cpu_kernel", None),
    }  # the plane chain of fused / auto (torch CPU)
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:  # read the version without importing it: importing tltorch switches tensorly's global backend
        from importlib.metadata import version

        env["tltorch"] = version("tensorly-torch")
    except Exception:
        pass
    return env


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _array_device(device):
    """The device argument for creating arrays ("cupy" is a backend, not a device name)."""
    return None if device in (None, "cupy") else device


def _targets(args):
    out = []
    for name in args.backend or available_backends():
        if name == "torch-cuda":
            out.append(("torch", "cuda"))
        elif name == "cupy":
            out.append(("cupy", "cupy"))
        else:
            out.append((name, "cpu" if name == "torch" else None))
    return out


def _make_input(backend, device, shape, dtype="float32", requires_grad=False):
    b = backend_for_name(backend)
    x = b.random_normal(shape, seed=0, dtype=dtype, device=_array_device(device))
    if requires_grad:
        x.requires_grad_(True)
    return x


def _params_matched_rank(c, t, ks):
    return max(1, (c * t * int(np.prod(ks))) // (c + t + sum(ks) + 1))


# -- suites -----------------------------------------------------------------------------------------------------
def suite_fig6(args, targets):
    """Paper Figure 6: input 16x32x32, 3x3x3 kernel, C = T, dense 3-D conv vs CP at R = 6C and R = 3C."""
    channels = (16, 64) if args.quick else (16, 32, 64, 128, 256)
    rows = []
    prog = _Progress(len(channels) * len(targets) * 3, "fig6")
    for c in channels:
        shape = (args.batch, c, 16, 32, 32)
        dense_shape = (c, c, 3, 3, 3)
        for backend, device in targets:
            if backend == "numpy" and c > 64:
                for _ in range(3):
                    prog.step("skip numpy (too slow)")
                continue
            x = _make_input(backend, device, shape)
            dense = backend_for_name(backend).random_normal(
                dense_shape, seed=1, dtype="float32", device=_array_device(device)
            )
            t = measure(lambda: conv(x, dense, padding=1), device=device, repeat=args.repeat, budget_s=args.budget)
            plan = plan_conv(dense, shape, padding=1)
            rows.append(
                dict(
                    suite="fig6",
                    channels=c,
                    model="3D-Conv",
                    backend=_label(backend, device),
                    macs=plan.dense_macs,
                    analytic_macs=plan.dense_macs,
                    params=int(np.prod(dense_shape)),
                    **t,
                )
            )
            prog.step(f"C={c} dense {backend}")
            for mult in (6, 3):
                k = KruskalKernel.random(
                    dense_shape, rank=mult * c, backend=backend, dtype="float32", device=_array_device(device), seed=2
                )
                plan = plan_conv(k, shape, padding=1, strategy="factorized", dtype="float32", backend=backend)
                # the paper's count: 1x1, one depthwise 1-D conv per mode, 1x1 (the torch plan's order)
                canonical = plan_conv(k, shape, padding=1, strategy="factorized", dtype="float32", backend="torch")
                t = measure(
                    lambda: conv(x, k, padding=1, strategy="factorized"),
                    device=device,
                    repeat=args.repeat,
                    budget_s=args.budget,
                )
                rows.append(
                    dict(
                        suite="fig6",
                        channels=c,
                        model=f"CP-HOConv-{mult}",
                        backend=_label(backend, device),
                        macs=plan.macs,
                        analytic_macs=canonical.macs,
                        params=k.n_params,
                        **t,
                    )
                )
                if backend == "torch" and not args.quick:  # (compiling each point would not fit --quick)
                    conv(x, k, padding=1, strategy="fused")  # compile outside the timing
                    t = measure(
                        lambda: conv(x, k, padding=1, strategy="fused"),
                        device=device,
                        repeat=args.repeat,
                        budget_s=args.budget,
                    )
                    rows.append(
                        dict(
                            suite="fig6",
                            channels=c,
                            model=f"CP-HOConv-{mult}",
                            backend=_label(backend, device) + " fused",
                            macs=plan.macs,
                            analytic_macs=canonical.macs,
                            params=k.n_params,
                            **t,
                        )
                    )
                prog.step(f"C={c} CP-{mult} {backend}")
    prog.close()
    return rows


def _label(backend, device):
    return "torch-cuda" if device == "cuda" else backend


def _jax_jitted(fn, *args):
    """``fn`` compiled by jax.jit, as a no-argument callable: jax users jit their step, and the
    compile happens in the benchmark's warm-up runs, outside the timing."""
    import jax

    jitted = jax.jit(fn)
    return lambda: jitted(*args)


def suite_backends(args, targets):
    """The same plans on every backend present; forward (all) and forward+backward (torch, jax: jit-compiled)."""
    cases = []
    c = 32 if args.quick else 64
    for n, spatial in ((2, (64, 64)), (3, (16, 32, 32))):
        ks = (3,) * n
        cases.append(("CP", n, "R=C", (c, c) + ks, c, spatial))
        cases.append(("CP", n, "R=matched", (c, c) + ks, _params_matched_rank(c, c, ks), spatial))
        cases.append(("Tucker", n, "R=C/2", (c, c) + ks, (c // 2, c // 2), spatial))
    rows = []
    prog = _Progress(len(cases) * len(targets), "backends")
    for kind, n, label, kshape, rank, spatial in cases:
        shape = (args.batch, kshape[1]) + spatial
        group = []
        for backend, device in targets:
            dev = _array_device(device)
            make = KruskalKernel.random if kind == "CP" else TuckerKernel.random
            k = make(kshape, rank, backend=backend, dtype="float32", device=dev, seed=3)
            x = _make_input(backend, device, shape)
            forward = lambda: conv(x, k, padding=1)  # noqa: E731
            if backend == "jax":
                forward = _jax_jitted(lambda x, k: conv(x, k, padding=1), x, k)
            t = measure(forward, device=device, repeat=args.repeat, budget_s=args.budget)
            plan = plan_conv(k, shape, padding=1, dtype="float32", backend=backend, device=device)
            row = dict(
                suite="backends",
                kernel=kind,
                n_spatial=n,
                rank=label,
                backend=_label(backend, device),
                pass_="forward",
                strategy=plan.strategy,
                macs=plan.macs,
                **t,
            )
            group.append(row)
            if backend == "jax":
                import jax

                def loss(x, k):
                    return conv(x, k, padding=1).sum()

                t = measure(
                    _jax_jitted(jax.grad(loss, argnums=(0, 1)), x, k),
                    device=device,
                    repeat=args.repeat,
                    budget_s=args.budget,
                )
                group.append(dict(row, pass_="forward+backward", **t))
            if backend == "torch":
                fused_plan = plan_conv(
                    k, shape, padding=1, strategy="fused", dtype="float32", backend=backend, device=device
                )
                with_fused = dict(row, strategy="fused", macs=fused_plan.macs)
                conv(x, k, padding=1, strategy="fused")
                with_fused.update(
                    measure(
                        lambda: conv(x, k, padding=1, strategy="fused"),
                        device=device,
                        repeat=args.repeat,
                        budget_s=args.budget,
                    )
                )
                group.append(with_fused)
                arrays = [k.weights] + list(k.factors) if kind == "CP" else [k.core] + list(k.factors)
                for a in arrays:
                    if a is not None:
                        a.requires_grad_(True)
                xg = _make_input(backend, device, shape, requires_grad=True)

                def fwd_bwd():
                    conv(xg, k, padding=1).sum().backward()

                t = measure(fwd_bwd, device=device, repeat=args.repeat, budget_s=args.budget)
                group.append(dict(row, pass_="forward+backward", **t))
            prog.step(f"{kind} N={n} {label} {backend}")
        for p in ("forward", "forward+backward"):
            sub = [r for r in group if r["pass_"] == p]
            best = min((r["median_ms"] for r in sub), default=None)
            for r in sub:
                r["ratio_to_fastest"] = r["median_ms"] / best
        rows += group
    prog.close()
    return rows


def suite_peers(args, targets):
    """(B, C, 16, 32, 32), k=3, C = T: dense Conv3d, (2+1)D, tensorly-torch, tensorconv strategies."""
    import tensorly

    with tensorly.backend_context("pytorch"):  # what tensorly-torch's layers need (see _import_tltorch)
        return _suite_peers(args, targets)


def _suite_peers(args, targets):
    import torch

    tltorch = _import_tltorch()
    channels = (16, 32) if args.quick else (16, 32, 64, 128)
    devices = [d for b, d in targets if b == "torch"]
    rows = []
    prog = _Progress(len(channels) * 2 * len(devices), "peers")
    for device in devices:
        for c in channels:
            for rank_label in ("R=C", "R=matched"):
                r = c if rank_label == "R=C" else _params_matched_rank(c, c, (3, 3, 3))
                shape = (args.batch, c, 16, 32, 32)
                x = torch.randn(shape, device=device)
                dense = torch.nn.Conv3d(c, c, 3, padding=1, bias=False, device=device)
                k = KruskalKernel.random(
                    (c, c, 3, 3, 3), rank=r, backend="torch", dtype="float32", device=device, seed=4
                )
                for t_ in [k.weights] + list(k.factors):
                    t_.requires_grad_(False)
                m = _r2plus1d_matched(c, device)
                entries = {
                    "dense Conv3d": lambda: dense(x),
                    "(2+1)D matched params": lambda: m(x),
                    "floor: the two 1x1 GEMMs alone": _gemm_floor(args.batch, c, r, c, shape[2:], device),
                }
                for strategy in ("factorized", "reconstructed", "auto", "fused"):
                    entries[f"tensorconv {strategy}"] = (lambda s: lambda: conv(x, k, padding=1, strategy=s))(strategy)
                if tltorch is not None:
                    for impl in ("factorized", "reconstructed"):
                        layer = tltorch.FactorizedConv(
                            c, c, 3, order=3, rank=r, factorization="cp", implementation=impl, padding=1, bias=False
                        ).to(device)
                        entries[f"tltorch {impl}"] = (lambda m: lambda: m(x))(layer)
                plan = plan_conv(
                    k, shape, padding=1, strategy="factorized", dtype="float32", backend="torch", device=device
                )
                auto = plan_conv(k, shape, padding=1, strategy="auto", dtype="float32", backend="torch", device=device)
                group = []
                with torch.no_grad():
                    results = measure_many(entries, device=device, repeat=args.repeat, budget_s=args.budget)
                for name, t in results.items():
                    group.append(
                        dict(
                            suite="peers",
                            device=device,
                            channels=c,
                            rank=rank_label,
                            r=r,
                            impl=name,
                            pass_="forward",
                            **t,
                        )
                    )
                # forward + backward (gradients for the input and every parameter)
                xg = x.clone().requires_grad_(True)
                for t_ in [k.weights] + list(k.factors):
                    t_.requires_grad_(True)
                train = {
                    "dense Conv3d": lambda: dense(xg).sum().backward(),
                    "tensorconv factorized": lambda: conv(xg, k, padding=1, strategy="factorized").sum().backward(),
                    "tensorconv fused": lambda: conv(xg, k, padding=1, strategy="fused").sum().backward(),
                }
                if tltorch is not None:
                    layer = tltorch.FactorizedConv(
                        c, c, 3, order=3, rank=r, factorization="cp", implementation="factorized", padding=1, bias=False
                    ).to(device)
                    train["tltorch factorized"] = lambda: layer(xg).sum().backward()
                results = measure_many(train, device=device, repeat=max(3, args.repeat // 2), budget_s=args.budget)
                for t_ in [k.weights] + list(k.factors):
                    t_.requires_grad_(False)
                for name, t in results.items():
                    group.append(
                        dict(
                            suite="peers",
                            device=device,
                            channels=c,
                            rank=rank_label,
                            r=r,
                            impl=name,
                            pass_="forward+backward",
                            **t,
                        )
                    )
                for g in group:
                    times = {h["impl"]: h["median_ms"] for h in group if h["pass_"] == g["pass_"]}
                    g["vs_dense"] = times["dense Conv3d"] / g["median_ms"]
                    if "tltorch factorized" in times:
                        g["vs_tltorch_factorized"] = times["tltorch factorized"] / g["median_ms"]
                    g["mac_ratio"] = plan.dense_macs / plan.macs
                    g["auto_picked"] = _picked(auto)
                rows += group
                prog.step(f"{device} C={c} {rank_label}")
    prog.close()
    return rows


def _import_tltorch():
    """tensorly-torch if installed. Importing it calls ``tensorly.set_backend("pytorch")`` for the
    whole process (a known trap); the caller's backend is put back at once, and the peers suite
    runs inside ``tensorly.backend_context("pytorch")`` instead (tensorconv does not read
    tensorly's global backend; a context per call would add its own cost to every timed call)."""
    try:
        import tensorly
    except ImportError:
        return None
    before = tensorly.get_backend()
    try:
        import tltorch
    except ImportError:
        return None
    finally:
        tensorly.set_backend(before)
    return tltorch


def _picked(plan):
    """What an auto plan runs, e.g. 'factorized (fastest order: depthwise over modes 0,1,2)'."""
    if plan.accelerator:
        return f"fused ({plan.accelerator})"
    if plan.order != "fastest":
        return plan.strategy
    merged = [",".join(map(str, s.modes)) for s in plan.steps if len(s.modes) > 1]
    return f"{plan.strategy} (fastest order" + (f": depthwise over modes {'; '.join(merged)})" if merged else ")")


def _gemm_floor(batch, c, r, t, spatial, device):
    """The two 1x1 convolutions of a CP chain alone (C -> R, R -> T over every position): a
    lower bound for any factorized forward that runs them as float32 library GEMMs. oneDNN's
    channels-last 1x1 conv, as the plans run their last step (measured at or above torch.matmul
    from 32 channels up)."""
    import torch
    import torch.nn.functional as F

    positions = int(np.prod(spatial))
    a = torch.randn(batch, positions, 1, c, device=device).movedim(-1, 1)
    w1 = torch.randn(r, c, 1, 1, device=device)
    w2 = torch.randn(t, r, 1, 1, device=device)
    return lambda: F.conv2d(F.conv2d(a, w1), w2)


def _r2plus1d_matched(c, device):
    """A (2+1)D conv (1x3x3 C->M, 3x1x1 M->C) with about the dense conv's parameters (as R(2+1)D)."""
    import torch

    m = max(1, (27 * c * c) // (9 * c + 3 * c))
    return torch.nn.Sequential(
        torch.nn.Conv3d(c, m, (1, 3, 3), padding=(0, 1, 1), bias=False),
        torch.nn.Conv3d(m, c, (3, 1, 1), padding=(1, 0, 0), bias=False),
    ).to(device)


def suite_roofline(args, targets):
    """Per plan step: MACs, bytes, measured time and the roofline bound from a same-run calibration."""
    rows = []
    c = 32 if args.quick else 64
    shape = (args.batch, c, 16, 32, 32)
    # per-step timings of eager calls: jax runs a plan as one compiled program, with no steps to time
    targets = [(b, d) for b, d in targets if b != "jax"]
    prog = _Progress(len(targets), "roofline")
    for backend, device in targets:
        dev = _array_device(device)
        # the same-run roofline's rates (the plans below keep the shipped defaults, as users' do)
        model = calibrate(backend, dev)
        k = KruskalKernel.random((c, c, 3, 3, 3), rank=c, backend=backend, dtype="float32", device=dev, seed=5)
        x = _make_input(backend, device, shape)
        plan = plan_conv(k, shape, padding=1, strategy="factorized", dtype="float32", backend=backend, device=device)
        times = plan.profile(x, k, repeat=args.repeat, sync=lambda: _sync(device))
        if backend == "torch":
            fused = plan_conv(k, shape, padding=1, strategy="fused", dtype="float32", backend=backend, device=device)
            fused(x, k)
            total = fused.profile(x, k, repeat=args.repeat, sync=lambda: _sync(device))[0]
            bound = sum(max(s.macs / model.macs_per_s, s.nbytes / model.bytes_per_s) for s in plan.steps)
            macs = sum(s.macs for s in plan.steps)
            # a fused chain moves only its input and output through memory
            io_bytes = 4 * (x.numel() + int(np.prod(plan.output_shape)))
            fused_bound = max(macs / model.macs_per_s, io_bytes / model.bytes_per_s)
            rows.append(
                dict(
                    suite="roofline",
                    backend=_label(backend, device),
                    kind="fused (whole chain)",
                    modes=[],
                    macs=macs,
                    bytes=io_bytes,
                    measured_ms=1e3 * total,
                    roofline_ms=1e3 * fused_bound,
                    efficiency=fused_bound / total,
                    unfused_roofline_ms=1e3 * bound,
                    peak_macs_per_s=model.macs_per_s,
                    bandwidth_bytes_per_s=model.bytes_per_s,
                )
            )
        for step, secs in zip(plan.steps, times):
            bound = max(step.macs / model.macs_per_s, step.nbytes / model.bytes_per_s)
            rows.append(
                dict(
                    suite="roofline",
                    backend=_label(backend, device),
                    kind=step.kind,
                    modes=list(step.modes),
                    macs=step.macs,
                    bytes=step.nbytes,
                    measured_ms=1e3 * secs,
                    roofline_ms=1e3 * bound,
                    efficiency=bound / secs if secs else None,
                    peak_macs_per_s=model.macs_per_s,
                    bandwidth_bytes_per_s=model.bytes_per_s,
                )
            )
        prog.step(backend)
    prog.close()
    return rows


def suite_targets(args, targets):
    """The wall-clock targets of the issues: (B, C, 16, 32, 32), k = 3, batch 1 and 8, torch.

    Dense Conv3d vs the factorized CP plan at R = C (C in 32, 64, 128) and at the Figure 6
    ranks R = 3C, 6C (C = 32); forward and forward+backward; the MAC ratio beside each.
    """
    import torch

    devices = [d for b, d in targets if b == "torch"]
    points = [(c, c) for c in (32, 64, 128)] + [(32, 3 * 32), (32, 6 * 32)]
    batches = (1,) if args.quick else (1, 8)
    if args.quick:
        points = points[:1] + points[3:4]
    rows = []
    prog = _Progress(len(devices) * len(points) * len(batches), "targets")
    for device in devices:
        for batch in batches:
            for c, r in points:
                shape = (batch, c, 16, 32, 32)
                x = torch.randn(shape, device=device)
                w = torch.randn(c, c, 3, 3, 3, device=device) * 0.05
                k = KruskalKernel.random(
                    (c, c, 3, 3, 3), rank=r, backend="torch", dtype="float32", device=device, seed=6
                )
                plan = plan_conv(
                    k, shape, padding=1, strategy="factorized", dtype="float32", backend="torch", device=device
                )
                with torch.no_grad():
                    conv(x, k, padding=1, strategy="fused")  # the plane chain (built in main)
                    fwd = measure_many(
                        {
                            "dense": lambda: torch.nn.functional.conv3d(x, w, padding=1),
                            "factorized": lambda: conv(x, k, padding=1, strategy="factorized"),
                            "fused": lambda: conv(x, k, padding=1, strategy="fused"),
                            "auto": lambda: conv(x, k, padding=1),
                            "gemm floor": _gemm_floor(batch, c, r, c, shape[2:], device),
                        },
                        device=device,
                        repeat=args.repeat,
                        budget_s=args.budget,
                    )
                xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
                for t_ in [k.weights] + list(k.factors):
                    t_.requires_grad_(True)
                conv(xg, k, padding=1, strategy="fused").sum().backward()  # first call outside the timing
                bwd = measure_many(
                    {
                        "dense": lambda: torch.nn.functional.conv3d(xg, wg, padding=1).sum().backward(),
                        "factorized": lambda: conv(xg, k, padding=1, strategy="factorized").sum().backward(),
                        "fused": lambda: conv(xg, k, padding=1, strategy="fused").sum().backward(),
                        "auto": lambda: conv(xg, k, padding=1).sum().backward(),
                    },
                    device=device,
                    repeat=max(3, args.repeat // 2),
                    budget_s=args.budget,
                )
                auto = plan_conv(k, shape, padding=1, dtype="float32", backend="torch", device=device)
                t_dense, t_fact, t_fused = fwd["dense"], fwd["factorized"], fwd["fused"]
                t_dense_b, t_fact_b, t_fused_b = bwd["dense"], bwd["factorized"], bwd["fused"]
                mac_ratio = plan.dense_macs / plan.macs
                rows.append(
                    dict(
                        suite="targets",
                        device=device,
                        batch=batch,
                        channels=c,
                        rank=r,
                        auto_picked=_picked(auto),
                        auto_fwd_ms=fwd["auto"]["median_ms"],
                        gemm_floor_ms=fwd["gemm floor"]["median_ms"],
                        auto_fwd_bwd_ms=bwd["auto"]["median_ms"],
                        auto_fwd_speedup=t_dense["median_ms"] / fwd["auto"]["median_ms"],
                        auto_fwd_bwd_speedup=t_dense_b["median_ms"] / bwd["auto"]["median_ms"],
                        fused_fwd_ms=t_fused["median_ms"],
                        fused_fwd_bwd_ms=t_fused_b["median_ms"],
                        fused_fwd_speedup=t_dense["median_ms"] / t_fused["median_ms"],
                        fused_fwd_bwd_speedup=t_dense_b["median_ms"] / t_fused_b["median_ms"],
                        mac_ratio=mac_ratio,
                        dense_fwd_ms=t_dense["median_ms"],
                        factorized_fwd_ms=t_fact["median_ms"],
                        fwd_speedup=t_dense["median_ms"] / t_fact["median_ms"],
                        fwd_speedup_over_mac_ratio=t_dense["median_ms"] / t_fact["median_ms"] / mac_ratio,
                        dense_fwd_bwd_ms=t_dense_b["median_ms"],
                        factorized_fwd_bwd_ms=t_fact_b["median_ms"],
                        fwd_bwd_speedup=t_dense_b["median_ms"] / t_fact_b["median_ms"],
                        plan_peak_bytes=plan.peak_bytes,
                    )
                )
                prog.step(f"{device} B={batch} C={c} R={r}")
    prog.close()
    return rows


# -- output -----------------------------------------------------------------------------------------------------
#: torchvision's r3d_18 convolutions on a (B, 3, 16, 112, 112) clip: (C, T, kernel, stride, padding, input D/H/W)
R3D18_CONVS = [
    ("stem", 3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), (16, 112, 112)),
    ("layer1", 64, 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), (16, 56, 56)),
    ("layer2.0", 64, 128, (3, 3, 3), (2, 2, 2), (1, 1, 1), (16, 56, 56)),
    ("layer2", 128, 128, (3, 3, 3), (1, 1, 1), (1, 1, 1), (8, 28, 28)),
    ("layer3.0", 128, 256, (3, 3, 3), (2, 2, 2), (1, 1, 1), (8, 28, 28)),
    ("layer3", 256, 256, (3, 3, 3), (1, 1, 1), (1, 1, 1), (4, 14, 14)),
    ("layer4.0", 256, 512, (3, 3, 3), (2, 2, 2), (1, 1, 1), (4, 14, 14)),
    ("layer4", 512, 512, (3, 3, 3), (1, 1, 1), (1, 1, 1), (2, 7, 7)),
]


def _r3d18(num_classes=400):
    """torchvision's r3d_18 (its own definition where torchvision imports; otherwise the same
    topology written out here: stem 3x7x7 stride (1, 2, 2), four stages of two basic blocks with
    3x3x3 convs, 1x1x1 projections, BatchNorm3d, global pooling, fc). Returns (model, source)."""
    import torch
    from torch import nn

    try:
        from ._torchvision import torchvision_models

        return torchvision_models().video.r3d_18(num_classes=num_classes), "torchvision.models.video.r3d_18"
    except ImportError:
        pass

    class Block(nn.Module):
        def __init__(self, c_in, c, stride):
            super().__init__()
            self.conv1 = nn.Sequential(nn.Conv3d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm3d(c), nn.ReLU(True))
            self.conv2 = nn.Sequential(nn.Conv3d(c, c, 3, 1, 1, bias=False), nn.BatchNorm3d(c))
            self.downsample = (
                nn.Sequential(nn.Conv3d(c_in, c, 1, stride, bias=False), nn.BatchNorm3d(c))
                if stride != 1 or c_in != c
                else None
            )

        def forward(self, x):
            skip = x if self.downsample is None else self.downsample(x)
            return torch.relu(self.conv2(self.conv1(x)) + skip)

    stages, c_in = [], 64
    for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        stages.append(nn.Sequential(Block(c_in, c, stride), Block(c, c, 1)))
        c_in = c
    model = nn.Sequential(
        nn.Sequential(nn.Conv3d(3, 64, (3, 7, 7), (1, 2, 2), (1, 3, 3), bias=False), nn.BatchNorm3d(64), nn.ReLU(True)),
        *stages,
        nn.AdaptiveAvgPool3d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )
    return model, "r3d_18 topology (torchvision not importable here)"


def suite_models(args, targets):
    """A whole r3d_18 forward, dense against factorized (``tensorconv.nn.factorize``, CP at a
    quarter of each conv's parameters), torch CPU, eval, interleaved. Target: >= 2x at batch 1."""
    import torch

    from ..nn import factorize

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
    from ..nn.layers import _FactorizedConv

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


_DECOMPOSE = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
def hwm():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
torch.manual_seed(0)
c, t, r, r_out, r_in = (int(v) for v in sys.argv[3].split(","))
conv = torch.nn.Conv3d(c, t, 3, bias=False)
who = sys.argv[1]
if who == "tltorch":
    import tensorly
    import tltorch
    tensorly.set_backend("pytorch")
base = hwm()
t0 = time.perf_counter()
if who == "tensorconv-cp":
    from tensorconv.nn import KruskalConv
    layer = KruskalConv.from_conv(conv, r)
    err = layer.relative_error
elif who == "tensorconv-tucker":
    from tensorconv.nn import TuckerConv
    layer = TuckerConv.from_conv(conv, (r_out, r_in))
    err = layer.relative_error
else:
    layer = tltorch.FactorizedConv.from_conv(conv, rank=r, factorization="cp")
    w = conv.weight.detach()
    err = float((layer.weight.to_tensor() - w).norm() / w.norm())
print(json.dumps(dict(seconds=time.perf_counter() - t0, extra_bytes=hwm() - base, error=err)))
"""


def suite_decompose(args, targets):
    """Decomposing one large layer, Conv3d(512, 1024, 3): tensorconv's CP (rank 256) and Tucker
    ((256, 128)) against tensorly-torch's ``FactorizedConv.from_conv`` (CP, rank 256); time and
    peak memory above the process's baseline, each in its own process (the peer with a time and
    address-space limit, so that it cannot take the machine down). ``--quick``: Conv3d(64, 128, 3)
    at an eighth of those ranks, 20 s at most each."""
    import resource
    import subprocess

    rows = []
    threads = 2
    limit_s = 20 if args.quick else 600
    # (C, T, CP rank, Tucker R_out, R_in)
    sizes = (64, 128, 32, 32, 16) if args.quick else (512, 1024, 256, 256, 128)
    whos = ("tensorconv-cp", "tensorconv-tucker", "tltorch")
    prog = _Progress(len(whos), "decompose")
    for who in whos:

        def cap():  # 16 GiB of address space: the peer's reported ~83 GB would otherwise swap the VM
            resource.setrlimit(resource.RLIMIT_AS, (16 * 1024**3, 16 * 1024**3))

        row = dict(
            suite="decompose",
            method=who,
            layer=f"Conv3d({sizes[0]}, {sizes[1]}, 3)",
            rank=f"({sizes[3]}, {sizes[4]})" if who.endswith("tucker") else str(sizes[2]),
            threads=threads,
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", _DECOMPOSE, who, str(threads), ",".join(map(str, sizes))],
                capture_output=True,
                text=True,
                timeout=limit_s,
                preexec_fn=cap if who == "tltorch" else None,
            )
            if done.returncode == 0:
                out = json.loads(done.stdout.strip().splitlines()[-1])
                row.update(
                    seconds=round(out["seconds"], 1),
                    extra_peak_mib=round(out["extra_bytes"] / 2**20),
                    relative_error=round(out["error"], 4),
                    result="done",
                )
            else:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                row.update(seconds=None, extra_peak_mib=None, relative_error=None, result=f"failed: {last[:120]}")
        except subprocess.TimeoutExpired:
            row.update(seconds=None, extra_peak_mib=None, relative_error=None, result=f"did not finish in {limit_s} s")
        rows.append(row)
        prog.step(who)
    prog.close()
    return rows


def suite_r3d18(args, targets):
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
                _params_matched_rank(c, t, ks),
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
            if _priced_accelerator(fused) and getattr(args, "cpu_kernel", False):
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


def format_rows(rows):
    lines = []
    by_suite = {}
    for r in rows:
        by_suite.setdefault(r["suite"], []).append(r)
    for suite, items in by_suite.items():
        lines.append(f"\n== {suite} ==")
        keys = [k for k in items[0] if k not in ("suite", "runs")]
        lines.append(" | ".join(keys))
        for r in items:
            lines.append(" | ".join(_fmt(r.get(k)) for k in keys))
    return "\n".join(lines)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def plot_fig6(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    models = ("3D-Conv", "CP-HOConv-6", "CP-HOConv-3")
    backends = sorted({r["backend"] for r in rows})
    for model in models:
        pts = sorted({(r["channels"], r["analytic_macs"]) for r in rows if r["model"] == model})
        ax1.plot([f"{c}x{c}" for c, _ in pts], [2 * m / 1e9 for _, m in pts], marker="o", label=model)
        for backend in backends:
            sel = sorted(
                (r["channels"], r["median_ms"]) for r in rows if r["model"] == model and r["backend"] == backend
            )
            if sel:
                ax2.plot([f"{c}x{c}" for c, _ in sel], [t for _, t in sel], marker="o", label=f"{model} ({backend})")
    ax1.set_yscale("log")
    ax1.set_ylabel("GFLOPs (2 x MACs of the 1x1/depthwise/1x1 plan)")
    ax1.set_xlabel("input x output channels")
    ax1.set_title("Figure 6: FLOPs, input 16x32x32, kernel 3x3x3")
    ax1.legend()
    ax2.set_yscale("log")
    ax2.set_ylabel("forward time, median (ms)")
    ax2.set_xlabel("input x output channels")
    ax2.set_title("measured")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _priced_accelerator(plan):
    """Whether the plan's first accelerator is one ``auto`` weighs (a compiled kernel, not the
    torch.compile / tiled runners of ``fused``)."""
    from .. import accelerators

    return plan.accelerator is not None and "auto" in accelerators.get(plan.accelerator).serves


def _suite_function(name):
    if name in _KERNEL_SUITES:
        from . import bench_kernels

        return getattr(bench_kernels, f"suite_{name}")
    return globals()[f"suite_{name}"]


def add_arguments(parser):
    parser.add_argument(
        "suites", nargs="*", choices=[*SUITES, []], default=None, help=f"suites to run (default: all of {SUITES})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"small sizes and short timings; with no suite named, only {', '.join(QUICK_SUITES)}: "
        f"under a minute on a 2-core CPU",
    )
    parser.add_argument("--out", metavar="DIR", help="write results.json (and fig6.png) there")
    parser.add_argument(
        "--backend",
        action="append",
        choices=["numpy", "torch", "torch-cuda", "cupy", "jax"],
        help="backend (repeatable; default: every one found)",
    )
    parser.add_argument("--batch", type=positive_int, default=None, help="batch size (default 1, quick 1)")
    parser.add_argument("--repeat", type=positive_int, default=None, help="timed runs per point (default 7, quick 3)")
    parser.add_argument(
        "--allocator",
        choices=["default", "no-trim"],
        default="no-trim",
        help="glibc allocator: 'no-trim' keeps freed memory (no first-touch page faults); "
        "'default' leaves glibc as it is. Recorded with the results.",
    )


def main(args):
    suites = args.suites or list(QUICK_SUITES if args.quick else SUITES)
    args.batch = 1 if args.batch is None else args.batch
    # quick: every suite at its small sizes, each point timed for about half a second (a smoke
    # run of the harness in about a minute); the full suites take as long as they need
    args.repeat = (3 if args.quick else 7) if args.repeat is None else args.repeat
    args.budget = 0.5 if args.quick else 20.0
    if args.batch < 1 or args.repeat < 1:
        raise SystemExit("--batch and --repeat must be >= 1")
    output = open_output(args.out, directory=True, filename="results.json", flag="--out") if args.out else None
    if args.allocator == "no-trim":
        ok = _set_malloc_no_trim()
        args.allocator_note = (
            "glibc mallopt: M_MMAP_THRESHOLD=1GiB, M_TRIM_THRESHOLD=inf" if ok else "default (no glibc mallopt here)"
        )
    else:
        args.allocator_note = "glibc default"
    targets = _targets(args)
    if any(b == "torch" and str(d).startswith("cpu") for b, d in targets):
        # built (or loaded) before anything is timed, so that auto weighs them and fused never builds mid-run
        from .. import accelerators

        args.cpu_kernel = all(accelerators.build().values())
    t0 = time.perf_counter()
    rows = []
    suite_seconds = {}
    for suite in suites:
        start = time.perf_counter()
        rows += _suite_function(suite)(args, targets)
        suite_seconds[suite] = round(time.perf_counter() - start, 1)
    env = environment(args)
    env["suite_seconds"] = suite_seconds
    env["seconds"] = round(time.perf_counter() - t0, 1)
    env["command"] = "tensorconv bench " + " ".join(sys.argv[2:] if len(sys.argv) > 2 else [])
    print(format_rows(rows))
    print(f"\n(ran in {env['seconds']} s; allocator: {env['allocator']})")
    if output is not None:
        write_output(output, json.dumps({"environment": env, "rows": rows}, indent=1), flag="--out")
        fig_rows = [r for r in rows if r["suite"] == "fig6"]
        if fig_rows:
            try:
                plot_fig6(fig_rows, os.path.join(args.out, "fig6.png"))
            except ImportError:
                print("matplotlib is not installed: no fig6.png (pip install 'tensorconv[bench]')", file=sys.stderr)
    return 0
