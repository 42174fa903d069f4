"""How far r3d_18's `layer1` CP convs are from their GEMMs: the plane chain (rank 200, input
(1, 64, 16, 56, 56), padding 1) with 3x3x3 factors and with one-tap factors (its passes then
multiply by one tap, but still read and write every rank-channel row once per mode), against
torch's GEMMs of the same two products (C -> R and R -> T over all positions, and plane by plane
as the chain runs them) and the dense Conv3d; medians of 20 runs after 3, ms, and each one's
rate in GMAC/s of the products it runs (of the dense conv's MACs for the dense conv).

    python benchmarks/chain_gemms.py
"""

import torch

from tensorconv import KruskalKernel, plan_conv
from tensorconv.bench.timing import measure

torch.set_num_threads(2)
C, R, D, H, W = 64, 200, 16, 56, 56
P = D * H * W


def median_ms(fn):
    return measure(fn, warmup=3, repeat=20)["median_ms"]


def row(name, ms, macs):
    print(f"{name:<44} {ms:8.2f} ms {macs / ms / 1e6:8.1f} GMAC/s")


gemm_macs = 2 * P * C * R
x = torch.randn(1, C, D, H, W)
with torch.no_grad():
    for ks, pad in [((3, 3, 3), 1), ((1, 1, 1), 0)]:
        k = KruskalKernel.random((C, C) + ks, R, backend="torch", dtype="float32", seed=0)
        plan = plan_conv(k, x.shape, padding=pad, strategy="fused")
        assert plan.accelerator == "plane_chain", "build the plane chain first: tensorconv build-kernel"
        row(f"plane chain, {'x'.join(map(str, ks))} factors", median_ms(lambda: plan(x, k)), gemm_macs)
    a, w1, o1 = torch.randn(P, C), torch.randn(C, R), torch.empty(P, R)
    b, w2, o2 = torch.randn(P, R), torch.randn(R, C), torch.empty(P, C)

    def both():
        torch.mm(a, w1, out=o1)
        torch.mm(b, w2, out=o2)

    def per_plane():
        for i in range(D):
            rows = slice(i * H * W, (i + 1) * H * W)
            torch.mm(a[rows], w1, out=o1[rows])
            torch.mm(b[rows], w2, out=o2[rows])

    row("torch.mm C -> R and R -> T, all positions", median_ms(both), gemm_macs)
    row("torch.mm C -> R and R -> T, plane by plane", median_ms(per_plane), gemm_macs)
    dense = KruskalKernel.random((C, C, 3, 3, 3), R, backend="torch", dtype="float32", seed=0).to_dense()
    row("dense Conv3d 3x3x3", median_ms(lambda: torch.nn.functional.conv3d(x, dense, padding=1)), P * C * C * 27)
