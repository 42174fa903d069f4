"""A probe of where the plane chain's forward spends its time: the kernel's source built twice
more, once with its GEMMs returning at once (``SKIP_GEMM``) and once with its depthwise passes
returning at once (``SKIP_PASS``), each timed against the real kernel on r3d_18's `layer1` CP
conv (rank 200, input 1x64x16x56x56, padding 1); medians of 20 runs after 3, ms, three rounds.
The outputs of the cut variants are garbage, and what a cut leaves unwritten is read
uninitialised by the next phase, so treat the split as a hint, not a measurement. Builds take
a minute or two each (in a temporary folder).

    python benchmarks/chain_probe.py
"""

import re
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import load

from tensorconv import KruskalKernel
from tensorconv.accelerators.plane_chain import _build
from tensorconv.bench.timing import measure

torch.set_num_threads(2)
SOURCE = Path(_build.__file__).with_name("cp_chain_cpu.cpp")
CUTS = {
    "SKIP_GEMM": [
        "void gemm_into(torch::Tensor out, const torch::Tensor& rows, const torch::Tensor& w) {",
        "void gemm_c_to_r(const torch::Tensor& xp, const torch::Tensor& uc, torch::Tensor out) {",
        # the kernel's own AVX-512 GEMMs (the two above are only its BLAS path: before 2026-12-07
        # this cut left the own GEMMs running, and "GEMMs cut" timed the whole chain)
        "              int64_t N) {",
    ],
    "SKIP_PASS": [],  # taps_run: every depthwise pass goes through it
}


def variant(macro, folder):
    src = SOURCE.read_text()
    for head in CUTS[macro]:
        assert src.count(head) == 1, head
        src = src.replace(head, head + f"\n#ifdef {macro}\n  return;\n#endif")
    if macro == "SKIP_PASS":
        src, n = re.subn(
            r"(inline void taps_run\(scalar_t\* dst, int64_t dst_step,[^{]*\{)",
            r"\1\n#ifdef SKIP_PASS\n  return;\n#endif",
            src,
            count=1,
        )
        assert n == 1, "taps_run not found"
    path = Path(folder) / f"{macro.lower()}.cpp"
    path.write_text(src)
    return load(
        name=f"chain_probe_{macro.lower()}",
        sources=[str(path)],
        extra_cflags=["-O3", "-march=native", "-fopenmp", f"-D{macro}"],
        extra_ldflags=["-fopenmp"],
        build_directory=folder,
        verbose=False,
    )


def median_ms(fn):
    return measure(fn, warmup=3, repeat=20)["median_ms"]


def main():
    real = _build.load()
    assert real is not None, "build the plane chain first: tensorconv build-kernel"
    with tempfile.TemporaryDirectory() as folder:
        modules = {"real": real, **{m.lower(): variant(m, folder) for m in CUTS}}
        k = KruskalKernel.random((64, 64, 3, 3, 3), 200, backend="torch", dtype="float32", seed=0)
        x = torch.randn(1, 64, 16, 56, 56)
        lam, (ut, uc, u0, u1, u2) = k.weights, k.factors
        args = (x, lam, ut, uc, u0, u1, u2, [16, 56, 56], [1, 1, 1], [1, 1, 1], [1, 1, 1])
        with torch.no_grad():
            for _ in range(3):
                times = {name: median_ms(lambda m=m: m.cp_chain_forward_kruskal(*args)) for name, m in modules.items()}
                print("  ".join(f"{name} {ms:.2f} ms" for name, ms in times.items()))


if __name__ == "__main__":
    main()
