// NF4 weights dequantized to fp32 on CPU (server/model/nf4_cpu.py), beside bitsandbytes' own
// `dequantize_4bit`, its reference:
//
//   out[i] = code[nibble i] * absmax[i / blocksize]      (element 2j: byte j's high nibble)
//
// Why a kernel: the base path dequantizes every projection's weight each step, and bitsandbytes'
// CPU kernel took 16.3 ms of SmolLM2-135M's 210 projections (11.4 ms here; a batch-16 decode step
// 100.0 -> 89.5 ms, bench/step_overhead.py). The 16 code values fit one AVX-512 register (two AVX2
// ones), so a nibble's value is one in-register permute instead of a table load per weight.
//
// Same bits as bitsandbytes by construction: each output is one IEEE fp32 product of the same two
// fp32 values, with no sum, so neither the vector width, the thread split nor the compiler's
// contraction of multiply-adds can change it. tests/unit/test_nf4_cpu.py compares bitwise.
//
// `matmul` multiplies rows of activations by such a weight without writing it out (below).
#include <ATen/core/Tensor.h>  // not ATen/ATen.h, which declares every op: 3 s of a 17 s build
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>

namespace {

#if defined(__AVX2__)
// the NF4 values of 8 nibbles, a 16-entry table from two 8-entry permutes picked by the index's bit
// 3 (moved to the sign)
inline __m256 nf4_values(__m256i idx, __m256 lut_lo, __m256 lut_hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx),
                          _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
#endif

// elements [begin, end) of a weight, both multiples of the block size
void dequantize_range(float* out, const uint8_t* packed, const float* absmax, const float* code, int64_t begin,
                      int64_t end, int64_t blocksize) {
#if defined(__AVX512F__)
  if (blocksize % 32 == 0) {
    const __m512 lut = _mm512_loadu_ps(code);
    const __m512i low4 = _mm512_set1_epi32(15);
    // out = [h0 l0 h1 l1 ...]: the first 16 from lanes 0-7 of each, the next 16 from lanes 8-15
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t b0 = begin; b0 < end; b0 += blocksize) {
      const __m512 s = _mm512_set1_ps(absmax[b0 / blocksize]);
      for (int64_t e = b0; e < b0 + blocksize; e += 32) {
        const __m512i bytes =
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + e / 2)));
        const __m512 hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut), s);
        const __m512 lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), lut), s);
        _mm512_storeu_ps(out + e, _mm512_permutex2var_ps(hi, first, lo));
        _mm512_storeu_ps(out + e + 16, _mm512_permutex2var_ps(hi, second, lo));
      }
    }
    return;
  }
#elif defined(__AVX2__)
  if (blocksize % 16 == 0) {
    const __m256 lut_lo = _mm256_loadu_ps(code), lut_hi = _mm256_loadu_ps(code + 8);
    const __m256i low4 = _mm256_set1_epi32(15);
    for (int64_t b0 = begin; b0 < end; b0 += blocksize) {
      const __m256 s = _mm256_set1_ps(absmax[b0 / blocksize]);
      for (int64_t e = b0; e < b0 + blocksize; e += 16) {
        const __m256i bytes =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + e / 2)));
        const __m256 hi = _mm256_mul_ps(nf4_values(_mm256_srli_epi32(bytes, 4), lut_lo, lut_hi), s);
        const __m256 lo = _mm256_mul_ps(nf4_values(_mm256_and_si256(bytes, low4), lut_lo, lut_hi), s);
        // unpack interleaves within 128-bit halves: [h0 l0 h1 l1 | h4 l4 h5 l5], [h2 l2 h3 l3 | h6 ..]
        const __m256 a = _mm256_unpacklo_ps(hi, lo), b = _mm256_unpackhi_ps(hi, lo);
        _mm256_storeu_ps(out + e, _mm256_permute2f128_ps(a, b, 0x20));
        _mm256_storeu_ps(out + e + 8, _mm256_permute2f128_ps(a, b, 0x31));
      }
    }
    return;
  }
#endif
  for (int64_t e = begin; e < end; e += 2) {
    const uint8_t byte = packed[e / 2];
    const float s = absmax[e / blocksize];
    out[e] = code[byte >> 4] * s;
    out[e + 1] = code[byte & 15] * s;
  }
}

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
constexpr int kWide = 2;  // weight rows per group of 5-8 rows: 32 registers hold 16 sums
using Vec = __m512;
// the 16 NF4 values in one register: a nibble's value is one permute
struct Lut {
  __m512 v;
  explicit Lut(const float* code) : v(_mm512_loadu_ps(code)) {}
};
inline Vec zero() { return _mm512_setzero_ps(); }
inline Vec load(const float* p) { return _mm512_loadu_ps(p); }
inline Vec broadcast(float s) { return _mm512_set1_ps(s); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
// the weights of 16 bytes times their block scale: hi from the high nibbles (even elements), lo
// from the low ones (odd elements)
inline void decode(const uint8_t* p, Vec s, const Lut& lut, Vec& hi, Vec& lo) {
  const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  hi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), lut.v), s);
  lo = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)), lut.v), s);
}
inline float sum_lanes(Vec v) {  // the upper half onto the lower, then as an AVX2 register
  const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  return sum_lanes(_mm256_add_ps(_mm512_castps512_ps256(v), upper));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int kLanes = 8;
constexpr int kWide = 1;  // 16 registers: 8 sums
using Vec = __m256;
// the 16 NF4 values in two registers (nf4_values)
struct Lut {
  __m256 lo, hi;
  explicit Lut(const float* code) : lo(_mm256_loadu_ps(code)), hi(_mm256_loadu_ps(code + 8)) {}
};
inline Vec zero() { return _mm256_setzero_ps(); }
inline Vec load(const float* p) { return _mm256_loadu_ps(p); }
inline Vec broadcast(float s) { return _mm256_set1_ps(s); }
inline Vec fmadd(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void decode(const uint8_t* p, Vec s, const Lut& lut, Vec& hi, Vec& lo) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  hi = _mm256_mul_ps(nf4_values(_mm256_srli_epi32(bytes, 4), lut.lo, lut.hi), s);
  lo = _mm256_mul_ps(nf4_values(_mm256_and_si256(bytes, _mm256_set1_epi32(15)), lut.lo, lut.hi), s);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// x's elements in the order one load of the weight's bytes yields them: in each chunk of 2 x kLanes
// elements the kLanes even ones (high nibbles) and then the kLanes odd ones (low nibbles)
constexpr int64_t kChunk = 2 * kLanes;

// y[g, n] for G rows of x and NB weight rows from n0. Each (row, n) pair has its own accumulator,
// fed chunk by chunk in k order (even elements, then odd) and summed the same way at the end,
// whatever G and NB are: a row's output cannot depend on which rows or how many share the call,
// nor on the thread split over n. G x NB (at most 8, 16 with AVX-512's 32 registers) only sets
// how many chains run side by side: FMA latency needs about 8 in flight, and a weight decoded once
// serves G rows.
template <int G, int NB>
void rows_block(float* y, int64_t ldy, const float* xs, int64_t K, const uint8_t* packed, const float* absmax,
                const Lut& lut, int64_t blocksize, int64_t n0) {
  Vec acc[G][NB];
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NB; ++j) acc[g][j] = zero();
  const int64_t blocks = K / blocksize;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t e = b * blocksize; e < (b + 1) * blocksize; e += kChunk) {
      for (int j = 0; j < NB; ++j) {
        // code * absmax: the one fp32 product dequantize computes, so the same weight values
        Vec hi, lo;
        decode(packed + ((n0 + j) * K + e) / 2, broadcast(absmax[(n0 + j) * blocks + b]), lut, hi, lo);
        for (int g = 0; g < G; ++g) {
          acc[g][j] = fmadd(hi, load(xs + g * K + e), acc[g][j]);
          acc[g][j] = fmadd(lo, load(xs + g * K + e + kLanes), acc[g][j]);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int j = 0; j < NB; ++j) y[g * ldy + n0 + j] = sum_lanes(acc[g][j]);
}

// G rows of x against weight rows [n_begin, n_end): NB rows at a time, the tail one by one
template <int G, int NB>
void rows_range(float* y, int64_t ldy, const float* xs, int64_t K, const uint8_t* packed, const float* absmax,
                const float* code, int64_t blocksize, int64_t n_begin, int64_t n_end) {
  const Lut lut(code);
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) rows_block<G, NB>(y, ldy, xs, K, packed, absmax, lut, blocksize, n);
  for (; n < n_end; ++n) rows_block<G, 1>(y, ldy, xs, K, packed, absmax, lut, blocksize, n);
}

void matmul_range(float* y, int64_t ldy, const float* xs, int64_t M, int64_t K, const uint8_t* packed,
                  const float* absmax, const float* code, int64_t blocksize, int64_t n_begin, int64_t n_end) {
  int64_t m = 0;  // eight rows at a time, then the tail
  for (; m + 8 <= M; m += 8)
    rows_range<8, kWide>(y + m * ldy, ldy, xs + m * K, K, packed, absmax, code, blocksize, n_begin, n_end);
  float* yt = y + m * ldy;
  const float* xt = xs + m * K;
  switch (M - m) {
    case 7: rows_range<7, kWide>(yt, ldy, xt, K, packed, absmax, code, blocksize, n_begin, n_end); break;
    case 6: rows_range<6, kWide>(yt, ldy, xt, K, packed, absmax, code, blocksize, n_begin, n_end); break;
    case 5: rows_range<5, kWide>(yt, ldy, xt, K, packed, absmax, code, blocksize, n_begin, n_end); break;
    case 4: rows_range<4, 2>(yt, ldy, xt, K, packed, absmax, code, blocksize, n_begin, n_end); break;
    case 3: rows_range<3, 2>(yt, ldy, xt, K, packed, absmax, code, blocksize, n_begin, n_end); break;
    case 2: rows_range<2, 4>(yt, ldy, xt, K, packed, absmax, code, blocksize, n_begin, n_end); break;
    case 1: rows_range<1, 8>(yt, ldy, xt, K, packed, absmax, code, blocksize, n_begin, n_end); break;
    default: break;
  }
}

// x [M, K] -> its chunks' even elements, then their odd ones
at::Tensor split_even_odd(const at::Tensor& x) {
  const int64_t K = x.size(1);
  return x.view({x.size(0), K / kChunk, kChunk / 2, 2}).transpose(2, 3).contiguous().view({x.size(0), K});
}
#else
constexpr int kLanes = 1;

void matmul_range(float* y, int64_t ldy, const float* xs, int64_t M, int64_t K, const uint8_t* packed,
                  const float* absmax, const float* code, int64_t blocksize, int64_t n_begin, int64_t n_end) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n_begin; n < n_end; ++n) {
      float acc = 0.0f;
      for (int64_t e = 0; e < K; e += 2) {
        const uint8_t byte = packed[(n * K + e) / 2];
        const float s = absmax[(n * K + e) / blocksize];
        acc += code[byte >> 4] * s * xs[m * K + e];
        acc += code[byte & 15] * s * xs[m * K + e + 1];
      }
      y[m * ldy + n] = acc;
    }
}

constexpr int64_t kChunk = 2;  // whole bytes

at::Tensor split_even_odd(const at::Tensor& x) { return x.contiguous(); }
#endif

void check_weight(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                  int64_t rows, int64_t cols) {
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu() && code.device().is_cpu(), "nf4: CPU tensors");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "nf4: packed must be contiguous uint8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "nf4: absmax must be contiguous fp32");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16, "nf4: code [16] fp32");
  TORCH_CHECK(rows >= 0 && cols >= 0, "nf4: negative shape");
  const int64_t n = rows * cols;
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0 && n % blocksize == 0, "nf4: the shape must be whole even blocks");
  TORCH_CHECK(packed.numel() * 2 == n && absmax.numel() == n / blocksize, "nf4: sizes do not match the shape");
}

// y = x @ W.T for an NF4 weight W [rows, cols], without writing W out: each weight is decoded in
// registers, as dequantize would (the same fp32 value), and multiplied into the rows of x there.
// A decode step reads 0.5 byte a weight instead of writing and reading back 4 (a batch-1 step of
// SmolLM2-135M: 31 ms of dequantization and GEMV, bench/single_stream.py). Every row of x is
// computed the same way whatever the others are (rows_block), so the product is row-invariant.
at::Tensor matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                  int64_t blocksize, int64_t rows, int64_t cols) {
  check_weight(packed, absmax, code, blocksize, rows, cols);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == cols,
              "nf4 matmul: x must be [M, cols] fp32 on CPU");
  TORCH_CHECK(cols % blocksize == 0 && blocksize % kChunk == 0,
              "nf4 matmul: each weight row must be whole blocks of ", kChunk, "s");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, rows}, x.options());
  if (M == 0 || rows == 0) return y;
  const at::Tensor xs = split_even_odd(x.contiguous());
  float* py = y.data_ptr<float>();
  const float* px = xs.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* pa = absmax.data_ptr<float>();
  const float* pc = code.data_ptr<float>();
  // grain: 32 weight rows a task (18k weights at 576 columns), so small projections stay on one thread
  at::parallel_for(0, rows, 32, [&](int64_t begin, int64_t end) {
    matmul_range(py, rows, px, M, cols, pp, pa, pc, blocksize, begin, end);
  });
  return y;
}

int64_t vector_lanes() { return kLanes; }

// packed: the weight's bytes (two weights each), absmax: [n / blocksize] fp32 (the decoded block
// scales), code: the 16 fp32 NF4 values; returns [rows, cols] fp32
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                      int64_t rows, int64_t cols) {
  check_weight(packed, absmax, code, blocksize, rows, cols);
  const int64_t n = rows * cols;
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(at::kFloat));
  float* po = out.data_ptr<float>();
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* pa = absmax.data_ptr<float>();
  const float* pc = code.data_ptr<float>();
  // grain: 256 blocks (16k weights at blocksize 64) a task, so small projections stay on one thread
  at::parallel_for(0, n / blocksize, 256, [&](int64_t begin, int64_t end) {
    dequantize_range(po, pp, pa, pc, begin * blocksize, end * blocksize, blocksize);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(loraplex_nf4, m) {
  m.def("dequantize(Tensor packed, Tensor absmax, Tensor code, int blocksize, int rows, int cols) -> Tensor");
  m.impl("dequantize", c10::DispatchKey::CPU, TORCH_FN(dequantize));
  m.def("matmul(Tensor x, Tensor packed, Tensor absmax, Tensor code, int blocksize, int rows, int cols) -> Tensor");
  m.impl("matmul", c10::DispatchKey::CPU, TORCH_FN(matmul));
  m.def("vector_lanes() -> int", &vector_lanes);
}
