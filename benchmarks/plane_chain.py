"""The compiled plane-by-plane CP kernel (``strategy="fused"`` on torch CPU) by chunk size, in 2-D, and backward.

    python benchmarks/plane_chain.py            # prints a markdown table
    python benchmarks/plane_chain.py 2d         # 2-D CP convs: unfused auto vs the chain
    python benchmarks/plane_chain.py backward   # forward+backward: the chain vs torch.compile
    python benchmarks/plane_chain.py overhead   # the kernel's fixed cost per chunk, and the Python per call

Input (B, C, 16, 32, 32), CP kernel C -> C, 3x3x3, rank R, padding 1, float32. For each point:
dense Conv3d, the fewest-MAC factorized chain unfused, the plan ``auto`` picks when the kernel
is not built (unfused; before the plane chain existed this was the default), and the plane
kernel with chunks of 128 KiB .. 1 MiB (input planes per GEMM so that a chunk's widest
intermediate fits) and with its default chunks (``planes_per_chunk`` in
tensorconv/backends/_torch_cpu_chain.py: 128 KiB; the ratios use it), all timed interleaved in shuffled order (medians of 15 runs after 2
warm-ups), glibc told not to trim (see docs/benchmarks.md); "auto picks" is what ``auto`` runs
once the kernel is built. The kernel is built on first use (about 30 s).
"""

import platform

import torch

from tensorconv import KruskalKernel, conv, plan_conv
from tensorconv.backends import _torch_cpu_chain
from tensorconv.cli.bench import _set_malloc_no_trim, measure_many

POINTS = [(1, 16, 16), (1, 32, 32), (1, 64, 64), (1, 128, 128), (8, 32, 32), (8, 32, 96), (8, 32, 192), (8, 128, 128)]
CHUNKS_KIB = [128, 256, 1024]


def _unfused_auto(k, shape):
    """The plan auto picks when the kernel is not built (what ran before the plane chain)."""
    saved = dict(_torch_cpu_chain._state)
    _torch_cpu_chain._state.clear()
    _torch_cpu_chain._state["module"] = None
    try:
        return plan_conv(k, shape, padding=1)
    finally:
        _torch_cpu_chain._state.clear()
        _torch_cpu_chain._state.update(saved)


POINTS_2D = [(8, 64, 64, 56), (8, 32, 96, 64), (1, 128, 128, 28), (32, 64, 64, 32), (8, 256, 256, 14)]


def main_2d():
    """2-D CP convs (B, C, S, S), 3x3: the chain runs rows of mode 0 as its planes."""
    print(
        "| B | C | R | S | dense Conv2d ms | auto without the kernel ms | plane chain ms | auto picks | "
        "unfused auto / chain |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b, c, r, side in POINTS_2D:
        shape = (b, c, side, side)
        x = torch.randn(shape)
        k = KruskalKernel.random((c, c, 3, 3), r, backend="torch", dtype="float32", seed=1)
        dense = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        unfused, auto = _unfused_auto(k, shape), plan_conv(k, shape, padding=1)
        with torch.no_grad():
            t = {
                n: v["median_ms"]
                for n, v in measure_many(
                    {
                        "dense": lambda: dense(x),
                        "unfused": lambda: unfused(x, k),
                        "chain": lambda: conv(x, k, padding=1, strategy="fused"),
                    },
                    repeat=15,
                ).items()
            }
        pick = "plane chain" if auto.plane_chain else auto.strategy
        print(
            f"| {b} | {c} | {r} | {side} | {t['dense']:.2f} | {t['unfused']:.2f} | {t['chain']:.2f} | {pick} | "
            f"{t['unfused'] / t['chain']:.2f} |"
        )


POINTS_BWD = [(1, 32, 32), (1, 64, 64), (1, 128, 128), (8, 32, 32), (8, 64, 64), (8, 32, 96)]


def main_backward():
    """One forward+backward (gradients for the input and every factor), 3-D, stride 1."""
    from tensorconv.backends._torch import TorchBackend

    chain_3d = TorchBackend.cp_chain_3d
    print(
        "| B | C | R | dense Conv3d ms | factorized (unfused autograd) ms | fused: torch.compile ms | "
        "fused: plane chain ms | compile / chain | dense / chain / MAC ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for b, c, r in POINTS_BWD:
        x = torch.randn(b, c, 16, 32, 32, requires_grad=True)
        w = torch.randn(c, c, 3, 3, 3, requires_grad=True)
        k = KruskalKernel.random((c, c, 3, 3, 3), r, backend="torch", dtype="float32", seed=6)
        for t in [k.weights] + list(k.factors):
            t.requires_grad_(True)

        def compiled():
            TorchBackend.cp_chain_3d = lambda self, *a, **kw: None  # the torch.compile chain
            try:
                conv(x, k, padding=1, strategy="fused").sum().backward()
            finally:
                TorchBackend.cp_chain_3d = chain_3d

        compiled()  # compiles outside the timing
        t = {
            n: v["median_ms"]
            for n, v in measure_many(
                {
                    "dense": lambda: torch.nn.functional.conv3d(x, w, padding=1).sum().backward(),
                    "factorized": lambda: conv(x, k, padding=1, strategy="factorized").sum().backward(),
                    "compiled": compiled,
                    "chain": lambda: conv(x, k, padding=1, strategy="fused").sum().backward(),
                },
                repeat=7,
            ).items()
        }
        mac_ratio = 27 * c * c / (r * (2 * c + 9))
        print(
            f"| {b} | {c} | {r} | {t['dense']:.1f} | {t['factorized']:.1f} | {t['compiled']:.1f} | "
            f"{t['chain']:.1f} | {t['compiled'] / t['chain']:.2f} | {t['dense'] / t['chain'] / mac_ratio:.2f} |"
        )


def main_overhead():
    """The kernel's fixed cost per chunk (cost.py's ``plane_chunk_s``): a conv with almost no
    arithmetic (8 channels, 2x2 planes, 64 of them) run with 1 plane per chunk and all 64 in one."""
    module = _torch_cpu_chain.load()
    c, d = 8, 64
    x = torch.randn(1, c, d, 2, 2)
    uc, wt = torch.randn(c, c), torch.randn(c, c)
    us = [torch.randn(3, c) for _ in range(3)]
    with torch.no_grad():
        t = {
            g: v["median_ms"] * 1e3
            for g, v in measure_many(
                {
                    g: (
                        lambda g=g: module.cp_chain_forward(
                            x, uc, *us, wt, [d, 2, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1], g
                        )
                    )
                    for g in (1, d)
                },
                repeat=101,
            ).items()
        }
    print(
        f"one call, {d} chunks of 1 plane: {t[1]:.1f} us; one chunk of {d}: {t[d]:.1f} us; "
        f"per extra chunk: {(t[1] - t[d]) / (d - 1):.2f} us"
    )
    # the Python around one call: conv(x, k, strategy="fused") with the kernel replaced by a stub
    # that returns a ready output
    x = torch.randn(1, 16, 16, 32, 32)
    k = KruskalKernel.random((16, 16, 3, 3, 3), 16, backend="torch", dtype="float32", seed=4)
    ready = torch.empty(1, 16, 32, 32, 16)

    class Stub:
        def cp_chain_forward_kruskal(self, *args):
            return ready

    real = _torch_cpu_chain._state["module"]
    _torch_cpu_chain._state["module"] = Stub()
    try:
        with torch.no_grad():
            py = measure_many({"conv": lambda: conv(x, k, padding=1, strategy="fused")}, repeat=201)["conv"]
    finally:
        _torch_cpu_chain._state["module"] = real
    print(
        f"Python per conv(x, k, strategy='fused') call (1, 16, 16, 32, 32), kernel stubbed: "
        f"{py['median_ms'] * 1e3:.1f} us"
    )


def main():
    _set_malloc_no_trim()
    if _torch_cpu_chain.load() is None:
        raise SystemExit("the CPU kernel cannot be built here")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n"
    )
    cols = " | ".join(f"plane chain {c} KiB ms" for c in CHUNKS_KIB)
    print(
        f"| B | C | R | dense Conv3d ms | factorized (unfused) ms | auto without the kernel ms | {cols} | "
        f"plane chain, default chunks ms | default planes per chunk | auto picks | unfused auto / chain | "
        f"dense / chain |"
    )
    print("|---|---|---|---|---|---|" + "---|" * len(CHUNKS_KIB) + "---|---|---|---|---|")
    for b, c, r in POINTS:
        shape = (b, c, 16, 32, 32)
        x = torch.randn(shape)
        k = KruskalKernel.random((c, c, 3, 3, 3), r, backend="torch", dtype="float32", seed=4)
        lam, u_t, u_c, *spatial = [k.weights] + list(k.factors)
        dense = torch.nn.Conv3d(c, c, 3, padding=1, bias=False)
        unfused = _unfused_auto(k, shape)
        auto = plan_conv(k, shape, padding=1)
        entries = {
            "dense": lambda: dense(x),
            "factorized": lambda: conv(x, k, padding=1, strategy="factorized"),
            "unfused auto": lambda: unfused(x, k),
        }
        for kib in CHUNKS_KIB:
            entries[kib] = (
                lambda cb: (
                    lambda: _torch_cpu_chain.cp_chain_forward(
                        x,
                        lam,
                        u_t,
                        u_c,
                        spatial,
                        out_spatial=(16, 32, 32),
                        stride=(1, 1, 1),
                        pad_lo=(1, 1, 1),
                        dilation=(1, 1, 1),
                        chunk_bytes=cb,
                    )
                )
            )(kib << 10)
        entries["default"] = lambda: _torch_cpu_chain.cp_chain_forward(
            x, lam, u_t, u_c, spatial, out_spatial=(16, 32, 32), stride=(1, 1, 1), pad_lo=(1, 1, 1), dilation=(1, 1, 1)
        )
        with torch.no_grad():
            t = {n: v["median_ms"] for n, v in measure_many(entries, repeat=15).items()}
        chain = t["default"]
        planes = _torch_cpu_chain.planes_per_chunk(shape, r, 4, out_channels=c)
        chunks = " | ".join(f"{t[kib]:.2f}" for kib in CHUNKS_KIB)
        pick = "plane chain" if auto.plane_chain else auto.strategy
        print(
            f"| {b} | {c} | {r} | {t['dense']:.2f} | {t['factorized']:.2f} | {t['unfused auto']:.2f} | {chunks} | "
            f"{chain:.2f} | {planes} | {pick} | {t['unfused auto'] / chain:.2f} | {t['dense'] / chain:.2f} |"
        )


if __name__ == "__main__":
    import sys

    modes = {"2d": main_2d, "backward": main_backward, "overhead": main_overhead}
    if len(sys.argv) == 2 and sys.argv[1] in modes:
        _set_malloc_no_trim()
        if _torch_cpu_chain.load() is None:
            raise SystemExit("the CPU kernel cannot be built here")
        modes[sys.argv[1]]()
    else:
        main()
