"""EXPERIMENT (not used by tensorconv): a hand-written C++ fused CP forward on torch CPU.

    python benchmarks/experiments/cpp_plane_fused.py 16 64 128

Plane by plane along depth with a ring buffer of three planes (no halo recompute): per plane
one GEMM C -> R (MKL, reading the channels-first input in place), the W and H depthwise
passes in cache, then the depth pass over the ring and one GEMM R -> T into the output.
Built with torch.utils.cpp_extension.load_inline (g++, ~30 s). Stride 1, padding 1, k = 3,
float32, forward only. It is compared with tensorconv's default plan and tensorly-torch in one
interleaved run.

Result on the 2-core CPU (2026-11-27, two runs): correct (rel 3e-7); 1.0-1.2x faster than
`auto` (2.4-2.9x faster than tensorly-torch at C = 64-128). Its 32 per-plane MKL GEMMs alone
take 2.5 / 8.0 ms at C = 64 / 128 ("its GEMMs alone" row), where oneDNN's two whole 1x1 convs
take 1.9 / 6.9 ms; its depthwise loops cost 0.5-0.7 ms. Not adopted: forward only, one
geometry, a compiler at run time, for at most 1.2x. See docs/benchmarks.md ("Reading the
targets").
"""
import sys
import time

import torch
from torch.utils.cpp_extension import load_inline
src = r'''
#include <torch/extension.h>
#include <ATen/Parallel.h>

// x: (B, C, D, H, W) contiguous; uc: (C, R); u0: (3, R) (depth taps), u1: (3, R) (H taps), u2: (3, R) (W taps);
// wt: (R, T). Output (B, D, H, W, T) contiguous. Zero padding 1, stride 1, kernel 3 in every mode.
torch::Tensor cp_fused_forward(torch::Tensor x, torch::Tensor uc, torch::Tensor u0, torch::Tensor u1,
                               torch::Tensor u2, torch::Tensor wt) {
  const int64_t B = x.size(0), C = x.size(1), D = x.size(2), H = x.size(3), W = x.size(4);
  const int64_t R = uc.size(1), T = wt.size(1);
  const int64_t P = H * W;
  auto opts = x.options();
  auto out = torch::empty({B, D, H, W, T}, opts);
  auto a = torch::empty({P, R}, opts);          // GEMM1 output for one plane
  auto t1 = torch::empty({P, R}, opts);         // after the W pass
  auto ring = torch::zeros({3, P, R}, opts);    // planes after the W and H passes
  auto o = torch::empty({P, R}, opts);          // after the D pass
  const float* pu0 = u0.data_ptr<float>();
  const float* pu1 = u1.data_ptr<float>();
  const float* pu2 = u2.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    auto xb = x[b];  // (C, D, H, W)
    auto emit = [&](int64_t d) {
      // output plane d from ring planes d-1, d, d+1
      const float* pm = (d - 1 >= 0) ? ring[(d - 1) % 3].data_ptr<float>() : nullptr;
      const float* pc = ring[d % 3].data_ptr<float>();
      const float* pp = (d + 1 < D) ? ring[(d + 1) % 3].data_ptr<float>() : nullptr;
      float* po = o.data_ptr<float>();
      at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          float* dst = po + p * R;
          const float* c0 = pc + p * R;
          #pragma omp simd
          for (int64_t r = 0; r < R; ++r) dst[r] = c0[r] * pu0[R + r];
          if (pm) { const float* m = pm + p * R;
            #pragma omp simd
            for (int64_t r = 0; r < R; ++r) dst[r] += m[r] * pu0[r]; }
          if (pp) { const float* q = pp + p * R;
            #pragma omp simd
            for (int64_t r = 0; r < R; ++r) dst[r] += q[r] * pu0[2 * R + r]; }
        }
      });
      auto out_plane = out[b][d].view({P, T});
      at::mm_out(out_plane, o, wt);
    };
    for (int64_t d = 0; d < D; ++d) {
      auto plane = xb.select(1, d).reshape({C, P});  // (C, P) view (strided by D)
      at::mm_out(a, plane.t(), uc);
      const float* pa = a.data_ptr<float>();
      float* p1 = t1.data_ptr<float>();
      // W pass
      at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
        for (int64_t h = h0; h < h1; ++h) for (int64_t w = 0; w < W; ++w) {
          float* dst = p1 + (h * W + w) * R;
          const float* c0 = pa + (h * W + w) * R;
          #pragma omp simd
          for (int64_t r = 0; r < R; ++r) dst[r] = c0[r] * pu2[R + r];
          if (w > 0) { const float* m = c0 - R;
            #pragma omp simd
            for (int64_t r = 0; r < R; ++r) dst[r] += m[r] * pu2[r]; }
          if (w + 1 < W) { const float* q = c0 + R;
            #pragma omp simd
            for (int64_t r = 0; r < R; ++r) dst[r] += q[r] * pu2[2 * R + r]; }
        }
      });
      // H pass into the ring
      float* pr = ring[d % 3].data_ptr<float>();
      at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
        for (int64_t h = h0; h < h1; ++h) for (int64_t w = 0; w < W; ++w) {
          float* dst = pr + (h * W + w) * R;
          const float* c0 = p1 + (h * W + w) * R;
          #pragma omp simd
          for (int64_t r = 0; r < R; ++r) dst[r] = c0[r] * pu1[R + r];
          if (h > 0) { const float* m = c0 - W * R;
            #pragma omp simd
            for (int64_t r = 0; r < R; ++r) dst[r] += m[r] * pu1[r]; }
          if (h + 1 < H) { const float* q = c0 + W * R;
            #pragma omp simd
            for (int64_t r = 0; r < R; ++r) dst[r] += q[r] * pu1[2 * R + r]; }
        }
      });
      if (d >= 1) emit(d - 1);
    }
    emit(D - 1);
  }
  return out;
}
'''
t0 = time.time()
mod = load_inline("tc_proto", cpp_sources=src, functions=["cp_fused_forward"],
                  extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
print("compile s", round(time.time() - t0, 1))
from tensorconv import KruskalKernel, conv
from tensorconv.cli.bench import measure_many, _set_malloc_no_trim, _import_tltorch
import tensorly
_set_malloc_no_trim()
with tensorly.backend_context("pytorch"):
    tltorch = _import_tltorch()
    for c in [int(v) for v in sys.argv[1:]]:
        x = torch.randn(1, c, 16, 32, 32)
        k = KruskalKernel.random((c, c, 3, 3, 3), rank=c, backend="torch", dtype="float32", seed=4)
        UT, UC, U0, U1, U2 = k.factors
        wt = (UT * k.weights).t().contiguous()
        args = (x, UC.contiguous(), U0.contiguous(), U1.contiguous(), U2.contiguous(), wt)
        with torch.no_grad():
            got = mod.cp_fused_forward(*args).movedim(-1, 1)
            ref = conv(x, k, padding=1)
            print("rel err", float((got - ref).abs().max() / ref.abs().max()))
            layer = tltorch.FactorizedConv(c, c, 3, order=3, rank=c, factorization="cp", implementation="factorized", padding=1, bias=False)
            planes = x.shape[2]
            a_buf, o_buf, out_buf = torch.empty(1024, c), torch.randn(1024, c), torch.empty(1, planes, 32, 32, c)

            def per_plane_gemms():  # the kernel's 2 x 16 GEMMs alone, through torch.mm
                for d in range(planes):
                    torch.mm(x[0, :, d].reshape(c, 1024).t(), args[1], out=a_buf)
                    torch.mm(o_buf, wt, out=out_buf[0, d].view(1024, c))
            r = measure_many({"tltorch": lambda: layer(x), "auto": lambda: conv(x, k, padding=1),
                              "cpp fused": lambda: mod.cp_fused_forward(*args),
                              "its GEMMs alone": per_plane_gemms}, repeat=21)
        for n, t in r.items(): print(f"C={c} {n:10s} {t['median_ms']:7.2f} ms  tltorch/this {r['tltorch']['median_ms']/t['median_ms']:.2f}")
