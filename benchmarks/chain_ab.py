"""The plane-chain kernel against an earlier version of itself, and where its forward time goes.

    python benchmarks/chain_ab.py ab REV        # this checkout's kernel vs the one at git revision REV
    python benchmarks/chain_ab.py phases        # per-phase time of this checkout's forward (B = 1)
    python benchmarks/chain_ab.py cold          # the same call after different things ran before it

``ab`` builds both sources (``tensorconv/backends/csrc/cp_chain_cpu.cpp`` here and at REV) as
separate extensions (about 35 s each, cached under ``bench-out/chain-ab``), checks that their
forwards agree (float64, several geometries), and times their raw forwards interleaved
(medians of 31 runs; B = 1 and 8, R = C, input (B, C, 16, 32, 32), k = 3, padding 1, float32,
each with this checkout's default chunk; then B = 1 at other ranks and column counts, and
float64). ``phases`` builds a copy of this checkout's kernel
with timers around its phases (transpose + GEMM C -> R, mode-2 pass, mode-1 pass, mode-0 pass,
GEMM R -> T, and the wait at the barrier of each chunk) and prints their mean per call at
batch 1 as the first of the threads sees them (each thread runs its share of every phase).
``cold`` times ``conv(x, k, strategy="fused")`` (B = 1, R = C = 16 and 64) right after each of:
nothing (the call before was the same call), a 9 ms sleep, writing 64 MiB, dense Conv3d on the
same input, tensorly-torch's factorized layer (if installed); medians of 31 rounds. All set
glibc's allocator not to trim, as the bench does.
"""

import os
import subprocess
import sys

import torch

from tensorconv.backends import _torch_cpu_chain
from tensorconv.cli.bench import _set_malloc_no_trim, measure_many

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join("tensorconv", "backends", "csrc", "cp_chain_cpu.cpp")
OUT = os.path.join(ROOT, "bench-out", "chain-ab")


def _build(text, name):
    from torch.utils.cpp_extension import load

    directory = os.path.join(OUT, name)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name + ".cpp")
    with open(path, "w") as f:
        f.write(text)
    return load(
        name=name,
        sources=[path],
        extra_cflags=["-O3", "-march=native", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=directory,
    )


def _forward(module, x, uc, us, wt, chunk):
    d, h, w = x.shape[2:]
    return module.cp_chain_forward(x, uc, *us, wt, [d, h, w], [1, 1, 1], [1, 1, 1], [1, 1, 1], chunk)


def _factors(c, r, t, dtype=torch.float32):
    return (
        torch.randn(c, r, dtype=dtype),
        [torch.randn(3, r, dtype=dtype) for _ in range(3)],
        torch.randn(r, t, dtype=dtype),
    )


def main_ab(rev):
    old_text = subprocess.run(
        ["git", "show", f"{rev}:{SOURCE}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    with open(os.path.join(ROOT, SOURCE)) as f:
        new_text = f.read()
    tag = subprocess.run(
        ["git", "rev-parse", "--short", rev], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    mods = {"here": _build(new_text, "chain_here"), rev: _build(old_text, f"chain_{tag}")}
    torch.manual_seed(0)
    for c, r, k, s, p, dl in [(5, 7, 3, 1, 1, 1), (16, 16, 3, 2, 1, 1), (9, 20, 5, 1, 2, 2), (4, 33, 7, 1, 3, 1)]:
        x = torch.randn(2, c, 6, 9, 11, dtype=torch.float64)
        uc, us, wt = (
            torch.randn(c, r, dtype=torch.float64),
            [torch.randn(k, r, dtype=torch.float64) for _ in range(3)],
            torch.randn(r, 5, dtype=torch.float64),
        )
        out = [(n + 2 * p - dl * (k - 1) - 1) // s + 1 for n in (6, 9, 11)]
        got = [m.cp_chain_forward(x, uc, *us, wt, out, [s] * 3, [p] * 3, [dl] * 3, 2) for m in mods.values()]
        assert torch.allclose(got[0], got[1], rtol=1e-12, atol=1e-12), (c, r, k, s, p, dl)
    print(f"forwards agree; times in ms (medians of 31, interleaved), {torch.get_num_threads()} threads\n")
    print(f"| B | C = R | here | {rev} | here / {rev} |")
    print("|---|---|---|---|---|")
    for b, c in [(1, 16), (1, 32), (1, 64), (1, 128), (8, 32), (8, 64)]:
        x = torch.randn(b, c, 16, 32, 32)
        uc, us, wt = _factors(c, c, c)
        chunk = _torch_cpu_chain.planes_per_chunk(x.shape, c, 4, out_channels=c)
        with torch.no_grad():
            t = {
                n: v["median_ms"]
                for n, v in measure_many(
                    {n: (lambda m=m: _forward(m, x, uc, us, wt, chunk)) for n, m in mods.items()},
                    repeat=31 if b == 1 else 9,
                ).items()
            }
        print(f"| {b} | {c} | {t['here']:.3f} | {t[rev]:.3f} | {t['here'] / t[rev]:.2f} |")
    # shapes off the R = C multiples of 16: other ranks, column counts that end in part of a
    # register, float64 (B = 1, input (1, C, 16, 32, 32), medians of 21)
    print(f"\n| dtype | C | R | T | here | {rev} | here / {rev} |")
    print("|---|---|---|---|---|---|---|")
    for dtype, c, r, t_ in [
        (torch.float64, 32, 32, 32),
        (torch.float32, 32, 192, 32),
        (torch.float32, 64, 72, 72),
        (torch.float32, 16, 24, 24),
        (torch.float32, 64, 768, 64),
        (torch.float32, 64, 807, 64),
    ]:
        x = torch.randn(1, c, 16, 32, 32, dtype=dtype)
        uc, us, wt = _factors(c, r, t_, dtype)
        chunk = _torch_cpu_chain.planes_per_chunk(x.shape, r, x.element_size(), out_channels=t_)
        with torch.no_grad():
            t = {
                n: v["median_ms"]
                for n, v in measure_many(
                    {n: (lambda m=m: _forward(m, x, uc, us, wt, chunk)) for n, m in mods.items()}, repeat=21
                ).items()
            }
        name = str(dtype).replace("torch.", "")
        print(f"| {name} | {c} | {r} | {t_} | {t['here']:.3f} | {t[rev]:.3f} | {t['here'] / t[rev]:.2f} |")


_TIMERS = r"""
#include <chrono>
static double T_[6];
static inline double now_() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}
"""
# the calls timed, each on the team's first thread: the phases and the barrier between them.
# Anchors are code, compared without comments or surrounding blanks: editing a comment of the
# kernel never moves a timer; editing one of these statements stops `phases` with a message
_PHASES = [
    (0, "if (own_in) {"),
    (1, "mode2_pass(pa + r0 * W * R, t1 + rb * Wo * R, re - rb, a2, w2, R);"),
    (5, "team.sync();"),
    (2, "mode1_pass(t1, g, p0, p1, [&](int64_t q) { return pring + ((d0 + q) % slots) * plane; }, Wo, a1, w1, R);"),
    (3, "taps_run(oq, R, at, R, w, n, R, qe - qb);"),
    (4, "if (own_out) {"),
]
# team.sync() occurs more than once: its anchor is the one right after the mode-2 pass's loop
_AFTER = {5: "mode2_pass(pa + r0 * W * R"}


def _code(line):
    """A C++ line without its // comment and surrounding blanks."""
    return line.split("//", 1)[0].strip()


def _statement(text, first_code, after=None):
    """The statement of ``text`` whose first line's code is ``first_code`` (an if / else with its
    braces, or one line), or None where no such line, or more than one, is found (the first one
    after a line containing ``after``, where given)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _code(line) == first_code]
    if after is not None:
        first_after = next((i for i, line in enumerate(lines) if after in _code(line)), None)
        starts = [i for i in starts if first_after is not None and i > first_after][:1]
    if len(starts) != 1:
        return None
    depth, out = 0, []
    for line in lines[starts[0] :]:
        code = _code(line)
        depth += code.count("{") - code.count("}")
        out.append(line)
        if depth == 0:
            return "".join(out).rstrip("\n")
    return None


def _instrumented(text):
    """This kernel with timers around its forward phases (text edits at fixed anchors)."""
    for slot, first_code in _PHASES:
        anchor = _statement(text, first_code, _AFTER.get(slot))
        if anchor is None:
            raise SystemExit(f"the kernel changed: anchor not found once: {first_code}")
        indent = anchor[: len(anchor) - len(anchor.lstrip())]
        text = text.replace(
            anchor,
            f"{indent}{{ const double t_ = now_();\n{anchor}\n{indent}if (team.id == 0) T_[{slot}] += now_() - t_; }}",
        )
    text = text.replace("#include <vector>\n", "#include <vector>\n" + _TIMERS, 1)
    text = text.replace(
        "PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {",
        """
std::vector<double> timers() { std::vector<double> v(T_, T_ + 6); for (auto& t : T_) t = 0; return v; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("timers", &timers);""",
    )
    return text


def main_phases():
    with open(os.path.join(ROOT, SOURCE)) as f:
        module = _build(_instrumented(f.read()), "chain_phases")
    names = [
        "GEMM C->R (with any transpose)",
        "mode-2 pass",
        "mode-1 pass",
        "mode-0 pass",
        "GEMM R->T",
        "waiting at the barrier",
    ]
    print(f"B = 1, R = C, (1, C, 16, 32, 32), float32, {torch.get_num_threads()} threads; ms per call (mean of 30)\n")
    print("| C | chunk planes | call median | " + " | ".join(names) + " |")
    print("|---|---|---|" + "---|" * len(names))
    for c in (16, 32, 64, 128):
        x = torch.randn(1, c, 16, 32, 32)
        uc, us, wt = _factors(c, c, c)
        chunk = _torch_cpu_chain.planes_per_chunk(x.shape, c, 4, out_channels=c)
        with torch.no_grad():
            for _ in range(5):
                _forward(module, x, uc, us, wt, chunk)
            module.timers()
            median = measure_many({"chain": lambda: _forward(module, x, uc, us, wt, chunk)}, repeat=30, warmup=0)
            phases = [v / 30 * 1e3 for v in module.timers()]
        print(
            f"| {c} | {chunk} | {median['chain']['median_ms']:.3f} | " + " | ".join(f"{v:.3f}" for v in phases) + " |"
        )


def main_cold():
    import time

    from tensorconv import KruskalKernel, conv
    from tensorconv.cli.bench import _import_tltorch

    big = torch.empty(64 << 18)
    print(
        f"conv(x, k, padding=1, strategy='fused'), B = 1, R = C, (1, C, 16, 32, 32), float32, "
        f"{torch.get_num_threads()} threads; ms, median of 31, right after:\n"
    )
    heads = ["the same call", "sleep 9 ms", "write 64 MiB", "dense Conv3d", "tensorly-torch"]
    print("| C | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    import tensorly

    with tensorly.backend_context("pytorch"):
        tltorch = _import_tltorch()
        for c in (16, 64):
            x = torch.randn(1, c, 16, 32, 32)
            k = KruskalKernel.random((c, c, 3, 3, 3), rank=c, backend="torch", dtype="float32", seed=4)
            dense = torch.nn.Conv3d(c, c, 3, padding=1, bias=False)
            before = {
                "the same call": lambda: None,
                "sleep 9 ms": lambda: time.sleep(0.009),
                "write 64 MiB": lambda: big.add_(1.0),
                "dense Conv3d": lambda: dense(x),
            }
            if tltorch is not None:
                layer = tltorch.FactorizedConv(
                    c, c, 3, order=3, rank=c, factorization="cp", implementation="factorized", padding=1, bias=False
                )
                before["tensorly-torch"] = lambda: layer(x)
            times = {n: [] for n in before}
            with torch.no_grad():
                for _ in range(3):
                    conv(x, k, padding=1, strategy="fused")
                for _ in range(31):
                    for name, run_before in before.items():
                        run_before()
                        t0 = time.perf_counter()
                        conv(x, k, padding=1, strategy="fused")
                        times[name].append(time.perf_counter() - t0)
            cells = [f"{sorted(times[h])[15] * 1e3:.3f}" if h in times else "-" for h in heads]
            print(f"| {c} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    _set_malloc_no_trim()
    if sys.argv[1:2] == ["ab"] and len(sys.argv) == 3:
        main_ab(sys.argv[2])
    elif sys.argv[1:] == ["phases"]:
        main_phases()
    elif sys.argv[1:] == ["cold"]:
        main_cold()
    else:
        raise SystemExit(__doc__)
