"""``tensorconv verify``: every derivation of the paper checked on random instances, every backend."""

from __future__ import annotations

import json
import sys
import time
import zlib

import numpy as np

from ..architectures import block_macs, run_block
from ..backends import available_backends, backend_for_name
from ..derivations import DERIVATIONS, PAPER_NAMES, derivation_label
from ..plans.plan import conv, plan_conv
from ..tenalg import mode_dot
from ._args import enable_jax_x64, non_negative_int, open_output, positive_int, write_output

TOLERANCE = {"float64": 1e-10, "float32": 1e-4}


def _backend_device(name):
    if name == "torch-cuda":
        return "torch", "cuda"
    if name == "cupy":
        return "cupy", 0
    return name, None


def _random_geometry(rng, kernel_size):
    n = len(kernel_size)
    stride = tuple(int(s) for s in rng.integers(1, 3, size=n))
    dilation = tuple(int(d) for d in rng.integers(1, 3, size=n))
    padding = tuple((int(rng.integers(0, 3)), int(rng.integers(0, 3))) for _ in range(n))
    spans = [d * (k - 1) + 1 for k, d in zip(kernel_size, dilation)]
    max_d = {1: 12, 2: 8, 3: 6, 4: 4}[n]
    dims = tuple(int(rng.integers(max(1, s), max(s, max_d) + 1)) for s in spans)
    return dict(stride=stride, padding=padding, dilation=dilation), dims


def _errors(got, ref, backend):
    a, b = backend.to_numpy(got).astype(np.float64), backend.to_numpy(ref).astype(np.float64)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return diff, diff / scale if scale else diff


def _case(derivation, rng, n, backend_name, device, dtype):
    b = backend_for_name(backend_name)
    kernel = derivation.make_kernel(rng, n, backend_name, dtype, device)
    is_array = not hasattr(kernel, "to_dense")
    dense = kernel if is_array else kernel.to_dense()
    kernel_size = tuple(int(k) for k in dense.shape[2:])
    geo, dims = _random_geometry(rng, kernel_size)
    if derivation.name == "pointwise":
        geo = dict(stride=1, padding=0, dilation=1)
    batch = int(rng.integers(1, 3))
    x = b.random_normal((batch, int(dense.shape[1])) + dims, seed=int(rng.integers(2**31)), dtype=dtype, device=device)
    layers = derivation.to_block(kernel, **geo)
    outputs = {"block": run_block(x, layers)}
    outputs["kernel"] = conv(x, kernel, **geo)
    outputs["dense"] = conv(x, dense, **geo)  # the kernel's dense form as one dense convolution
    back = derivation.to_kernel(layers)
    outputs["kernel<-block"] = conv(x, back, **geo)
    if derivation.name == "pointwise":
        outputs["mode_dot"] = mode_dot(x, b.reshape(dense, tuple(dense.shape[:2])), 1)
    ref = outputs.pop("block")
    errs = [_errors(v, ref, b) for v in outputs.values()]
    block_params = sum(layer.n_params for layer in layers)
    dense_params = int(np.prod(dense.shape))
    plan = plan_conv(dense, tuple(x.shape), **geo)
    return (
        max(e[0] for e in errs),
        max(e[1] for e in errs),
        block_params,
        dense_params,
        block_macs(layers, tuple(x.shape)),
        plan.dense_macs,
    )


def _transduction_case(rng, n, backend_name, device, dtype, init):
    """(N+1)-D conv of a transducted kernel vs the N-D conv frame by frame (center) or summed (ones)."""
    from ..kernels import KruskalKernel

    b = backend_for_name(backend_name)
    c, t, r = (int(v) for v in rng.integers(1, 5, size=3))
    ks = tuple(int(k) for k in rng.integers(1, 4, size=n))
    k = KruskalKernel.random(
        (t, c) + ks, r, backend=backend_name, dtype=dtype, device=device, seed=int(rng.integers(2**31))
    )
    kt = int(rng.integers(0, 3)) * 2 + 1 if init == "center" else int(rng.integers(1, 4))
    frames = int(rng.integers(kt, kt + 4))
    dims = tuple(int(rng.integers(k_, k_ + 5)) for k_ in ks)
    x = b.random_normal((1, c, frames) + dims, seed=int(rng.integers(2**31)), dtype=dtype, device=device)
    big = k.transduct(kt, position=0, init=init)
    # center: 'same' temporal padding keeps every frame; ones: valid windows of kt frames
    temporal = ((kt - 1) // 2, kt - 1 - (kt - 1) // 2) if init == "center" else (0, 0)
    padding = (temporal,) + ((1, 1),) * n
    got = conv(x, big, padding=padding)
    per_frame = [conv(x[:, :, f], k, padding=1) for f in range(frames)]
    if init == "center":
        ref = b.xp.stack(per_frame, 2)  # positional axis: numpy, cupy and torch alike
    else:
        outs = []
        for f in range(frames - kt + 1):
            acc = per_frame[f]
            for j in range(1, kt):
                acc = acc + per_frame[f + j]
            outs.append(acc)
        ref = b.xp.stack(outs, 2)
    e = _errors(got, ref, b)
    plan = plan_conv(big, tuple(x.shape), padding=padding, strategy="factorized")
    return e[0], e[1], big.n_params, big.dense_params, plan.macs, plan.dense_macs


def run(backends=None, dtypes=("float64",), cases=10, seed=0, derivations=None, progress=True):
    """Run the checks; returns a list of result rows (dicts)."""
    backends = backends or available_backends()
    names = derivations or list(DERIVATIONS) + ["transduct_center", "transduct_ones"]
    rows = []
    total = len(backends) * len(dtypes) * len(names)
    done = 0
    for backend in backends:
        name, device = _backend_device(backend)
        for dtype in dtypes:
            for dname in names:
                # crc32, not hash(): str hashes are randomised per process, and --seed must reproduce a run
                rng = np.random.default_rng([seed, zlib.crc32(dname.encode()), zlib.crc32(backend.encode())])
                t0 = time.perf_counter()
                worst = [0.0, 0.0]
                info = (0, 0, 0, 0)
                error = None
                try:
                    for i in range(cases):
                        if dname.startswith("transduct"):
                            res = _transduction_case(rng, 1 + i % 2, name, device, dtype, dname.split("_")[1])
                        else:
                            d = DERIVATIONS[dname]
                            res = _case(d, rng, d.dims[i % len(d.dims)], name, device, dtype)
                        worst = [max(worst[0], res[0]), max(worst[1], res[1])]
                        info = res[2:]
                except Exception as exc:  # a crash is a failure of that derivation, reported, not raised
                    error = f"{type(exc).__name__}: {exc}"
                ok = error is None and worst[1] <= TOLERANCE[dtype]
                rows.append(
                    dict(
                        derivation=dname,
                        # the paper's short name (bottleneck for tucker) and the table's label
                        paper_name=derivation_label(dname).split("/")[-1],
                        label=derivation_label(dname),
                        backend=backend,
                        dtype=dtype,
                        cases=cases,
                        max_abs=worst[0],
                        max_rel=worst[1],
                        params_block=info[0],
                        params_dense=info[1],
                        macs_block=info[2],
                        macs_dense=info[3],
                        passed=ok,
                        error=error,
                        seconds=round(time.perf_counter() - t0, 3),
                    )
                )
                done += 1
                if progress:
                    print(
                        f"[{done}/{total}] {dname} on {backend} ({dtype}): {'pass' if ok else 'FAIL'}",
                        file=sys.stderr,
                        flush=True,
                    )
    return rows


def format_table(rows):
    head = (
        f"{'derivation':<18} {'backend':<11} {'dtype':<8} {'cases':>5} {'max abs err':>11} {'max rel err':>11} "
        f"{'params block/dense*':>20} {'MACs block/dense*':>22} {'result':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{derivation_label(r['derivation']):<18} {r['backend']:<11} {r['dtype']:<8} {r['cases']:>5} "
            f"{r['max_abs']:>11.2e} "
            f"{r['max_rel']:>11.2e} {str(r['params_block']) + '/' + str(r['params_dense']):>20} "
            f"{str(r['macs_block']) + '/' + str(r['macs_dense']):>22} {'pass' if r['passed'] else 'FAIL':>6}"
        )
        if r["error"]:
            lines.append(f"    error: {r['error']}")
    lines.append("* of the last random case (small random sizes: a check of the algebra, not of compression)")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument(
        "--backend",
        action="append",
        choices=["numpy", "torch", "torch-cuda", "cupy", "jax"],
        help="backend to check (repeatable; default: every one found)",
    )
    parser.add_argument(
        "--dtype", action="append", choices=["float64", "float32"], help="dtype (repeatable; default float64)"
    )
    parser.add_argument("--cases", type=positive_int, default=10, help="random instances per derivation (default 10)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random cases (an int >= 0)")
    parser.add_argument("--derivation", action="append", help="only this derivation (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def main(args):
    if args.cases < 1:
        raise SystemExit(f"--cases must be >= 1, got {args.cases}")
    output = open_output(args.json, flag="--json") if args.json else None
    found = available_backends()
    backends = args.backend or found
    missing = [b for b in backends if b not in found]
    if missing:
        raise SystemExit(f"backend(s) {missing} not available here; found {found}")
    if args.derivation:
        args.derivation = [PAPER_NAMES.get(d.lower(), d) for d in args.derivation]
        unknown = [
            d for d in args.derivation if d not in DERIVATIONS and d not in ("transduct_center", "transduct_ones")
        ]
        if unknown:
            raise SystemExit(
                f"unknown derivation(s) {unknown}; choose from {list(DERIVATIONS)} + transduct_center, "
                f"transduct_ones, or the paper's names {list(PAPER_NAMES)}"
            )
    dtypes = tuple(args.dtype or ["float64"])
    if "jax" in backends and "float64" in dtypes:
        enable_jax_x64()
    rows = run(backends, dtypes, args.cases, args.seed, args.derivation)
    print(format_table(rows))
    failed = [r for r in rows if not r["passed"]]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    if output is not None:
        write_output(output, json.dumps(rows, indent=2), flag="--json")
    return 1 if failed else 0
