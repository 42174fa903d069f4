"""What torch's CPU convs cost per call for the steps of a factorized plan, on this machine (torch
CPU, 2 threads, float32, medians in microseconds):

1. oneDNN's primitive cache: one depthwise 1-D conv (8 x L x 24, kernel 3) cycled over N distinct
   lengths; past the cache's real capacity every call compiles its primitive again.
2. A 1-D depthwise step (B, L, C) channels-last with 3 taps: conv1d of the channels-last view,
   conv2d of a (B, C, 1, L) view (what the plans run), and a tap loop (three multiply-adds).
3. A 1x1 step as a GEMM into a fresh output against one into a reused buffer (the page faults a
   fresh output above glibc's mmap threshold takes on every call).

    python benchmarks/onednn_steps.py
"""

import time

import torch
import torch.nn.functional as F


def median_us(fn, n=30, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e6


def primitive_cache():
    w = torch.randn(24, 1, 3)
    for n in (100, 200, 300, 400, 800):
        xs = [torch.randn(8, length, 24).movedim(-1, 1) for length in range(100, 100 + n)]
        per_call = []
        for _ in range(3):  # the last sweep: every length seen before
            t0 = time.perf_counter()
            for x in xs:
                F.conv1d(x, w, None, 1, 1, 1, 24)
            per_call.append((time.perf_counter() - t0) / n * 1e6)
        print(f"  {n:4d} lengths: {per_call[-1]:7.0f} us per call")


def one_d_depthwise():
    for b, length, c in [
        (8, 175, 24),
        (8, 175, 44),
        (8, 250, 96),
        (8, 500, 64),
        (8, 1000, 64),
        (8, 4000, 64),
        (32, 4000, 128),
        (64, 500, 256),
    ]:
        a = torch.randn(b, length + 2, c)
        w = torch.randn(c, 1, 3)
        taps = w[:, 0, :].t().contiguous()

        def conv1d():
            return F.conv1d(a.movedim(-1, 1), w, None, 1, 0, 1, c).movedim(1, -1)

        def conv2d_view():
            return F.conv2d(a.unsqueeze(1).movedim(-1, 1), w.unsqueeze(2), None, 1, 0, 1, c).movedim(1, -1).squeeze(1)

        def tap_loop():
            out = a[:, 0:length] * taps[0]
            out.addcmul_(a[:, 1 : length + 1], taps[1])
            return out.addcmul_(a[:, 2 : length + 2], taps[2])

        assert torch.allclose(conv1d(), tap_loop(), atol=1e-4) and torch.allclose(conv2d_view(), tap_loop(), atol=1e-4)
        mb = b * length * c * 4 / 1e6
        print(
            f"  ({b}, {length}, {c}) {mb:5.1f} MB: conv1d {median_us(conv1d):8.0f}  "
            f"2-D view {median_us(conv2d_view):8.0f}  tap loop {median_us(tap_loop):8.0f}"
        )


def gemm_outputs():
    for p, c, t in [(1400, 32, 12), (6272, 128, 416), (50176, 64, 200), (50176, 200, 64)]:
        a, w = torch.randn(p, c), torch.randn(t, c)
        buf = torch.empty(p, t)
        fresh = median_us(lambda: torch.matmul(a, w.t()))
        reused = median_us(lambda: torch.mm(a, w.t(), out=buf))
        print(
            f"  {p} x {c} -> {t} ({p * t * 4 / 1e6:.1f} MB out): fresh {fresh:8.0f}  into a reused buffer {reused:8.0f}"
        )


if __name__ == "__main__":
    torch.set_num_threads(2)
    print("1. oneDNN primitive cache (us per call, lengths seen before)")
    primitive_cache()
    print("2. 1-D depthwise step, 3 taps (us)")
    one_d_depthwise()
    print("3. 1x1 step as a GEMM (us)")
    gemm_outputs()
