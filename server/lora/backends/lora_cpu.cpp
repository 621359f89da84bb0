// The grouped low-rank term on CPU in one call per projection (the `cpp` LoRA backend), beside its
// reference `lora_bag` (server/lora/ops.py) and the oracle `lora_reference`.
//
//   y[row] += scale[s] * ((x[row] @ A[s].T) @ B[s])     s = slots[i], row = rows[i] (or i)
//
// Why a kernel: in plain torch each projection's term was about six ops (two embedding bags, a
// gathered scale, a multiply, an add), each paying dispatch, a thread-pool wake-up and cold
// caches after the base matmul; at batch 16 that fixed cost was most of the term.
//
// Batch invariance by construction: a row is computed by one thread from its own x row and its
// own slot's factors, each output summed in a fixed order set by the shapes (k ascending for the
// shrink, the rank ascending for the expand), vectorized across ranks or output columns, never
// across the sum. Which rows share a call, a group or a thread changes only which rows run beside
// each other, not any row's arithmetic. Rows that share a slot run four to a group, so that one
// load of the factors serves four rows (group_entries): a batch with few adapters, a prompt.
//
// Rounding points follow PEFT's `lora_B(lora_A(x.to(dtype))) * scaling` with factors in `dtype`:
// x is rounded to the factors' dtype, each product accumulates in fp32 and is rounded to the
// factors' dtype, the scaled term is rounded again, then added to the fp32 output.
#include <ATen/core/Tensor.h>  // not ATen/ATen.h, which declares every op: 3 s of a 17 s build
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// 16 floats: one AVX-512 register, or a pair of 8-float vectors (two AVX2 registers). GCC lowers a
// 64-byte vector type badly where no 64-byte registers exist (8x slower under -march=x86-64-v3),
// hence the pair.
typedef float v8 __attribute__((vector_size(32)));
typedef uint32_t vw8 __attribute__((vector_size(32)));
#if defined(__AVX512F__)
typedef float vf __attribute__((vector_size(64)));
#else
struct vf {
  v8 lo, hi;
};
inline vf operator*(float s, vf v) { return {s * v.lo, s * v.hi}; }
inline vf operator*(vf v, float s) { return {v.lo * s, v.hi * s}; }
inline vf& operator+=(vf& a, vf b) {
  a.lo += b.lo;
  a.hi += b.hi;
  return a;
}
#endif
static_assert(sizeof(vf) == 64, "16 floats");
constexpr int64_t W = 16;  // ranks per shrink block, columns per expand vector
constexpr int G = 4;       // rows whose shrinks run side by side (independent sums hide latency)
#if defined(__AVX512F__)
constexpr int V = 8;  // expand vectors per pass: eight independent sums in 8 of the 32 registers
#else
constexpr int V = 4;  // four (eight AVX2 registers of 16): more would spill
#endif

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

// float -> T -> float: the value rounded to the factors' dtype (round to nearest even)
template <typename T>
inline float round_to(float v) { return f32(static_cast<T>(v)); }

#if !defined(__AVX512F__)
// The 16 floats of two 8-float halves (AVX2 or F16C registers), lo first. Each half moves as a
// register: copying the pair through memory as one 64-byte object cost a store-forwarding stall
// per vector (a third of the expand's time on Zen 3).
template <typename H>
inline vf join(const H& lo, const H& hi) {
  static_assert(sizeof(H) == 32, "8 lanes of 32 bits");
  return {(v8)lo, (v8)hi};
}
#endif

// 16 values of T widened to fp32 (exact). The template is the scalar path; the specializations
// below exist only where the CPU has the instructions for them.
template <typename T>
inline vf load16(const T* p) {
  float tmp[W];
  for (int u = 0; u < W; ++u) tmp[u] = f32(p[u]);
  vf v;
  std::memcpy(&v, tmp, sizeof v);
  return v;
}
template <>
inline vf load16<float>(const float* p) {
#if defined(__AVX512F__)
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
#else
  v8 lo, hi;  // one 64-byte copy into the pair compiled to a slow path (8x under x86-64-v3)
  std::memcpy(&lo, p, sizeof lo);
  std::memcpy(&hi, p + 8, sizeof hi);
  return {lo, hi};
#endif
}
// 16 floats to memory (the pair half by half, as load16<float> reads them)
inline void store16(float* p, vf v) {
#if defined(__AVX512F__)
  std::memcpy(p, &v, sizeof v);
#else
  std::memcpy(p, &v.lo, sizeof v.lo);
  std::memcpy(p + 8, &v.hi, sizeof v.hi);
#endif
}
#if defined(__AVX512F__)
template <>
inline vf load16<c10::Half>(const c10::Half* p) {
  const __m512 w = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  vf v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
template <>
inline vf load16<c10::BFloat16>(const c10::BFloat16* p) {
  // bf16 is the high half of an fp32: widening is a shift
  const __m512i wide =
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  vf v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}
#else
#if defined(__F16C__)
template <>
inline vf load16<c10::Half>(const c10::Half* p) {
  return join(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))));
}
#endif
#if defined(__AVX2__)
template <>
inline vf load16<c10::BFloat16>(const c10::BFloat16* p) {
  auto half = [](const c10::BFloat16* q) {
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))), 16);
  };
  return join(half(p), half(p + 8));
}
#endif
#endif

// round_to for 16 lanes at once, the same bits as c10's scalar conversions: bf16 by c10's
// round-to-nearest-even on the fp32 bits (NaN -> 0x7FC0), fp16 by the hardware's IEEE conversion
// (AVX-512F or F16C, round to nearest even; c10's scalar one, the template, without them).
template <typename T>
inline vf round16(vf v) {
  float tmp[W];
  std::memcpy(tmp, &v, sizeof tmp);
  for (int u = 0; u < W; ++u) tmp[u] = round_to<T>(tmp[u]);
  std::memcpy(&v, tmp, sizeof v);
  return v;
}
template <>
inline vf round16<float>(vf v) { return v; }
template <>
inline vf round16<c10::BFloat16>(vf v) {
#if defined(__AVX512F__)
  const __m512 f = _mm512_loadu_ps(reinterpret_cast<const float*>(&v));
  const __m512i bits = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                                           _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  const __m512i out = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7FC00000));
  vf r;
  std::memcpy(&r, &out, sizeof r);
  return r;
#else
  for (v8* h : {&v.lo, &v.hi}) {
    const vw8 bits = (vw8)*h;
    const vw8 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
    const vw8 nan = (vw8)(*h != *h);  // all ones in NaN lanes
    *h = (v8)((rounded & ~nan) | (0x7FC00000u & nan));
  }
  return v;
#endif
}
#if defined(__AVX512F__)
template <>
inline vf round16<c10::Half>(vf v) {
  __m512 w;
  std::memcpy(&w, &v, sizeof w);
  w = _mm512_cvtph_ps(_mm512_cvtps_ph(w, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  std::memcpy(&v, &w, sizeof v);
  return v;
}
#elif defined(__F16C__)
template <>
inline vf round16<c10::Half>(vf v) {
  for (v8* h : {&v.lo, &v.hi})
    *h = (v8)_mm256_cvtph_ps(_mm256_cvtps_ph((__m256)*h, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return v;
}
#endif

// t[g][q0 .. q0 + 16) for G rows: each row's sums in its own register, k ascending. Shared: the
// rows have one slot, so each load of A serves all G of them (a[0] for every row: the same values
// as a[g], in the same steps).
template <typename T, bool Shared>
inline void shrink_block(const float* const* xr, const T* const* a, float* const* t, int64_t in,
                         int64_t R, int64_t q0) {
  vf acc[G];
  for (int g = 0; g < G; ++g) acc[g] = vf{};
  for (int64_t k = 0; k < in; ++k)
    for (int g = 0; g < G; ++g) acc[g] += xr[g][k] * load16<T>(a[Shared ? 0 : g] + k * R + q0);
  for (int g = 0; g < G; ++g) {
    store16(t[g] + q0, round16<T>(acc[g]));
  }
}

// y[j] += round(round(acc[j]) * sc) for 16 columns
template <typename T>
inline void add_out(float* y, vf acc, float sc) {
  vf out = load16<float>(y);
  out += round16<T>(round16<T>(acc) * sc);
  store16(y, out);
}

// y_g[j0 .. j0 + NV * 16) += the expand of NR rows with one slot (factor b, rank r, scale sc): each
// column's sum over the rank ascending in its own register, one load of b serving the NR rows.
// One row with NV vectors, or NR rows with fewer: the same sums side by side.
template <typename T, int NR, int NV>
inline void expand_block(float* const* y, const float* const* t, const T* b, int64_t r, int64_t out,
                         float sc, int64_t j0) {
  vf acc[NR][NV];
  for (int g = 0; g < NR; ++g)
    for (int v = 0; v < NV; ++v) acc[g][v] = vf{};
  for (int64_t q = 0; q < r; ++q)
    for (int v = 0; v < NV; ++v) {
      const vf w = load16<T>(b + q * out + j0 + v * W);
      for (int g = 0; g < NR; ++g) acc[g][v] += t[g][q] * w;
    }
  for (int g = 0; g < NR; ++g)
    for (int v = 0; v < NV; ++v) add_out<T>(y[g] + j0 + v * W, acc[g][v], sc);
}

// The columns of NR rows with one slot: NV vectors at a time, then single vectors, then the tail
// one by one (each column's path depends on j and `out` only)
template <typename T, int NR, int NV>
inline void expand_rows(float* const* y, const float* const* t, const T* b, int64_t r, int64_t out,
                        float sc) {
  int64_t j0 = 0;
  for (; j0 + NV * W <= out; j0 += NV * W) expand_block<T, NR, NV>(y, t, b, r, out, sc, j0);
  for (; j0 + W <= out; j0 += W) expand_block<T, NR, 1>(y, t, b, r, out, sc, j0);
  for (int g = 0; g < NR; ++g)
    for (int64_t j = j0; j < out; ++j) {
      float acc = 0.f;
      for (int64_t q = 0; q < r; ++q) acc += t[g][q] * f32(b[q * out + j]);
      y[g][j] += round_to<T>(round_to<T>(acc) * sc);
    }
}

// G entries of the call (indices into rows/slots); shared: all have one slot
struct Group {
  int64_t first;  // into the ordered entries
  int count;
  bool shared;
};

// The entries in groups of G: first whole groups of entries that share a slot (one factor load
// serves G rows: a batch with few adapters, or a prompt's rows), then the rest G at a time. The
// grouping changes only which rows run side by side, never a row's arithmetic.
inline std::vector<Group> group_entries(const int64_t* slots, int64_t n, std::vector<int64_t>& order) {
  std::vector<int64_t> sorted(n), rest;
  for (int64_t i = 0; i < n; ++i) sorted[i] = i;
  std::stable_sort(sorted.begin(), sorted.end(), [&](int64_t a, int64_t b) { return slots[a] < slots[b]; });
  std::vector<Group> groups;
  order.clear();
  for (int64_t i = 0; i < n;) {
    int64_t j = i;
    while (j < n && slots[sorted[j]] == slots[sorted[i]]) ++j;
    for (; i + G <= j; i += G) {
      groups.push_back({static_cast<int64_t>(order.size()), G, true});
      order.insert(order.end(), sorted.begin() + i, sorted.begin() + i + G);
    }
    rest.insert(rest.end(), sorted.begin() + i, sorted.begin() + j);
    i = j;
  }
  for (size_t i = 0; i < rest.size(); i += G)
    groups.push_back({static_cast<int64_t>(order.size() + i), static_cast<int>(std::min<size_t>(G, rest.size() - i)),
                      false});
  order.insert(order.end(), rest.begin(), rest.end());
  return groups;
}

template <typename T>
void add_term(float* y, const float* x, const T* A, const T* B, const float* scale, const int32_t* rank,
              const int64_t* rows, const int64_t* slots, int64_t n, int64_t in, int64_t R, int64_t out,
              int64_t y_stride, int64_t x_stride) {
  // Rank blocks [0, R16) run vectorized, the rest (when R is not a multiple of 16) one by one: the
  // path of t[q] depends on q and R only.
  const int64_t R16 = R / W * W;
  std::vector<int64_t> order;
  const std::vector<Group> groups = group_entries(slots, n, order);
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tv(G * R), xv(G * in);
    for (int64_t gi = begin; gi < end; ++gi) {
      const Group& group = groups[gi];
      const float* xr[G];
      const T* a[G];
      float* t[G];
      float* yr[G];
      int64_t blocks = 0;
      for (int g = 0; g < G; ++g) {
        // a short group repeats its last row
        const int64_t i = order[group.first + std::min(g, group.count - 1)];
        const int64_t row = rows ? rows[i] : i;
        const int64_t s = slots[i];
        float* xg = xv.data() + g * in;
        const float* xi = x + row * x_stride;
        int64_t k = 0;
        for (; k + W <= in; k += W) {
          store16(xg + k, round16<T>(load16<float>(xi + k)));
        }
        for (; k < in; ++k) xg[k] = round_to<T>(xi[k]);
        xr[g] = xg;
        a[g] = A + s * in * R;
        t[g] = tv.data() + g * R;
        yr[g] = y + row * y_stride;
        // blocks past a row's rank read its zero padding: exact zeros its expand never uses
        blocks = std::max<int64_t>(blocks, std::min<int64_t>((rank[s] + W - 1) / W * W, R16));
      }
      for (int64_t q0 = 0; q0 < blocks; q0 += W) {
        if (group.shared)
          shrink_block<T, true>(xr, a, t, in, R, q0);
        else
          shrink_block<T, false>(xr, a, t, in, R, q0);
      }
      for (int g = 0; g < group.count; ++g) {
        const int64_t s = slots[order[group.first + g]];
        for (int64_t q = R16; q < rank[s]; ++q) {
          float acc = 0.f;
          for (int64_t k = 0; k < in; ++k) acc += xr[g][k] * f32(a[g][k * R + q]);
          t[g][q] = round_to<T>(acc);
        }
      }
      const int64_t s0 = slots[order[group.first]];
      if (group.shared) {
        if (rank[s0] > 0) expand_rows<T, G, V / G>(yr, t, B + s0 * R * out, rank[s0], out, scale[s0]);
        continue;
      }
      for (int g = 0; g < group.count; ++g) {
        const int64_t s = slots[order[group.first + g]];
        // rank 0: this projection is not in the adapter, its term is zero
        if (rank[s] > 0) expand_rows<T, 1, V>(yr + g, t + g, B + s * R * out, rank[s], out, scale[s]);
      }
    }
  });
}

// y: [T, out] fp32, x: [T, in] fp32; A: [S, R, in] stored [S, in, R] (LoRALinear's buffer);
// B: [S, R, out]; scale: [S] fp32; rank: [S] int32; rows: [n] ascending distinct rows of y (None:
// rows 0 .. n-1); slots: [n] int64.
void lora_add_(at::Tensor y, const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
               const at::Tensor& scale, const at::Tensor& rank, const std::optional<at::Tensor>& rows,
               const at::Tensor& slots) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && A.dim() == 3 && B.dim() == 3, "lora_add_: bad ranks");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "lora_add_: x, y fp32");
  TORCH_CHECK(A.scalar_type() == B.scalar_type(), "lora_add_: A and B differ in dtype");
  const int64_t S = A.size(0), R = A.size(1), in = A.size(2), out = B.size(2);
  TORCH_CHECK(A.stride(1) == 1 && A.stride(2) == R && A.stride(0) == in * R,
              "lora_add_: A must be stored rank-innermost ([S, in, R] contiguous)");
  TORCH_CHECK(B.is_contiguous() && B.size(0) == S && B.size(1) == R, "lora_add_: B must be [S, R, out]");
  TORCH_CHECK(x.size(1) == in && y.size(1) == out && x.size(0) == y.size(0), "lora_add_: x/y shapes");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "lora_add_: rows of x and y must be contiguous");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == S,
              "lora_add_: scale [S] fp32");
  TORCH_CHECK(rank.scalar_type() == at::kInt && rank.is_contiguous() && rank.numel() == S,
              "lora_add_: rank [S] int32");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.dim() == 1,
              "lora_add_: slots [n] int64");
  const int64_t n = slots.size(0);
  const int64_t* ps = slots.data_ptr<int64_t>();
  const int32_t* pr = rank.data_ptr<int32_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(ps[i] >= 0 && ps[i] < S && pr[ps[i]] >= 0 && pr[ps[i]] <= R, "lora_add_: bad slot");
  const int64_t* prow = nullptr;
  if (rows.has_value()) {
    TORCH_CHECK(rows->scalar_type() == at::kLong && rows->is_contiguous() && rows->numel() == n,
                "lora_add_: rows [n] int64");
    prow = rows->data_ptr<int64_t>();
    // distinct rows: threads write disjoint rows of y
    for (int64_t i = 0; i < n; ++i)
      TORCH_CHECK(prow[i] >= 0 && prow[i] < y.size(0) && (i == 0 || prow[i] > prow[i - 1]),
                  "lora_add_: rows must be ascending rows of y");
  } else {
    TORCH_CHECK(n <= y.size(0), "lora_add_: more slots than rows");
  }
  float* py = y.data_ptr<float>();
  const float* px = x.data_ptr<float>();
  const float* psc = scale.data_ptr<float>();
  const int64_t ys = y.stride(0), xs = x.stride(0);
  switch (A.scalar_type()) {
    case at::kFloat:
      add_term<float>(py, px, A.data_ptr<float>(), B.data_ptr<float>(), psc, pr, prow, ps, n, in, R, out,
                      ys, xs);
      break;
    case at::kBFloat16:
      add_term<c10::BFloat16>(py, px, A.data_ptr<c10::BFloat16>(), B.data_ptr<c10::BFloat16>(), psc, pr,
                              prow, ps, n, in, R, out, ys, xs);
      break;
    case at::kHalf:
      add_term<c10::Half>(py, px, A.data_ptr<c10::Half>(), B.data_ptr<c10::Half>(), psc, pr, prow, ps, n,
                          in, R, out, ys, xs);
      break;
    default:
      TORCH_CHECK(false, "lora_add_: factors must be float32, bfloat16 or float16");
  }
}

}  // namespace

TORCH_LIBRARY(loraplex_cpu, m) {
  m.def(
      "lora_add_(Tensor(a!) y, Tensor x, Tensor A, Tensor B, Tensor scale, Tensor rank, Tensor? rows, "
      "Tensor slots) -> ()");
  m.impl("lora_add_", c10::DispatchKey::CPU, TORCH_FN(lora_add_));
}
