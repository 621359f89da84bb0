// y = x @ W.T for a full-precision fp32 weight on CPU (server/model/dense_cpu.py), beside its
// reference F.linear: the base's lm_head (SmolLM2's is 49152 x 576, tied to the embeddings) and any
// other projection that is not NF4.
//
// Why a kernel: for the few rows of a decode step, MKL's sgemm on an AMD EPYC (AVX2) reached 34
// GFLOP/s at 16 rows and read the weight at 12 GB/s at one row, where this loop does about twice
// both; and BLAS picks its kernel by row count, so the batch-invariant mode ran the lm_head in
// 16-row tiles, one row costing as much as sixteen.
//
// Row-invariant by construction: each (row, output) pair has its own accumulator, fed one vector
// (8 elements under AVX2, 16 under AVX-512) at a time in k order, its lanes summed the same way at
// the end, then the tail of k (when it is not a multiple of the vector) added one by one. How many
// rows share the call, a row's place, the group it runs in and the thread split over outputs change
// only which sums run side by side.
#include <ATen/core/Tensor.h>  // not ATen/ATen.h, which declares every op: 3 s of a 17 s build
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

#if defined(__AVX2__) && defined(__FMA__)
inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512F__) && defined(__FMA__)
constexpr int kLanes = 16;
constexpr int kSums = 24;  // accumulators a row group keeps, of the 32 registers
using Vec = __m512;
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float sum_lanes(Vec v) {  // the upper half onto the lower, then as an AVX2 register
  const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return sum_lanes(_mm256_add_ps(_mm512_castps512_ps256(v), upper));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kSums = 12;  // of the 16 registers
using Vec = __m256;
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
#endif

#if defined(__AVX2__) && defined(__FMA__)
// y[g, n0 .. n0 + NB) for G rows of x: G x NB accumulators (at most kSums, beside one weight and
// the x registers), each weight vector loaded once for the G rows
template <int G, int NB>
void rows_block(float* y, int64_t ldy, const float* x, int64_t K, const float* w, int64_t n0) {
  Vec acc[G][NB];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NB; ++j) acc[g][j] = zero();
  const int64_t KV = K / kLanes * kLanes;
  for (int64_t e = 0; e < KV; e += kLanes)
    for (int j = 0; j < NB; ++j) {
      const Vec wv = load(w + (n0 + j) * K + e);
      for (int g = 0; g < G; ++g) acc[g][j] = fmadd(wv, load(x + g * K + e), acc[g][j]);
    }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NB; ++j) {
      float s = sum_lanes(acc[g][j]);
      for (int64_t e = KV; e < K; ++e) s += w[(n0 + j) * K + e] * x[g * K + e];
      y[g * ldy + n0 + j] = s;
    }
}
#else
constexpr int kLanes = 1;
constexpr int kSums = 12;

template <int G, int NB>
void rows_block(float* y, int64_t ldy, const float* x, int64_t K, const float* w, int64_t n0) {
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NB; ++j) {
      float s = 0.0f;
      for (int64_t e = 0; e < K; ++e) s += w[(n0 + j) * K + e] * x[g * K + e];
      y[g * ldy + n0 + j] = s;
    }
}
#endif

// G rows against weight rows [n_begin, n_end): NB at a time, the tail one by one
template <int G, int NB>
void rows_range(float* y, int64_t ldy, const float* x, int64_t K, const float* w, int64_t n_begin, int64_t n_end) {
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) rows_block<G, NB>(y, ldy, x, K, w, n);
  for (; n < n_end; ++n) rows_block<G, 1>(y, ldy, x, K, w, n);
}

// Weight rows [n_begin, n_end) in tiles of about 128 KB, each tile against every group of rows
// while it is in L2 (the whole weight at once would be read from memory once per group)
void matmul_range(float* y, int64_t ldy, const float* x, int64_t M, int64_t K, const float* w, int64_t n_begin,
                  int64_t n_end) {
  const int64_t tile = std::max<int64_t>(24, (131072 / (4 * K)) / 24 * 24);
  for (int64_t t0 = n_begin; t0 < n_end; t0 += tile) {
    const int64_t t1 = std::min(n_end, t0 + tile);
    int64_t m = 0;  // four rows at a time, then the tail (one row: fewer sums, its loads the bound)
    for (; m + 4 <= M; m += 4) rows_range<4, kSums / 4>(y + m * ldy, ldy, x + m * K, K, w, t0, t1);
    float* yt = y + m * ldy;
    const float* xt = x + m * K;
    switch (M - m) {
      case 3: rows_range<3, kSums / 3>(yt, ldy, xt, K, w, t0, t1); break;
      case 2: rows_range<2, kSums / 2>(yt, ldy, xt, K, w, t0, t1); break;
      case 1: rows_range<1, kSums * 2 / 3>(yt, ldy, xt, K, w, t0, t1); break;
      default: break;
    }
  }
}

// x: [M, K] fp32, weight: [N, K] fp32 contiguous -> [M, N]
at::Tensor matmul(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "dense matmul: CPU tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "dense matmul: fp32 x and weight");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1),
              "dense matmul: x [M, K] and weight [N, K]");
  TORCH_CHECK(weight.is_contiguous(), "dense matmul: the weight must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const at::Tensor xc = x.contiguous();
  float* py = y.data_ptr<float>();
  const float* px = xc.data_ptr<float>();
  const float* pw = weight.data_ptr<float>();
  // grain: 64 weight rows a task (37k weights at 576 columns), so small projections stay on one thread
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) { matmul_range(py, N, px, M, K, pw, begin, end); });
  return y;
}

int64_t vector_lanes() { return kLanes; }

}  // namespace

TORCH_LIBRARY(loraplex_dense, m) {
  m.def("matmul(Tensor x, Tensor weight) -> Tensor");
  m.impl("matmul", c10::DispatchKey::CPU, TORCH_FN(matmul));
  m.def("vector_lanes() -> int", &vector_lanes);
}
