// A 3-D CP (Kruskal) convolution on CPU, run plane by plane along spatial mode 0.
//
// For each input plane along mode 0 and each output row of it: the GEMM C -> R (reading the
// caller's rows in place) and the mode-2 depthwise pass of the input rows that row's mode-1
// taps read, into a ring of a few rows, then the mode-1 pass into a ring of (K0 - 1) *
// dilation0 + 1 planes; every output plane whose inputs are all in that ring is then the
// mode-0 depthwise pass over it and the GEMM R -> T straight into the output, block by block
// (as are the GEMM C -> R and the mode-2 pass). Below one image per thread, the threads of one
// parallel region share each image by output rows, each running the whole chain for its rows
// (recomputing the one or two input rows its neighbour's taps also read): no barrier. Planes of
// fewer output rows than threads (1-D and 2-D convs) are shared by output planes instead. With
// more images, each thread runs whole images. The GEMMs are the kernel's own
// (AVX-512 register tiles, float32 and float64; BLAS without AVX-512).
// Nothing activation-sized but the output is written to memory: this is what makes it faster
// than the unfused chain once the R-channel intermediates leave the cache (docs/benchmarks.md).
// The backward (stride 1) recomputes the intermediates plane by plane the same way.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
// the depthwise passes in vector registers (taps_block); without, portable loops
#define TC_VECTOR_TAPS 1
#endif

#include <algorithm>
#include <array>
#include <atomic>
#include <exception>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

struct Axis {
  int64_t in, out, k, stride, pad_lo, dil;
  int64_t src(int64_t o, int64_t tap) const { return o * stride - pad_lo + tap * dil; }
};

#if defined(__AVX512F__)
// one 512-bit register of float (16) or double (8), with masked access for a column tail
template <typename scalar_t>
struct Lanes;
template <>
struct Lanes<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int L = 16, registers = 32;
  static M tail_mask(int64_t n) { return static_cast<M>((1u << n) - 1); }  // the first n < L lanes
  static M none() { return 0; }
  static V zero() { return _mm512_setzero_ps(); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(__mmask16 m, float* p, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
};
template <>
struct Lanes<double> {
  using V = __m512d;
  using M = __mmask16;
  static constexpr int L = 8, registers = 32;
  static M tail_mask(int64_t n) { return static_cast<M>((1u << n) - 1); }
  static M none() { return 0; }
  static V zero() { return _mm512_setzero_pd(); }
  static V load(const double* p) { return _mm512_loadu_pd(p); }
  static void store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static V load(__mmask16 m, const double* p) { return _mm512_maskz_loadu_pd(static_cast<__mmask8>(m), p); }
  static void store(__mmask16 m, double* p, V v) { _mm512_mask_storeu_pd(p, static_cast<__mmask8>(m), v); }
  static V set1(double v) { return _mm512_set1_pd(v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm512_mul_pd(a, b); }
};
#elif defined(TC_VECTOR_TAPS)
// one 256-bit register of float (8) or double (4) (AVX2: the pool's CPUs without AVX-512),
// masked by the sign bit of each lane of M
template <typename scalar_t>
struct Lanes;
template <>
struct Lanes<float> {
  using V = __m256;
  using M = __m256i;
  static constexpr int L = 8, registers = 16;
  static M tail_mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static M none() { return _mm256_setzero_si256(); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V load(M m, const float* p) { return _mm256_maskload_ps(p, m); }
  static void store(M m, float* p, V v) { _mm256_maskstore_ps(p, m, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
};
template <>
struct Lanes<double> {
  using V = __m256d;
  using M = __m256i;
  static constexpr int L = 4, registers = 16;
  static M tail_mask(int64_t n) { return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3)); }
  static M none() { return _mm256_setzero_si256(); }
  static V load(const double* p) { return _mm256_loadu_pd(p); }
  static void store(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V load(M m, const double* p) { return _mm256_maskload_pd(p, m); }
  static void store(M m, double* p, V v) { _mm256_maskstore_pd(p, m, v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_pd(a, b, c); }
  static V mul(V a, V b) { return _mm256_mul_pd(a, b); }
};
#endif

#if defined(TC_VECTOR_TAPS)
// one register at p, masked to `tail` where `masked` (the last register of a row of registers
// that ends in part of one): the passes and the GEMM tiles load and store their rows through these
template <typename X, typename T>
inline typename X::V load_reg(bool masked, typename X::M tail, const T* p) {
  return masked ? X::load(tail, p) : X::load(p);
}
template <typename X, typename T>
inline void store_reg(bool masked, typename X::M tail, T* p, typename X::V v) {
  if (masked)
    X::store(tail, p, v);
  else
    X::store(p, v);
}
#endif

// dst_i[r] = sum_t w_t[r] * src_t[i * src_step + r] for `count` positions i (dst_i = dst + i * dst_step),
// over the n taps whose source exists. Runs of positions share their taps, so the weights of a
// block of one vector register's width stay in registers over the whole run: per output vector
// that is n loads and n FMAs, where per-position calls spend more on finding the taps than on
// the sums (the depthwise passes at 16-64 channels, docs/benchmarks.md).
#if defined(TC_VECTOR_TAPS)
// NB registers of channels from r0 (the last one masked to `tail` where TAIL) over the positions:
// N x NB weights and NB sums in registers, so a position costs N loads and N FMAs per register
// and nothing else (the portable loops below kept their weights and sums on the stack, spilled:
// the passes ran at a fraction of the rate of their loads)
template <typename scalar_t, int N, int NB, bool TAIL>
inline void taps_block(scalar_t* dst, int64_t dst_step, const scalar_t* const* src, int64_t src_step,
                       const scalar_t* const* w, int64_t r0, int64_t count, typename Lanes<scalar_t>::M tail) {
  using X = Lanes<scalar_t>;
  constexpr int L = X::L;
  typename X::V wv[N][NB];
  const scalar_t* s[N];
  for (int t = 0; t < N; ++t) {
    s[t] = src[t] + r0;
    for (int b = 0; b < NB; ++b)
      wv[t][b] = load_reg<X>(TAIL && b == NB - 1, tail, w[t] + r0 + b * L);
  }
  scalar_t* d = dst + r0;
  for (int64_t i = 0; i < count; ++i, d += dst_step) {
    typename X::V acc[NB];
    for (int b = 0; b < NB; ++b)
      acc[b] = X::mul(wv[0][b], load_reg<X>(TAIL && b == NB - 1, tail, s[0] + b * L));
    for (int t = 1; t < N; ++t)
      for (int b = 0; b < NB; ++b)
        acc[b] = X::fma(wv[t][b], load_reg<X>(TAIL && b == NB - 1, tail, s[t] + b * L), acc[b]);
    for (int b = 0; b < NB; ++b) store_reg<X>(TAIL && b == NB - 1, tail, d + b * L, acc[b]);
    for (int t = 0; t < N; ++t) s[t] += src_step;
  }
}

// the last `regs` (at most NB) registers of channels as one block, the last one masked where `tail`
template <typename scalar_t, int N, int NB>
inline void taps_rest(scalar_t* dst, int64_t dst_step, const scalar_t* const* src, int64_t src_step,
                      const scalar_t* const* w, int64_t r0, int64_t count, int regs, bool tail,
                      typename Lanes<scalar_t>::M mask) {
  if constexpr (NB > 0) {
    if (regs < NB) return taps_rest<scalar_t, N, NB - 1>(dst, dst_step, src, src_step, w, r0, count, regs, tail, mask);
    if (tail)
      taps_block<scalar_t, N, NB, true>(dst, dst_step, src, src_step, w, r0, count, mask);
    else
      taps_block<scalar_t, N, NB, false>(dst, dst_step, src, src_step, w, r0, count, mask);
  }
}

template <typename scalar_t, int N>
inline void taps_run_n(scalar_t* __restrict__ dst, int64_t dst_step, const scalar_t* const* src, int64_t src_step,
                       const scalar_t* const* w, int64_t R, int64_t count) {
  using X = Lanes<scalar_t>;
  constexpr int64_t L = X::L;
  // registers of channels per block: N x NB weights and NB sums fit the register file
  constexpr int NB = X::registers >= 32 ? (N <= 5 ? 4 : 3) : (N <= 5 ? 2 : 1);
  int64_t r0 = 0;
  for (; r0 + NB * L <= R; r0 += NB * L)
    taps_block<scalar_t, N, NB, false>(dst, dst_step, src, src_step, w, r0, count, X::none());
  // the channels left (fewer than NB registers) as one block: separate one-register blocks
  // would each run one chain of dependent FMAs per position
  const int64_t rest = R - r0, part = rest % L;  // channels left; of them, past the last full register
  if (rest > 0)
    taps_rest<scalar_t, N, NB>(dst, dst_step, src, src_step, w, r0, count, static_cast<int>((rest + L - 1) / L),
                               part != 0, part != 0 ? X::tail_mask(part) : X::none());
}
#else
template <typename scalar_t, int N>
inline void taps_run_n(scalar_t* __restrict__ dst, int64_t dst_step, const scalar_t* const* src, int64_t src_step,
                       const scalar_t* const* w, int64_t R, int64_t count) {
  constexpr int64_t V = 64 / sizeof(scalar_t);  // one 512-bit register (two 256-bit ones)
  int64_t r0 = 0;
  for (; r0 + V <= R; r0 += V) {
    scalar_t wv[N][V];
    for (int t = 0; t < N; ++t)
      for (int64_t v = 0; v < V; ++v) wv[t][v] = w[t][r0 + v];
    for (int64_t i = 0; i < count; ++i) {
      scalar_t* __restrict__ d = dst + i * dst_step + r0;
      const int64_t off = i * src_step + r0;
      scalar_t acc[V];
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) acc[v] = wv[0][v] * src[0][off + v];
      for (int t = 1; t < N; ++t) {
#pragma omp simd
        for (int64_t v = 0; v < V; ++v) acc[v] += wv[t][v] * src[t][off + v];
      }
#pragma omp simd
      for (int64_t v = 0; v < V; ++v) d[v] = acc[v];
    }
  }
  if (r0 < R)  // the channels past the last full register
    for (int64_t i = 0; i < count; ++i) {
      scalar_t* __restrict__ d = dst + i * dst_step;
      const int64_t off = i * src_step;
      for (int64_t r = r0; r < R; ++r) {
        scalar_t acc = w[0][r] * src[0][off + r];
        for (int t = 1; t < N; ++t) acc += w[t][r] * src[t][off + r];
        d[r] = acc;
      }
    }
}
#endif

template <typename scalar_t>
inline void taps_run(scalar_t* dst, int64_t dst_step, const scalar_t* const* src, int64_t src_step,
                     const scalar_t* const* w, int n, int64_t R, int64_t count) {
  switch (n) {
    case 0:
      for (int64_t i = 0; i < count; ++i) std::fill(dst + i * dst_step, dst + i * dst_step + R, scalar_t(0));
      return;
    case 1: return taps_run_n<scalar_t, 1>(dst, dst_step, src, src_step, w, R, count);
    case 2: return taps_run_n<scalar_t, 2>(dst, dst_step, src, src_step, w, R, count);
    case 3: return taps_run_n<scalar_t, 3>(dst, dst_step, src, src_step, w, R, count);
    case 4: return taps_run_n<scalar_t, 4>(dst, dst_step, src, src_step, w, R, count);
    case 5: return taps_run_n<scalar_t, 5>(dst, dst_step, src, src_step, w, R, count);
    case 6: return taps_run_n<scalar_t, 6>(dst, dst_step, src, src_step, w, R, count);
    case 7: return taps_run_n<scalar_t, 7>(dst, dst_step, src, src_step, w, R, count);
    default: {  // long kernels: the first taps in registers, the rest accumulated
      taps_run_n<scalar_t, 7>(dst, dst_step, src, src_step, w, R, count);
      for (int t0 = 7; t0 < n; ++t0)
        for (int64_t i = 0; i < count; ++i) {
          scalar_t* __restrict__ d = dst + i * dst_step;
          const scalar_t* __restrict__ s = src[t0] + i * src_step;
          const scalar_t* __restrict__ c = w[t0];
#pragma omp simd
          for (int64_t r = 0; r < R; ++r) d[r] += s[r] * c[r];
        }
    }
  }
}

// dst[r] = sum_t w_t[r] * src_t[r]: one position
template <typename scalar_t>
inline void tap_sum(scalar_t* dst, const scalar_t* const* src, const scalar_t* const* w, int n, int64_t R) {
  taps_run(dst, 0, src, 0, w, n, R, 1);
}

// ---- the chain's GEMMs ----------------------------------------------------------------------------
#if defined(__AVX512F__)
// c[p, n] = sum_k a[k * sk + p * sp] * b[k * ldb + n]: MR rows of c at a time in registers, a
// broadcast from a, b one row of NV registers per k (the last one masked to `tail` where TAIL:
// a mask on every load ran the GEMMs at half rate). Its shapes
// (K, N of 16-128, a plane of rows per call) are narrow for BLAS: with it the chain took
// 0.75-0.89x the time at batch 1 (benchmarks/chain_ab.py, docs/benchmarks.md), it reads a
// channels-first plane in place (sp = 1), with no transpose, and it takes no tensor and no
// dispatch, so a call on a thread's few rows costs little beyond its multiply-adds.
template <typename scalar_t, int MR, int NV, bool TAIL>
inline void gemm_tile(const scalar_t* a, int64_t sk, int64_t sp, const scalar_t* b, int64_t ldb, scalar_t* c,
                      int64_t ldc, int64_t K, __mmask16 tail) {
  using X = Lanes<scalar_t>;
  constexpr int L = X::L;
  typename X::V acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = X::zero();
  for (int64_t k = 0; k < K; ++k) {
    typename X::V bk[NV];
    for (int v = 0; v < NV; ++v)
      bk[v] = load_reg<X>(TAIL && v == NV - 1, tail, b + k * ldb + L * v);
    const scalar_t* ak = a + k * sk;
    for (int i = 0; i < MR; ++i) {
      const auto ai = X::set1(ak[i * sp]);
      for (int v = 0; v < NV; ++v) acc[i][v] = X::fma(ai, bk[v], acc[i][v]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store_reg<X>(TAIL && v == NV - 1, tail, c + i * ldc + L * v, acc[i][v]);
}

// rows [0, P) of c, NV registers of columns: as many accumulators as registers allow
template <typename scalar_t, int NV, bool TAIL>
void gemm_rows(const scalar_t* a, int64_t sk, int64_t sp, const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc,
               int64_t P, int64_t K, __mmask16 tail) {
  constexpr int MR = NV == 1 ? 14 : NV == 2 ? 12 : NV == 3 ? 8 : 6;
  int64_t p = 0;
  for (; p + MR <= P; p += MR)
    gemm_tile<scalar_t, MR, NV, TAIL>(a + p * sp, sk, sp, b, ldb, c + p * ldc, ldc, K, tail);
  // the rows left in tiles of 4 and 2 before single rows: a one-row tile has NV chains of FMAs,
  // too few to hide their latency, and every block of the fused passes ends in such rows
  for (; p + 4 <= P; p += 4) gemm_tile<scalar_t, 4, NV, TAIL>(a + p * sp, sk, sp, b, ldb, c + p * ldc, ldc, K, tail);
  for (; p + 2 <= P; p += 2) gemm_tile<scalar_t, 2, NV, TAIL>(a + p * sp, sk, sp, b, ldb, c + p * ldc, ldc, K, tail);
  for (; p < P; ++p) gemm_tile<scalar_t, 1, NV, TAIL>(a + p * sp, sk, sp, b, ldb, c + p * ldc, ldc, K, tail);
}

// one block of NV registers of columns (nv of them at run time, the last masked where TAIL)
template <typename scalar_t, bool TAIL>
void gemm_block(int nv, const scalar_t* a, int64_t sk, int64_t sp, const scalar_t* b, int64_t ldb, scalar_t* c,
                int64_t ldc, int64_t P, int64_t K, __mmask16 tail) {
  switch (nv) {
    case 1: gemm_rows<scalar_t, 1, TAIL>(a, sk, sp, b, ldb, c, ldc, P, K, tail); break;
    case 2: gemm_rows<scalar_t, 2, TAIL>(a, sk, sp, b, ldb, c, ldc, P, K, tail); break;
    case 3: gemm_rows<scalar_t, 3, TAIL>(a, sk, sp, b, ldb, c, ldc, P, K, tail); break;
    default: gemm_rows<scalar_t, 4, TAIL>(a, sk, sp, b, ldb, c, ldc, P, K, tail); break;
  }
}

// c (P, N) row-major = the rows above, any N (columns in blocks of up to four registers)
template <typename scalar_t>
void gemm_own(const scalar_t* a, int64_t sk, int64_t sp, const scalar_t* b, scalar_t* c, int64_t P, int64_t K,
              int64_t N, int64_t ldc) {
  constexpr int L = Lanes<scalar_t>::L;
  at::parallel_for(0, P, 256, [&](int64_t p0, int64_t p1) {
    for (int64_t n0 = 0; n0 < N; n0 += 4 * L) {
      const int64_t width = std::min<int64_t>(4 * L, N - n0);
      const int rest = static_cast<int>(width % L), nv = static_cast<int>((width + L - 1) / L);
      const __mmask16 tail = rest ? __mmask16((1u << rest) - 1) : __mmask16(0xFFFF);
      if (rest)
        gemm_block<scalar_t, true>(nv, a + p0 * sp, sk, sp, b + n0, N, c + p0 * ldc + n0, ldc, p1 - p0, K, tail);
      else
        gemm_block<scalar_t, false>(nv, a + p0 * sp, sk, sp, b + n0, N, c + p0 * ldc + n0, ldc, p1 - p0, K, tail);
    }
  });
}
constexpr bool kOwnGemm = true;
#else
constexpr bool kOwnGemm = false;
template <typename scalar_t>
inline void gemm_own(const scalar_t*, int64_t, int64_t, const scalar_t*, scalar_t*, int64_t, int64_t, int64_t,
                     int64_t) {}
#endif

// whether a GEMM with weights w can run through gemm_own: float32 or float64, contiguous w
// (and AVX-512; else BLAS)
inline bool own_gemm_weights(const torch::Tensor& w) {
  return kOwnGemm && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble) && w.is_contiguous();
}

// whether out (P, N) = rows @ w (K, N) runs through gemm_own: those weights, a contiguous out
inline bool own_gemm(const torch::Tensor& w, const torch::Tensor& out) {
  return own_gemm_weights(w) && out.is_contiguous();
}

// out (P, N) = rows (P, K) @ w (K, N), the rows of out any stride apart: the GEMM R -> T of a
// batch of positions, and the backward's products with the transposed factors
template <typename scalar_t>
void gemm_into(torch::Tensor out, const torch::Tensor& rows, const torch::Tensor& w) {
  if (own_gemm_weights(w) && out.stride(1) == 1 && rows.stride(1) == 1) {
    gemm_own(rows.data_ptr<scalar_t>(), 1, rows.stride(0), w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
             rows.size(0), rows.size(1), w.size(1), out.stride(0));
    return;
  }
  at::mm_out(out, rows, w);
}

// the GEMM C -> R of rows xp (C, P) into out (P, R), its rows any stride apart: gemm_own reads
// xp in place in either layout; else BLAS
template <typename scalar_t>
void gemm_c_to_r(const torch::Tensor& xp, const torch::Tensor& uc, torch::Tensor out) {
  if (own_gemm_weights(uc) && out.stride(1) == 1) {
    gemm_own(xp.data_ptr<scalar_t>(), xp.stride(0), xp.stride(1), uc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
             xp.size(1), xp.size(0), uc.size(1), out.stride(0));
    return;
  }
  at::mm_out(out, xp.t(), uc);
}

// the last input plane each output plane needs along mode 0 (-1: none, all of its taps are padding)
inline std::vector<int64_t> last_needed_planes(const Axis& a0) {
  std::vector<int64_t> last(a0.out, -1);
  for (int64_t e = 0; e < a0.out; ++e)
    for (int64_t i = 0; i < a0.k; ++i) {
      const int64_t s = a0.src(e, i);
      if (s >= 0 && s < a0.in) last[e] = s;
    }
  return last;
}

// rows of `row_positions` positions per block of a fused pair of passes (the GEMM C -> R and the
// mode-2 pass; the mode-0 pass and the GEMM R -> T): about 24 KiB of the R-channel rows, so that
// they stay in L1 (32-48 KiB) between the pass that writes them and the one that reads them,
// and at least 2^18 multiply-adds of the GEMM, so that its calls and edge tiles stay a small part
// of a block (at 16 channels blocks sized by bytes alone were too small for that; the
// comparison is in the commit log).
inline int64_t fused_block(int64_t row_positions, int64_t R, int64_t macs_per_position, size_t itemsize) {
  const int64_t by_bytes = (24 << 10) / std::max<int64_t>(1, row_positions * R * static_cast<int64_t>(itemsize));
  const int64_t by_macs = (1 << 18) / std::max<int64_t>(1, row_positions * macs_per_position);
  return std::max<int64_t>({1, by_bytes, by_macs});
}

// rows of positions per parallel task: enough work per task to amortise the dispatch
inline int64_t grain(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row)); }

// the input positions [first, last] along an axis that the outputs [o0, o1) read (first > last:
// none, all their taps fall in the padding)
inline std::pair<int64_t, int64_t> sources_read(const Axis& a, int64_t o0, int64_t o1) {
  int64_t first = a.in, last = -1;
  for (int64_t o = o0; o < o1; ++o)
    for (int64_t t = 0; t < a.k; ++t) {
      const int64_t s = a.src(o, t);
      if (s >= 0 && s < a.in) first = std::min(first, s), last = std::max(last, s);
    }
  return {first, last};
}

// the output positions [lo, hi) along an axis whose taps all lie inside the input (an interval:
// the first and last tap's sources both grow with the position)
inline std::pair<int64_t, int64_t> interior(const Axis& a) {
  auto inside = [&](int64_t o) { return a.src(o, 0) >= 0 && a.src(o, a.k - 1) < a.in; };
  int64_t lo = 0, hi = a.out;
  while (lo < hi && !inside(lo)) ++lo;
  while (hi > lo && !inside(hi - 1)) --hi;
  return {lo, hi};
}

// mode 2 (W) depthwise pass over `rows` rows: (rows, W, R) -> (rows, Wo, R), positions ld apart
// (ld >= R)
template <typename scalar_t>
void mode2_pass(const scalar_t* in, scalar_t* out, int64_t rows, const Axis& a2, const scalar_t* w2, int64_t R,
                int64_t ld) {
  const int64_t W = a2.in, Wo = a2.out;
  const auto [lo, hi] = interior(a2);
  at::parallel_for(0, rows, grain(Wo * R * a2.k), [&](int64_t r0, int64_t r1) {
    const scalar_t* src[64];
    const scalar_t* w[64];
    for (int64_t row = r0; row < r1; ++row) {
      const scalar_t* in_row = in + row * W * ld;
      scalar_t* out_row = out + row * Wo * ld;
      auto edge = [&](int64_t wo) {
        int n = 0;
        for (int64_t k = 0; k < a2.k; ++k) {
          const int64_t s = a2.src(wo, k);
          if (s < 0 || s >= W) continue;
          src[n] = in_row + s * ld;
          w[n++] = w2 + k * R;
        }
        tap_sum(out_row + wo * ld, src, w, n, R);
      };
      for (int64_t wo = 0; wo < lo; ++wo) edge(wo);
      if (hi > lo) {
        for (int64_t k = 0; k < a2.k; ++k) {
          src[k] = in_row + a2.src(lo, k) * ld;
          w[k] = w2 + k * R;
        }
        taps_run(out_row + lo * ld, ld, src, a2.stride * ld, w, static_cast<int>(a2.k), R, hi - lo);
      }
      for (int64_t wo = std::max(hi, lo); wo < Wo; ++wo) edge(wo);
    }
  });
}

// mode 1 (H) depthwise pass over the output positions [p0, p1) of each of `planes` planes:
// (planes, H, Wo, R) -> (Ho, Wo, R) each, plane q written to out_of(q)
template <typename scalar_t, typename OutOf>
void mode1_pass(const scalar_t* in, int64_t planes, int64_t p0, int64_t p1, const OutOf& out_of, int64_t Wo,
                const Axis& a1, const scalar_t* w1, int64_t R) {
  const int64_t H = a1.in;
  if (p1 <= p0) return;
  const int64_t h_first = p0 / Wo, rows = (p1 - 1) / Wo - h_first + 1;  // output rows the range touches
  at::parallel_for(0, planes * rows, grain(Wo * R * a1.k), [&](int64_t r0, int64_t r1) {
    const scalar_t* src[64];
    const scalar_t* w[64];
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t q = row / rows, ho = h_first + row % rows;
      const int64_t lo = std::max(p0, ho * Wo) - ho * Wo, hi = std::min(p1, (ho + 1) * Wo) - ho * Wo;
      const scalar_t* plane_in = in + q * H * Wo * R + lo * R;
      scalar_t* dst = out_of(q) + (ho * Wo + lo) * R;
      int n = 0;
      for (int64_t j = 0; j < a1.k; ++j) {
        const int64_t s = a1.src(ho, j);
        if (s < 0 || s >= H) continue;
        src[n] = plane_in + s * Wo * R;
        w[n++] = w1 + j * R;
      }
      taps_run(dst, R, src, R, w, n, R, hi - lo);
    }
  });
}

// grad mode and inference mode are thread-local: worker threads would record the BLAS calls for
// autograd, or refuse to write into the caller's inference tensors
struct WorkerModes {
  explicit WorkerModes(bool inference) : inference_mode(inference) {}
  c10::InferenceMode inference_mode;
  at::NoGradGuard no_grad;
};

// With at least one image per thread, each thread runs whole images with its own buffers (the
// inner parallel loops and BLAS calls then run on the calling thread). Otherwise the threads
// share each image by output rows.
template <typename F>
inline void over_images(int64_t B, const F& body) {
  const int64_t nt = at::get_num_threads();
  const bool inference = c10::InferenceMode::is_enabled();
  auto guarded = [&](int64_t b0, int64_t b1) {
    WorkerModes modes(inference);
    body(b0, b1);
  };
  if (nt > 1 && B >= nt)
    at::parallel_for(0, B, 1, guarded);
  else
    guarded(0, B);
}

// an exception of one thread of a team, kept until the region ends
struct TeamError {
  std::atomic<bool> failed{false};
  std::exception_ptr error;  // the first exception of any thread, rethrown after the region
};

// The threads that share one image's chain, one parallel region per call: each takes its own
// output rows of every plane (see chain_image). The passes' own parallel loops and GEMMs run
// on the calling thread inside the region.
struct Team {
  int64_t id = 0, size = 1;
  TeamError* shared = nullptr;  // none for a thread alone
  std::pair<int64_t, int64_t> share(int64_t n) const { return {n * id / size, n * (id + 1) / size}; }
  // body() for this thread's share. In a team an exception is kept (an exception may not leave
  // a parallel region) and rethrown after it; a thread runs no share once any has failed.
  template <typename F>
  void run(const F& body) const {
    if (!shared) {
      body();
      return;
    }
    if (shared->failed.load(std::memory_order_relaxed)) return;
    try {
      body();
    } catch (...) {
      if (!shared->failed.exchange(true)) shared->error = std::current_exception();
    }
  }
};

// whether the GEMM C -> R reads x's rows of W positions in place (gemm_own): positions one
// stride apart along each row
inline bool reads_in_place(const torch::Tensor& x, const torch::Tensor& uc) {
  return own_gemm_weights(uc) && x.stride(3) == x.size(4) * x.stride(4);
}

template <typename scalar_t>
struct ChainScratch {
  // per thread of a team: a_rows rows of the GEMM C -> R, a ring of slots1 rows of mode-2 output;
  // shared: the ring of mode-1 output planes, the mode-0 output rows (per thread by planes)
  torch::Tensor a, t1, ring, o;
  int64_t a_rows = 1, slots1 = 1;
  int64_t ld = 1;  // elements from one position's R channels to the next's in all four
  // the team shares an image by output planes, not rows: a plane of fewer rows than threads
  // (every 1-D and 2-D conv, whose planes are rows of one position) left all but one idle
  bool by_planes = false;
};

// positions' rows of R channels in the scratch start a whole vector register apart, so that no
// load or store of the passes and GEMMs spans two cache lines (R = 200 floats put every other
// row's registers across a line)
template <typename scalar_t>
inline int64_t rank_stride(int64_t R) {
#if defined(TC_VECTOR_TAPS)
  constexpr int64_t L = Lanes<scalar_t>::L;
  return (R + L - 1) / L * L;
#else
  return R;
#endif
}

// Scratch kept by each thread from call to call, grown where a call needs more: allocated per call,
// a layer-sized ring and rows took fresh pages every call (glibc hands large blocks back to the
// kernel, and the arenas of pool threads trim their free tops), which cost more than the passes
// that write them. Buffer `slot` of this thread, first `numel` elements; normal tensors even
// inside torch.inference_mode (they outlive the call). release_kept_scratch frees this thread's.
constexpr int kKeptSlots = 4;
template <typename scalar_t>
std::array<torch::Tensor, kKeptSlots>& kept_scratch_slots() {
  static thread_local std::array<torch::Tensor, kKeptSlots> kept;
  return kept;
}

template <typename scalar_t>
torch::Tensor kept_scratch(int slot, at::IntArrayRef shape, const torch::TensorOptions& opts) {
  auto& buf = kept_scratch_slots<scalar_t>()[slot];
  const int64_t numel = c10::multiply_integers(shape);
  if (!buf.defined() || buf.numel() < numel) {
    buf = torch::Tensor();  // the smaller one goes before the larger one is made
    c10::InferenceMode normal(false);  // BLAS builds write it through at::mm_out
    buf = torch::empty({numel}, opts);
  }
  return buf.narrow(0, 0, numel).view(shape);
}

int64_t release_kept_scratch() {
  int64_t freed = 0;
  for (auto* slots : {&kept_scratch_slots<float>(), &kept_scratch_slots<double>()})
    for (auto& buf : *slots) {
      if (buf.defined()) freed += buf.numel() * buf.element_size();
      buf = torch::Tensor();
    }
  return freed;
}

template <typename scalar_t>
ChainScratch<scalar_t> chain_scratch(const torch::Tensor& x, const torch::Tensor& uc, int64_t slots, const Axis& a1,
                                     const Axis& a2, int64_t team_size) {
  const int64_t C = x.size(1), R = uc.size(1), H = a1.in, W = a2.in, Ho = a1.out, Wo = a2.out;
  const auto opts = x.options();
  ChainScratch<scalar_t> s;
  const int64_t ld = s.ld = rank_stride<scalar_t>(R);
  // rows of W positions per GEMM C -> R (BLAS, with its tensor views, takes a plane's rows at once)
  s.a_rows = std::min(H, reads_in_place(x, uc) ? fused_block(W, R, C * R, sizeof(scalar_t)) : H);
  // the mode-1 taps of one output row span (K1 - 1) * dilation1 + 1 input rows, and a block of
  // GEMM rows may run a_rows - 1 rows past its last
  s.slots1 = std::min(H, (a1.k - 1) * a1.dil + s.a_rows);
  s.a = kept_scratch<scalar_t>(0, {team_size * s.a_rows * W, ld}, opts);
  s.t1 = kept_scratch<scalar_t>(1, {team_size * s.slots1 * Wo, ld}, opts);
  s.by_planes = team_size > 1 && Ho < team_size;
  const int64_t rings = s.by_planes ? team_size : 1;
  s.ring = kept_scratch<scalar_t>(2, {rings * slots, Ho * Wo, ld}, opts);
  // each thread's rows: see oq
  s.o = kept_scratch<scalar_t>(3, {rings * Ho * Wo + at::get_num_threads(), ld}, opts);
  return s;
}

// image b's chain, this thread's share of it
template <typename scalar_t>
void chain_image(const torch::Tensor& x, const torch::Tensor& uc, const torch::Tensor& u0, const torch::Tensor& u1,
                 const torch::Tensor& u2, const torch::Tensor& wt, torch::Tensor& out, const Axis& a0,
                 const Axis& a1, const Axis& a2, int64_t slots, const std::vector<int64_t>& last_needed,
                 ChainScratch<scalar_t>& s, int64_t b, const Team& team) {
  const int64_t C = x.size(1), R = uc.size(1), T = wt.size(1);
  const int64_t H = a1.in, W = a2.in, Ho = a1.out, Wo = a2.out, K0 = a0.k;
  const scalar_t* w0 = u0.data_ptr<scalar_t>();
  const scalar_t* w1 = u1.data_ptr<scalar_t>();
  const scalar_t* w2 = u2.data_ptr<scalar_t>();
  const int64_t ld = s.ld, positions = Ho * Wo, plane = positions * ld;
  // This thread's output rows [ho0, ho1) of every plane, and the whole chain for them: the GEMM
  // C -> R and the mode-2 pass of the input rows their mode-1 taps read (where a neighbouring
  // thread's rows reach its own, those rows are computed by both), the mode-1 pass into the
  // ring, the mode-0 pass and the GEMM R -> T. No thread reads what another wrote, so the team
  // needs no barrier, and the mode-2 output lives in a ring of a few rows in this core's cache
  // instead of a whole plane (which left the L2 cache between the two passes).
  // (or, by planes, all rows of its own output planes [e0, e1), with its own ring and rows of o)
  const auto hs = s.by_planes ? std::pair<int64_t, int64_t>{0, Ho} : team.share(Ho);
  const auto es = s.by_planes ? team.share(a0.out) : std::pair<int64_t, int64_t>{0, a0.out};
  const int64_t ho0 = hs.first, ho1 = hs.second, p0 = ho0 * Wo, p1 = ho1 * Wo, e0 = es.first, e1 = es.second;
  const int64_t a_rows = s.a_rows, slots1 = s.slots1;
  scalar_t* pa = s.a.template data_ptr<scalar_t>() + team.id * a_rows * W * ld;
  scalar_t* t1 = s.t1.template data_ptr<scalar_t>() + team.id * slots1 * Wo * ld;
  scalar_t* pring = s.ring.template data_ptr<scalar_t>() + (s.by_planes ? team.id * slots * plane : 0);
  const int64_t o_row = s.by_planes ? team.id * positions : p0 + team.id;  // this thread's rows of o
  scalar_t* oq = s.o.template data_ptr<scalar_t>() + o_row * ld;
  const bool own_in = reads_in_place(x, uc);
  const bool own_out = own_gemm(wt, out);
  // positions per block of the fused mode-0 pass + GEMM R -> T
  const int64_t o_block = own_out ? fused_block(1, R, R * T, sizeof(scalar_t)) : positions;
  // the input rows this thread's output rows read: [first_row, last_row] (none if last_row < 0).
  // With dilation a later output row may read a row before an earlier one's first (where the
  // earlier one's first tap fell in the padding): rows are computed in order from first_row.
  const auto rows_read = sources_read(a1, ho0, ho1);
  const int64_t first_row = rows_read.first, last_row = rows_read.second;
  // the input planes this thread's output planes read: [d_first, d_last]
  const auto planes_read = sources_read(a0, e0, e1);
  const int64_t d_first = planes_read.first, d_last = planes_read.second;
  int64_t next_out = e0;
  auto emit_ready = [&](int64_t have) {  // output planes whose input planes are all in the ring
    while (next_out < e1 && last_needed[next_out] <= have) {
      const int64_t d = next_out++;
      if (p1 <= p0) continue;
      const scalar_t* src[64];
      const scalar_t* w[64];
      int n = 0;
      for (int64_t i = 0; i < K0; ++i) {
        const int64_t s_ = a0.src(d, i);
        if (s_ < 0 || s_ >= a0.in) continue;
        src[n] = pring + (s_ % slots) * plane;
        w[n++] = w0 + i * R;
      }
      // block by block: the mode-0 pass's rows are still in L1 when the GEMM reads them
      for (int64_t qb = p0; qb < p1; qb += o_block) {
        const int64_t qe = std::min(p1, qb + o_block);
        const scalar_t* at[64];
        for (int i = 0; i < n; ++i) at[i] = src[i] + qb * ld;
        taps_run(oq, ld, at, ld, w, n, R, qe - qb);
        if (own_out) {  // pointers only: tensor views per block cost more than a small block's work
          scalar_t* rows_out = out.data_ptr<scalar_t>() + ((b * a0.out + d) * positions + qb) * T;
          gemm_own(oq, 1, ld, wt.data_ptr<scalar_t>(), rows_out, qe - qb, R, T, T);
        } else {
          gemm_into<scalar_t>(out[b][d].view({positions, T}).narrow(0, qb, qe - qb),
                              s.o.narrow(0, o_row, qe - qb).narrow(1, 0, R), wt);
        }
      }
    }
  };
  // input rows [r, r + nb) of plane d: the GEMM C -> R into this thread's rows of a, the mode-2
  // pass of each into its slot of the ring t1
  auto mode2_rows = [&](int64_t d, int64_t r, int64_t nb) {
    if (own_in) {  // positions (h, w) of a plane one stride apart: read in place
      gemm_own(x.data_ptr<scalar_t>() + b * x.stride(0) + d * x.stride(2) + r * x.stride(3), x.stride(1), x.stride(4),
               uc.data_ptr<scalar_t>(), pa, nb * W, C, R, ld);
    } else {
      auto xp = x[b].select(1, d).narrow(1, r, nb).reshape({C, nb * W});
      gemm_c_to_r<scalar_t>(xp, uc, s.a.narrow(0, team.id * a_rows * W, nb * W).narrow(1, 0, R));
    }
    for (int64_t i = 0; i < nb; ++i) mode2_pass(pa + i * W * ld, t1 + ((r + i) % slots1) * Wo * ld, 1, a2, w2, R, ld);
  };
  team.run([&] {
    emit_ready(-1);
    for (int64_t d = d_first; d <= d_last; ++d) {
      scalar_t* dst_plane = pring + (d % slots) * plane;
      int64_t next = first_row;  // the first input row not yet in the ring t1
      for (int64_t ho = ho0; ho < ho1; ++ho) {
        const scalar_t* src[64];
        const scalar_t* w[64];
        int n = 0;
        int64_t last = -1;
        for (int64_t j = 0; j < a1.k; ++j) {
          const int64_t r = a1.src(ho, j);
          if (r < 0 || r >= H) continue;
          last = std::max(last, r);
          src[n] = t1 + (r % slots1) * Wo * ld;
          w[n++] = w1 + j * R;
        }
        // the rows up to this output row's last tap, a block at a time (a block may run ahead:
        // slots1 leaves room for it)
        while (next <= last) {
          const int64_t nb = std::min(a_rows, last_row + 1 - next);
          mode2_rows(d, next, nb);
          next += nb;
        }
        taps_run(dst_plane + ho * Wo * ld, ld, src, ld, w, n, R, Wo);  // n = 0: zeros
      }
      emit_ready(d);
    }
    emit_ready(a0.in);
  });
}

template <typename scalar_t>
void run(const torch::Tensor& x, const torch::Tensor& uc, const torch::Tensor& u0, const torch::Tensor& u1,
         const torch::Tensor& u2, const torch::Tensor& wt, torch::Tensor& out, const Axis& a0, const Axis& a1,
         const Axis& a2) {
  const int64_t B = x.size(0);
  const int64_t span = (a0.k - 1) * a0.dil + 1;
  const int64_t slots = span;  // ring slots: the planes one output plane reads
  const std::vector<int64_t> last_needed = last_needed_planes(a0);
  const int64_t nt = at::get_num_threads();
  if (nt > 1 && B >= nt) {
    // With at least one image per thread, each thread runs whole images with its own buffers:
    // each core keeps its own rings in its own cache
    over_images(B, [&](int64_t b0, int64_t b1) {
      auto s = chain_scratch<scalar_t>(x, uc, slots, a1, a2, 1);
      for (int64_t b = b0; b < b1; ++b) chain_image(x, uc, u0, u1, u2, wt, out, a0, a1, a2, slots, last_needed, s, b, Team{});
    });
    return;
  }
  const bool alone = nt == 1 || at::in_parallel_region();
  auto s = chain_scratch<scalar_t>(x, uc, slots, a1, a2, alone ? 1 : nt);
  if (alone) {
    for (int64_t b = 0; b < B; ++b) chain_image(x, uc, u0, u1, u2, wt, out, a0, a1, a2, slots, last_needed, s, b, Team{});
    return;
  }
  const bool inference = c10::InferenceMode::is_enabled();
  TeamError shared;
#pragma omp parallel num_threads(nt)
  {
    Team team{omp_get_thread_num(), omp_get_num_threads(), &shared};
    WorkerModes modes(inference);
    for (int64_t b = 0; b < B; ++b) chain_image(x, uc, u0, u1, u2, wt, out, a0, a1, a2, slots, last_needed, s, b, team);
  }
  if (shared.error) std::rethrow_exception(shared.error);
}

}  // namespace

// x (B, C, D, H, W) any strides; uc (C, R); u0 (K0, R), u1 (K1, R), u2 (K2, R); wt (R, T) with lambda
// folded in. geometry: per spatial mode, output size, stride, low padding, dilation (high padding is
// implied by the output size). Returns (B, Do, Ho, Wo, T) contiguous: `out` where one is given (a
// buffer the caller reuses), else a new tensor.
torch::Tensor cp_chain_forward(torch::Tensor x, torch::Tensor uc, torch::Tensor u0, torch::Tensor u1,
                               torch::Tensor u2, torch::Tensor wt, std::vector<int64_t> out_size,
                               std::vector<int64_t> stride, std::vector<int64_t> pad_lo,
                               std::vector<int64_t> dilation, c10::optional<torch::Tensor> out_buffer) {
  TORCH_CHECK(x.dim() == 5, "x must be (B, C, D, H, W), got ", x.dim(), " dims");
  TORCH_CHECK(!x.is_cuda(), "cp_chain_forward runs on CPU tensors");
  TORCH_CHECK(out_size.size() == 3 && stride.size() == 3 && pad_lo.size() == 3 && dilation.size() == 3,
              "geometry vectors must have 3 entries");
  const torch::Tensor* fs[] = {&uc, &u0, &u1, &u2, &wt};
  for (auto f : fs) {
    TORCH_CHECK(f->dim() == 2 && f->is_contiguous(), "factors must be contiguous 2-D tensors");
    TORCH_CHECK(f->scalar_type() == x.scalar_type(), "factors must have x's dtype");
  }
  const int64_t R = uc.size(1);
  TORCH_CHECK(uc.size(0) == x.size(1), "uc has ", uc.size(0), " rows but x has ", x.size(1), " channels");
  TORCH_CHECK(u0.size(1) == R && u1.size(1) == R && u2.size(1) == R && wt.size(0) == R, "rank mismatch");
  TORCH_CHECK(u0.size(0) <= 64 && u1.size(0) <= 64 && u2.size(0) <= 64, "kernel sizes above 64 are not supported");
  Axis ax[3];
  const torch::Tensor* us[] = {&u0, &u1, &u2};
  for (int m = 0; m < 3; ++m) {
    ax[m] = Axis{x.size(2 + m), out_size[m], us[m]->size(0), stride[m], pad_lo[m], dilation[m]};
    TORCH_CHECK(ax[m].out >= 1 && ax[m].stride >= 1 && ax[m].dil >= 1 && ax[m].pad_lo >= 0, "bad geometry");
  }
  const std::vector<int64_t> out_shape{x.size(0), out_size[0], out_size[1], out_size[2], wt.size(1)};
  torch::Tensor out;
  if (out_buffer.has_value()) {
    out = *out_buffer;
    TORCH_CHECK(out.sizes() == c10::IntArrayRef(out_shape) && out.is_contiguous() &&
                    out.scalar_type() == x.scalar_type() && !out.is_cuda(),
                "out must be a contiguous CPU tensor of x's dtype and shape ", c10::IntArrayRef(out_shape),
                ", got ", out.sizes());
  } else {
    out = torch::empty(out_shape, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cp_chain_forward", [&] {
    run<scalar_t>(x, uc, u0, u1, u2, wt, out, ax[0], ax[1], ax[2]);
  });
  return out;
}


// The same from the CP factors as the kernel object holds them: lam (R,), ut (T, R), uc (C, R),
// u0..u2 (K_n, R), any strides. Lambda is folded into U_0 and U_T transposed here, in two
// loops over at most K0 x R and R x T values, where in Python the fold and the copies were
// five dispatched ops, a visible share of a call at small channel counts.
torch::Tensor cp_chain_forward_kruskal(torch::Tensor x, torch::Tensor lam, torch::Tensor ut, torch::Tensor uc,
                                       torch::Tensor u0, torch::Tensor u1, torch::Tensor u2,
                                       std::vector<int64_t> out_size, std::vector<int64_t> stride,
                                       std::vector<int64_t> pad_lo, std::vector<int64_t> dilation,
                                       c10::optional<torch::Tensor> out_buffer) {
  TORCH_CHECK(lam.dim() == 1 && ut.dim() == 2 && u0.dim() == 2 && ut.size(1) == lam.size(0) &&
                  u0.size(1) == lam.size(0),
              "lam must be (R,), ut (T, R) and u0 (K0, R)");
  TORCH_CHECK(lam.scalar_type() == x.scalar_type() && ut.scalar_type() == x.scalar_type() &&
                  u0.scalar_type() == x.scalar_type(),
              "factors must have x's dtype");
  const int64_t R = lam.size(0), T = ut.size(0), K0 = u0.size(0);
  auto u0l = torch::empty({K0, R}, x.options());
  auto wt = torch::empty({R, T}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cp_chain_fold", [&] {
    const auto l = lam.accessor<scalar_t, 1>();
    const auto a = u0.accessor<scalar_t, 2>();
    const auto b = ut.accessor<scalar_t, 2>();
    scalar_t* pu = u0l.data_ptr<scalar_t>();
    scalar_t* pw = wt.data_ptr<scalar_t>();
    for (int64_t i = 0; i < K0; ++i)
      for (int64_t r = 0; r < R; ++r) pu[i * R + r] = a[i][r] * l[r];
    for (int64_t t = 0; t < T; ++t)
      for (int64_t r = 0; r < R; ++r) pw[r * T + t] = b[t][r];
  });
  return cp_chain_forward(x, uc.contiguous(), u0l, u1.contiguous(), u2.contiguous(), wt, std::move(out_size),
                          std::move(stride), std::move(pad_lo), std::move(dilation), std::move(out_buffer));
}

// ---- backward (stride 1 in every mode) -----------------------------------------------------------
//
// Plane by plane again, recomputing the forward intermediates instead of keeping them. With
// g_o = gy Wt^T (the gradient at the mode-0 pass output), for each input plane d:
//   a, b, c            forward recompute (GEMM C -> R, mode-2 pass, mode-1 pass; c into a ring)
//   g_c = sum_i u0[i] g_o[d + p0 - i dl0]        (mode-0 pass transposed, g_o kept in a ring)
//   g_b = mode-1 pass transposed of g_c,  du1[j] += sum b(shifted by j) * g_c
//   g_a = mode-2 pass transposed of g_b,  du2[k] += sum a(shifted by k) * g_b
//   gx[d] = g_a Uc^T,  duc += X_d g_a
// and for every output plane e whose input planes are all in the ring: o_e (mode-0 pass over
// the ring), dwt += o_e^T gy_e, du0[i] += sum c[e - p0 + i dl0] * g_o[e].

namespace {

// acc[r] += src[r] * g[r]: one position's share of a tap's gradient
template <typename scalar_t>
inline void tap_dot(scalar_t* __restrict__ acc, const scalar_t* __restrict__ src, const scalar_t* __restrict__ g,
                    int64_t R) {
#pragma omp simd
  for (int64_t r = 0; r < R; ++r) acc[r] += src[r] * g[r];
}

template <typename scalar_t>
void run_backward(const torch::Tensor& x, const torch::Tensor& uc, const torch::Tensor& u0, const torch::Tensor& u1,
                  const torch::Tensor& u2, const torch::Tensor& wt, const torch::Tensor& gy, torch::Tensor& gx,
                  torch::Tensor& duc, torch::Tensor& du0, torch::Tensor& du1, torch::Tensor& du2, torch::Tensor& dwt,
                  const Axis& a0, const Axis& a1, const Axis& a2, bool need_gx) {
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t R = uc.size(1), T = wt.size(1);
  const int64_t H = a1.in, W = a2.in, Ho = a1.out, Wo = a2.out;
  const int64_t K0 = a0.k, K1 = a1.k, K2 = a2.k;
  const int64_t span = (K0 - 1) * a0.dil + 1;
  const int64_t P = H * W, Pm = H * Wo, Po = Ho * Wo;
  // per-thread partial sums of the tap gradients (each parallel region writes its thread's row)
  const auto opts = x.options();
  const int64_t nt = at::get_num_threads();
  auto part0 = torch::zeros({nt, K0 * R}, opts), part1 = torch::zeros({nt, K1 * R}, opts),
       part2 = torch::zeros({nt, K2 * R}, opts);
  scalar_t* pp0 = part0.data_ptr<scalar_t>();
  scalar_t* pp1 = part1.data_ptr<scalar_t>();
  scalar_t* pp2 = part2.data_ptr<scalar_t>();
  auto duc_part = torch::zeros({nt, C, R}, opts), dwt_part = torch::zeros({nt, R, T}, opts);

  // output planes by the step at which their input planes are all in the ring
  std::vector<std::vector<int64_t>> ready(a0.in);
  const std::vector<int64_t> last_needed = last_needed_planes(a0);
  for (int64_t e = 0; e < a0.out; ++e)
    if (last_needed[e] >= 0) ready[last_needed[e]].push_back(e);  // no input plane: no gradient
  const int64_t plane = Po * R;
  const auto wt_t = wt.t().contiguous();  // (T, R), (R, C): rows of the products below
  const auto uc_t = uc.t().contiguous();

  over_images(B, [&](int64_t b0, int64_t b1) {
    auto a = torch::empty({P, R}, opts);
    auto bm = torch::empty({Pm, R}, opts);             // after the mode-2 pass
    auto cring = torch::empty({span, Po, R}, opts);    // after the mode-1 pass, last `span` planes
    auto gring = torch::empty({span, Po, R}, opts);    // g_o of the output planes in the window
    auto o = torch::empty({Po, R}, opts);
    auto gc = torch::empty({Po, R}, opts);
    auto gb = torch::empty({Pm, R}, opts);
    auto ga = torch::empty({P, R}, opts);
    scalar_t* pa = a.data_ptr<scalar_t>();
    scalar_t* pb = bm.data_ptr<scalar_t>();
    scalar_t* pc = cring.data_ptr<scalar_t>();
    scalar_t* pg = gring.data_ptr<scalar_t>();
    scalar_t* po = o.data_ptr<scalar_t>();
    scalar_t* pgc = gc.data_ptr<scalar_t>();
    scalar_t* pgb = gb.data_ptr<scalar_t>();
    scalar_t* pga = ga.data_ptr<scalar_t>();
    const scalar_t* w0 = u0.data_ptr<scalar_t>();
    const scalar_t* w1 = u1.data_ptr<scalar_t>();
    const scalar_t* w2 = u2.data_ptr<scalar_t>();
    // this thread's partial sums: taken here, because a parallel loop nested in a parallel
    // region runs inline with its thread number reset to 0
    const int64_t tid = at::get_thread_num();
    auto duc_t = duc_part[tid];
    auto dwt_t = dwt_part[tid];
    const int64_t outer_tid = (nt > 1 && B >= nt) ? tid : -1;
    auto slot_of = [&]() { return outer_tid >= 0 ? outer_tid : static_cast<int64_t>(at::get_thread_num()); };
    for (int64_t b = b0; b < b1; ++b) {
      auto xb = x[b];
      auto gyb = gy[b];   // (Do, Ho, Wo, T)
      auto gxb = need_gx ? gx[b] : gx;   // (D, H, W, C)
      int64_t g_next = 0;  // g_o is computed for output planes < g_next
      for (int64_t d = 0; d < a0.in; ++d) {
        // g_o for the output planes that plane d feeds (d + p0 - i dl0)
        const int64_t e_hi = std::min(a0.out - 1, d + a0.pad_lo);
        for (int64_t e = std::max(g_next, d + a0.pad_lo - (K0 - 1) * a0.dil); e <= e_hi; ++e) {
          if (e < 0) continue;
          auto slot = gring[e % span];
          gemm_into<scalar_t>(slot, gyb[e].view({Po, T}), wt_t);
        }
        g_next = std::max(g_next, e_hi + 1);
        // forward recompute: a, b (mode 2), c (mode 1) into the ring
        auto xp = xb.select(1, d).reshape({C, P});
        gemm_c_to_r<scalar_t>(xp, uc, a);
        mode2_pass(pa, pb, H, a2, w2, R, R);
        scalar_t* cd = pc + (d % span) * plane;
        mode1_pass(pb, 1, 0, Po, [&](int64_t) { return cd; }, Wo, a1, w1, R);
        // g_c = mode-0 pass transposed
        at::parallel_for(0, Po, grain(R * K0), [&](int64_t q0, int64_t q1) {
          const scalar_t* src[64];
          const scalar_t* w[64];
          int n = 0;
          for (int64_t i = 0; i < K0; ++i) {
            const int64_t e = d + a0.pad_lo - i * a0.dil;
            if (e < 0 || e >= a0.out) continue;
            src[n] = pg + (e % span) * plane + q0 * R;
            w[n++] = w0 + i * R;
          }
          taps_run(pgc + q0 * R, R, src, R, w, n, R, q1 - q0);
        });
        // g_b = mode-1 pass transposed; du1[j] += b(row ho - p1 + j dl1) * g_c(row ho)
        at::parallel_for(0, H, grain(Wo * R * K1), [&](int64_t h0, int64_t h1) {
          const scalar_t* src[64];
          const scalar_t* w[64];
          scalar_t* acc = pp1 + slot_of() * K1 * R;
          for (int64_t h = h0; h < h1; ++h) {
            int n = 0;
            for (int64_t j = 0; j < K1; ++j) {
              const int64_t ho = h + a1.pad_lo - j * a1.dil;
              if (ho < 0 || ho >= Ho) continue;
              src[n] = pgc + ho * Wo * R;
              w[n++] = w1 + j * R;
              for (int64_t wo = 0; wo < Wo; ++wo)
                tap_dot(acc + j * R, pb + (h * Wo + wo) * R, pgc + (ho * Wo + wo) * R, R);
            }
            taps_run(pgb + h * Wo * R, R, src, R, w, n, R, Wo);
          }
        });
        // g_a = mode-2 pass transposed; du2[k] += a(col wo - p2 + k dl2) * g_b(col wo)
        at::parallel_for(0, H, grain(W * R * K2), [&](int64_t h0, int64_t h1) {
          const scalar_t* src[64];
          const scalar_t* w[64];
          scalar_t* acc = pp2 + slot_of() * K2 * R;
          for (int64_t h = h0; h < h1; ++h)
            for (int64_t wi = 0; wi < W; ++wi) {
              int n = 0;
              for (int64_t k = 0; k < K2; ++k) {
                const int64_t wo = wi + a2.pad_lo - k * a2.dil;
                if (wo < 0 || wo >= Wo) continue;
                src[n] = pgb + (h * Wo + wo) * R;
                w[n++] = w2 + k * R;
                tap_dot(acc + k * R, pa + (h * W + wi) * R, pgb + (h * Wo + wo) * R, R);
              }
              tap_sum(pga + (h * W + wi) * R, src, w, n, R);
            }
        });
        if (need_gx) {
          auto gx_plane = gxb[d].view({P, C});
          gemm_into<scalar_t>(gx_plane, ga, uc_t);
        }
        duc_t.addmm_(xp, ga);
        // output planes complete at this step: o, dwt, du0
        for (int64_t e : ready[d]) {
          at::parallel_for(0, Po, grain(R * K0), [&](int64_t q0, int64_t q1) {
            const scalar_t* src[64];
            const scalar_t* w[64];
            scalar_t* acc = pp0 + slot_of() * K0 * R;
            const scalar_t* ge = pg + (e % span) * plane;
            for (int64_t q = q0; q < q1; ++q) {
              int n = 0;
              for (int64_t i = 0; i < K0; ++i) {
                const int64_t s = a0.src(e, i);
                if (s < 0 || s >= a0.in) continue;
                src[n] = pc + (s % span) * plane + q * R;
                w[n++] = w0 + i * R;
                tap_dot(acc + i * R, src[n - 1], ge + q * R, R);
              }
              tap_sum(po + q * R, src, w, n, R);
            }
          });
          dwt_t.addmm_(o.t(), gyb[e].view({Po, T}));
        }
      }
    }
  });
  duc.copy_(duc_part.sum(0));
  dwt.copy_(dwt_part.sum(0));
  du0.copy_(part0.sum(0).view({K0, R}));
  du1.copy_(part1.sum(0).view({K1, R}));
  du2.copy_(part2.sum(0).view({K2, R}));
}

}  // namespace

// Gradients of cp_chain_forward (stride 1): gy (B, Do, Ho, Wo, T) contiguous. Returns gx as
// (B, D, H, W, C) contiguous (empty unless need_gx) and the gradients of uc, u0, u1, u2 and wt.
std::vector<torch::Tensor> cp_chain_backward(torch::Tensor x, torch::Tensor uc, torch::Tensor u0, torch::Tensor u1,
                                             torch::Tensor u2, torch::Tensor wt, torch::Tensor gy,
                                             std::vector<int64_t> pad_lo, std::vector<int64_t> dilation,
                                             bool need_gx) {
  TORCH_CHECK(x.dim() == 5 && gy.dim() == 5 && gy.is_contiguous(), "x (B, C, D, H, W), gy contiguous (B, Do, Ho, Wo, T)");
  const torch::Tensor* us[] = {&u0, &u1, &u2};
  Axis ax[3];
  for (int m = 0; m < 3; ++m) {
    TORCH_CHECK(us[m]->size(0) <= 64, "kernel sizes above 64 are not supported");
    ax[m] = Axis{x.size(2 + m), gy.size(1 + m), us[m]->size(0), 1, pad_lo[m], dilation[m]};
  }
  auto gx = need_gx ? torch::empty({x.size(0), x.size(2), x.size(3), x.size(4), x.size(1)}, x.options())
                    : torch::empty({0}, x.options());
  auto duc = torch::zeros_like(uc), du0 = torch::empty_like(u0), du1 = torch::empty_like(u1),
       du2 = torch::empty_like(u2), dwt = torch::zeros_like(wt);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cp_chain_backward", [&] {
    run_backward<scalar_t>(x, uc, u0, u1, u2, wt, gy, gx, duc, du0, du1, du2, dwt, ax[0], ax[1], ax[2], need_gx);
  });
  return {gx, duc, du0, du1, du2, dwt};
}

// the kernels touch tensors only: other Python threads run while they do
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cp_chain_forward", &cp_chain_forward, "3-D CP convolution, plane by plane (forward; U_T folded)",
        py::arg("x"), py::arg("uc"), py::arg("u0"), py::arg("u1"), py::arg("u2"), py::arg("wt"), py::arg("out_size"),
        py::arg("stride"), py::arg("pad_lo"), py::arg("dilation"), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("cp_chain_forward_kruskal", &cp_chain_forward_kruskal, "the same from lam, U_T, U_C, U_0, U_1, U_2",
        py::arg("x"), py::arg("lam"), py::arg("ut"), py::arg("uc"), py::arg("u0"), py::arg("u1"), py::arg("u2"),
        py::arg("out_size"), py::arg("stride"), py::arg("pad_lo"), py::arg("dilation"), py::arg("out") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  m.def("release_kept_scratch", &release_kept_scratch,
        "free the forward's scratch this thread keeps from call to call; returns the bytes freed");
  m.def("cp_chain_backward", &cp_chain_backward, "its gradients (stride 1), plane by plane",
        py::call_guard<py::gil_scoped_release>());
}
