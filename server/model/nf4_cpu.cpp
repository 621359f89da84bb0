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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>

namespace {

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
    // a 16-entry table from two 8-entry permutes, picked by the index's bit 3 (moved to the sign)
    auto lookup = [&](__m256i idx) {
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx),
                              _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    };
    for (int64_t b0 = begin; b0 < end; b0 += blocksize) {
      const __m256 s = _mm256_set1_ps(absmax[b0 / blocksize]);
      for (int64_t e = b0; e < b0 + blocksize; e += 16) {
        const __m256i bytes =
            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + e / 2)));
        const __m256 hi = _mm256_mul_ps(lookup(_mm256_srli_epi32(bytes, 4)), s);
        const __m256 lo = _mm256_mul_ps(lookup(_mm256_and_si256(bytes, low4)), s);
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

// packed: the weight's bytes (two weights each), absmax: [n / blocksize] fp32 (the decoded block
// scales), code: the 16 fp32 NF4 values; returns [rows, cols] fp32
at::Tensor dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                      int64_t rows, int64_t cols) {
  TORCH_CHECK(packed.device().is_cpu() && absmax.device().is_cpu() && code.device().is_cpu(), "nf4: CPU tensors");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "nf4: packed must be contiguous uint8");
  TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.is_contiguous(), "nf4: absmax must be contiguous fp32");
  TORCH_CHECK(code.scalar_type() == at::kFloat && code.is_contiguous() && code.numel() == 16, "nf4: code [16] fp32");
  TORCH_CHECK(rows >= 0 && cols >= 0, "nf4: negative shape");
  const int64_t n = rows * cols;
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0 && n % blocksize == 0, "nf4: the shape must be whole even blocks");
  TORCH_CHECK(packed.numel() * 2 == n && absmax.numel() == n / blocksize, "nf4: sizes do not match the shape");
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
}
