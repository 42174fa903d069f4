"""Channels-first vs channels-last for the stages of a CP plan on torch CPU (issue: layout choice).

    python benchmarks/layout.py            # prints a markdown table

Each stage is timed as torch runs it natively in both layouts: the 1x1 stage (C -> R) as
F.conv3d / a GEMM, and one depthwise 1-D stage (groups = R, kernel 3 along one mode).
Medians of 9 runs after 2 warm-ups; glibc told not to trim (see docs/benchmarks.md).
"""

import platform

import torch
import torch.nn.functional as F

from tensorconv.cli.bench import _set_malloc_no_trim, measure


def med(fn):
    return measure(fn, repeat=9)["median_ms"]


def inputs():
    """(batch, channels, channels-first input) for every measured point."""
    for b in (1, 8):
        for c in (16, 64, 128):
            yield b, c, torch.randn(b, c, 16, 32, 32)


def main():
    _set_malloc_no_trim()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}\n"
    )
    print("| B | C=R | stage | channels-first (NCDHW) ms | channels-last (NDHWC) ms | CF / CL |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for b, c, x in inputs():
            xl = x.contiguous(memory_format=torch.channels_last_3d)
            w1 = torch.randn(c, c, 1, 1, 1)
            wd = torch.randn(c, 1, 3, 1, 1)
            rows = [
                ("1x1 conv", lambda: F.conv3d(x, w1), lambda: F.conv3d(xl, w1)),
                (
                    "depthwise (3,1,1)",
                    lambda: F.conv3d(x, wd, padding=(1, 0, 0), groups=c),
                    lambda: F.conv3d(xl, wd, padding=(1, 0, 0), groups=c),
                ),
            ]
            for name, cf, cl in rows:
                a, bb = med(cf), med(cl)
                print(f"| {b} | {c} | {name} | {a:.2f} | {bb:.2f} | {a / bb:.1f} |")


def first_step():
    """The first 1x1 step reads the caller's channels-first input: copy to channels-last then a
    oneDNN 1x1 conv, or one GEMM with a transposed operand (what the torch backend does)."""
    print(
        "\n| B | C=R | copy + channels-last 1x1 conv ms | GEMM on the transposed view ms | ratio | "
        "1x1 conv on channels-last data (no copy) ms |"
    )
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for b, c, x in inputs():
            u = torch.randn(c, c)
            p = 16 * 32 * 32

            def copy_then_conv():
                act = x.movedim(1, -1).contiguous()
                return F.conv2d(act.reshape(b, p, 1, c).movedim(-1, 1), u.T.reshape(c, c, 1, 1))

            def transposed_gemm():
                return torch.matmul(x.reshape(b, c, p).transpose(1, 2), u)

            act = x.movedim(1, -1).contiguous()  # what the input would cost if it came channels-last

            def channels_last_conv():
                return F.conv2d(act.reshape(b, p, 1, c).movedim(-1, 1), u.T.reshape(c, c, 1, 1))

            a, t, ideal = med(copy_then_conv), med(transposed_gemm), med(channels_last_conv)
            print(f"| {b} | {c} | {a:.2f} | {t:.2f} | {a / t:.1f} | {ideal:.2f} |")


def whole_conv():
    """tensorconv.conv (default plan) on the same input given channels-first or channels-last:
    a channels_last_3d tensor reaches the first 1x1 step already contiguous channels-last."""
    from tensorconv import KruskalKernel, conv

    print("\n| B | C=R | conv(x) channels-first input ms | conv(x) channels_last_3d input ms | ratio |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for b, c, x in inputs():
            xl = x.contiguous(memory_format=torch.channels_last_3d)
            k = KruskalKernel.random((c, c, 3, 3, 3), rank=c, backend="torch", dtype="float32", seed=4)
            cf, cl = med(lambda: conv(x, k, padding=1)), med(lambda: conv(xl, k, padding=1))
            print(f"| {b} | {c} | {cf:.2f} | {cl:.2f} | {cf / cl:.2f} |")


if __name__ == "__main__":
    main()
    first_step()
    whole_conv()
