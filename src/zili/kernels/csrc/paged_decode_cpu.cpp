// Paged decode attention for CPUs: one query token per sequence, keys and values read in place
// from the paged KV cache (no gathered copy), float32 math.
//
//   q            [B, H, D]                    float32 / bfloat16 / float16
//   kv_cache     [2, NB, BS, KVH, D]          q's dtype (index 0 keys, 1 values), or a quantized cache
//                [2, NB, BS, KVH, D + 2]      int8 / float8_e4m3fn: each row's D elements, then its
//                                             bf16 scale (zili.kernels.kv_quant; value = element * scale)
//   block_tables [B, W] int64, seq_lens [B] int64 (context length including the new token)
//   window       0: the whole context; > 0: only the last `window` positions (sliding-window
//                attention, as in Mistral and Gemma's local layers)
//   returns      [B, H, D] in q's dtype
//
// Work is split over sequences (over (sequence, KV head) pairs when there are fewer sequences than
// threads). Each position's key and value rows are loaded once, converted to float32, and used by
// every query head that reads them (grouped-query attention). Per item: scores for every context
// position, a softmax per query head, then the value-weighted sum.

#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <algorithm>
#include <limits>
#include <atomic>
#include <vector>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Defined in quant_gemm_cpu.cpp (the same library): below this many bytes of KV rows a call runs on
// the calling thread alone.
namespace ZILI_OPS_NS {
extern std::atomic<int64_t> parallel_min_bytes;
}

namespace {

inline float to_float(float x) { return x; }
inline float to_float(double x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {
  uint16_t raw;
  std::memcpy(&raw, &x, sizeof(raw));
  uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// A bf16 stored as two bytes, low byte first (the scale behind a quantized cache row).
inline float bf16_bytes_to_float(const void* p) {
  uint16_t raw;
  std::memcpy(&raw, p, sizeof(raw));
  const uint32_t bits = static_cast<uint32_t>(raw) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Every fp8 e4m3 byte's value: a table lookup is cheaper than decoding the bits each time.
const float* fp8_e4m3_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int i = 0; i < 256; ++i)
      t[i] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(i), c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table.data();
}

// How a cache row of element type C is read: float caches hold D elements; quantized ones (int8,
// fp8 e4m3) D one-byte elements and then the row's bf16 scale (kExtra elements of C).
template <typename C>
struct CacheRow {
  static constexpr int64_t kExtra = 0;
  static float scale(const C*, int64_t) { return 1.0f; }
  static void load(const C* row, float* dst, int64_t D) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dst[i] = to_float(row[i]);
  }
};
template <>
struct CacheRow<int8_t> {
  static constexpr int64_t kExtra = 2;
  static float scale(const int8_t* row, int64_t D) { return bf16_bytes_to_float(row + D); }
  static void load(const int8_t* row, float* dst, int64_t D) {
    const float s = scale(row, D);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<float>(row[i]) * s;
  }
};
template <>
struct CacheRow<c10::Float8_e4m3fn> {
  static constexpr int64_t kExtra = 2;
  static float scale(const c10::Float8_e4m3fn* row, int64_t D) { return bf16_bytes_to_float(row + D); }
  static void load(const c10::Float8_e4m3fn* row, float* dst, int64_t D) {
    const float s = scale(row, D);
    const float* table = fp8_e4m3_table();
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(row);
    for (int64_t i = 0; i < D; ++i) dst[i] = table[bytes[i]] * s;
  }
};

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

// x[i] = exp(x[i] - mx) / sum: the exp loop is vectorised through glibc's libmvec (omp simd).
inline void softmax_tail(float* x, int64_t n, float mx) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] = expf(x[i] - mx);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= inv;
}

#if defined(__AVX512F__)
// 16 elements as float32 lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const double*) { return _mm512_setzero_ps(); }  // never used: double takes the scalar path
inline __m512 load16(const int8_t* p) {  // unscaled: the caller applies the row's scale
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline __m512 load16(const c10::Float8_e4m3fn* p) {
  const __m512i idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_i32gather_ps(idx, fp8_e4m3_table(), 4);
}

// The 8 horizontal sums of v[0..7], as one 8-lane vector (a transpose-and-add tree: far cheaper than
// eight separate reductions).
inline __m256 hsum8(const __m512* v) {
  __m256 w[8];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm256_add_ps(_mm512_castps512_ps256(v[i]), _mm512_extractf32x8_ps(v[i], 1));
  const __m256 t0 = _mm256_hadd_ps(w[0], w[1]), t1 = _mm256_hadd_ps(w[2], w[3]);
  const __m256 t2 = _mm256_hadd_ps(w[4], w[5]), t3 = _mm256_hadd_ps(w[6], w[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// exp(x) for x <= 0 (softmax inputs after the max is taken off): 2^(x log2 e) split into 2^n * 2^f
// with |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error ~1e-7, below fp32's own
// rounding), the 2^n by scalef. Inputs below -88 give (close to) zero, as expf does.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// In-place softmax of x[0..n) with 16-lane vectors (a masked tail): max, exp and sum, scale.
inline void softmax_avx512(float* x, int64_t n) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(x + i));
  const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1u);
  if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, x + i));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (i = 0; i + 16 <= n; i += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(x + i), m));
    _mm512_storeu_ps(x + i, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (tail) {
    const __m512 e = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, x + i), m)));
    _mm512_mask_storeu_ps(x + i, tail, e);
    sum = _mm512_add_ps(sum, e);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
  for (i = 0; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_mul_ps(_mm512_loadu_ps(x + i), inv));
  if (tail) _mm512_mask_storeu_ps(x + i, tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, x + i), inv));
}

// One (sequence, KV-head range) item with D a multiple of 16: keys are read 8 positions at a time
// and scored against the G query heads of their KV head while in registers; values are summed into
// per-head accumulators held in registers. Returns false when D does not suit (scalar path then).
// A quantized cache's rows are read unscaled and their scale applied once per position: to the
// 8 finished scores, and to the softmax weight of each value row.
template <typename T>
bool decode_item_avx512(const T* cache, const int64_t* table, int64_t first, int64_t len, const float* qf,
                        float* scores, float* acc, int64_t h0, int64_t h1, int64_t G, int64_t D, int64_t BS,
                        int64_t token_stride, int64_t block_stride, int64_t half) {
  constexpr int kMaxChunks = 8;  // D up to 128
  constexpr int64_t RX = CacheRow<T>::kExtra;  // row width D + RX
  if (D % 16 != 0 || D / 16 > kMaxChunks || G > 8 || std::is_same<T, double>::value) return false;
  const int64_t chunks = D / 16, nh = (h1 - h0) * G;
  for (int64_t kh = h0; kh < h1; ++kh) {
    const int64_t hb = (kh - h0) * G;  // this KV head's first query head inside the item
    // Scores: 8 positions at a time; each key chunk is loaded once for every query head of its KV head.
    for (int64_t s0 = 0; s0 < len; s0 += 8) {
      const int64_t n = std::min<int64_t>(8, len - s0);
      __m512 part[3][8];  // G <= 3 here; larger groups go round again below
      for (int64_t g0 = 0; g0 < G; g0 += 3) {
        const int64_t ng = std::min<int64_t>(3, G - g0);
        for (int64_t g = 0; g < 3; ++g)
          for (int64_t t = 0; t < 8; ++t) part[g][t] = _mm512_setzero_ps();
        float kscale[8];
        for (int64_t t = 0; t < n; ++t) {
          const int64_t s = first + s0 + t;
          const T* k = cache + table[s / BS] * block_stride + (s % BS) * token_stride + kh * (D + RX);
          kscale[t] = CacheRow<T>::scale(k, D);
          for (int64_t c = 0; c < chunks; ++c) {
            const __m512 kc = load16(k + 16 * c);
            for (int64_t g = 0; g < ng; ++g)
              part[g][t] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + (hb + g0 + g) * D + 16 * c), kc, part[g][t]);
          }
        }
        for (int64_t g = 0; g < ng; ++g) {
          float sums[8];
          _mm256_storeu_ps(sums, hsum8(part[g]));
          for (int64_t t = 0; t < n; ++t) scores[(hb + g0 + g) * len + s0 + t] = sums[t] * kscale[t];
        }
      }
    }
  }
  for (int64_t h = 0; h < nh; ++h) softmax_avx512(scores + h * len, len);  // per query head
  for (int64_t kh = h0; kh < h1; ++kh) {  // values: accumulators in registers per query head
    const int64_t hb = (kh - h0) * G;
    __m512 out[8][kMaxChunks];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < chunks; ++c) out[g][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < len; ++s) {
      const int64_t p = first + s;
      const T* v = cache + half + table[p / BS] * block_stride + (p % BS) * token_stride + kh * (D + RX);
      const float vscale = CacheRow<T>::scale(v, D);
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 vc = load16(v + 16 * c);
        for (int64_t g = 0; g < G; ++g)
          out[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(hb + g) * len + s] * vscale), vc, out[g][c]);
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(acc + (hb + g) * D + 16 * c, out[g][c]);
  }
  return true;
}
#endif

// ---- the value sum of the specialised kernels, written once for every vector width ----------------
// A vector type's traits: its fp32 lane count, how many accumulators fit in its register file (the
// rest hold the weights and the loaded chunk), and the five operations the sum uses. load() converts
// one chunk of cache elements (bf16, int8: unscaled) to fp32 lanes.
#if defined(__AVX512F__)
struct Vec16 {
  using V = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kAccumulators = 24;  // of 32 registers
  static V zero() { return _mm512_setzero_ps(); }
  static V broadcast(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  template <typename T>
  static V load(const T* p) { return load16(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#elif defined(__AVX2__)
inline __m256 load8(const int8_t* p) {  // 8 elements as float32 lanes, unscaled
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

struct Vec8 {
  using V = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kAccumulators = 12;  // of 16 registers
  static V zero() { return _mm256_setzero_ps(); }
  static V broadcast(float x) { return _mm256_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V load(const int8_t* p) { return load8(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
// acc[h] = sum over positions s in [skip, len) of scores[h * len + s] * V[first + s], for the G query
// heads of every KV head in [h0, h1), with D (a compile-time multiple of Vec::kLanes) and the value
// rows of a cache of element type C read in place (a quantized row's scale folded into its weight).
// Heads go in passes of GB so that the GB x D / kLanes accumulators stay in registers.
template <typename Vec, int G, int D, typename C>
inline void sum_values(const C* cache, const int64_t* table, int64_t first, int64_t skip, int64_t len,
                       const float* scores, float* acc, int64_t h0, int64_t h1, int64_t BS, int64_t token_stride,
                       int64_t block_stride, int64_t half) {
  using V = typename Vec::V;
  constexpr int VC = D / Vec::kLanes;  // chunks per row
  static_assert(VC * Vec::kLanes == D, "D must be a multiple of the lane count");
  constexpr int GB = std::max(1, std::min(G, Vec::kAccumulators / VC));
  constexpr int64_t RW = D + CacheRow<C>::kExtra;
  for (int64_t kh = h0; kh < h1; ++kh) {
    const int64_t hb = (kh - h0) * G;
    for (int g0 = 0; g0 < G; g0 += GB) {
      V out[GB][VC];
      for (int g = 0; g < GB; ++g)
        for (int c = 0; c < VC; ++c) out[g][c] = Vec::zero();
      for (int64_t s = skip; s < len; ++s) {
        const int64_t p = first + s;
        const C* v = cache + half + table[p / BS] * block_stride + (p % BS) * token_stride + kh * RW;
        const float vscale = CacheRow<C>::scale(v, D);  // 1 for a float cache
        V w[GB];
        for (int g = 0; g < GB; ++g)
          w[g] = g0 + g < G ? Vec::broadcast(scores[(hb + g0 + g) * len + s] * vscale) : Vec::zero();
        for (int c = 0; c < VC; ++c) {
          const V vc = Vec::load(v + Vec::kLanes * c);
          for (int g = 0; g < GB; ++g) out[g][c] = Vec::fma(w[g], vc, out[g][c]);
        }
      }
      for (int g = 0; g < GB && g0 + g < G; ++g)
        for (int c = 0; c < VC; ++c) Vec::store(acc + (hb + g0 + g) * D + Vec::kLanes * c, out[g][c]);
    }
  }
}
#endif

#if defined(__AVX512BF16__)
// bf16 caches with D = 32 * CH and G query heads per KV head, all compile-time so that every loop
// below unrolls into registers. Scores use the dot-product instruction on bf16 pairs (vdpbf16ps:
// the products are exact in fp32, as in the fp32 path, with no conversion of the keys); the
// value sum stays in fp32 FMAs on the softmax weights. Positions go 8 at a time so that one
// transpose-and-add (hsum8) finishes 8 scores; 8 consecutive positions share a block when the
// block size is a multiple of 8 (the caller checks), so one block-table lookup serves all 8.
constexpr int64_t kPrefetchAhead = 16;  // positions

template <int G, int CH>
void decode_item_bf16(const c10::BFloat16* cache, const int64_t* table, int64_t first, int64_t skip, int64_t len,
                      const c10::BFloat16* q, float scale, float* scores, float* acc, int64_t h0, int64_t h1,
                      int64_t BS, int64_t token_stride, int64_t block_stride, int64_t half) {
  constexpr int D = 32 * CH;
  for (int64_t kh = h0; kh < h1; ++kh) {
    const int64_t hb = (kh - h0) * G;
    const c10::BFloat16* qh = q + (kh - h0) * G * D;
    const int64_t head_off = kh * D;
    for (int64_t s0 = 0; s0 < len; s0 += 8) {
      const int64_t n = std::min<int64_t>(8, len - s0);
      const int64_t p0 = first + s0;  // a multiple of 8: the 8 positions share a block
      const c10::BFloat16* kb = cache + table[p0 / BS] * block_stride + (p0 % BS) * token_stride + head_off;
      if (kh == h0 && s0 + kPrefetchAhead < len) {
        // The first KV head's pass brings in whole rows (every KV head's keys, and the values) a
        // little ahead: blocks sit at random places, so the hardware prefetcher cannot follow.
        const int64_t sp = s0 + kPrefetchAhead, pp = first + sp;
        const int64_t n_ahead = std::min<int64_t>(8, len - sp);
        const c10::BFloat16* row = cache + table[pp / BS] * block_stride + (pp % BS) * token_stride + h0 * D;
        const int64_t bytes = (h1 - h0) * D * 2;
        for (int64_t t = 0; t < n_ahead; ++t)
          for (int64_t off = 0; off < bytes; off += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(row + t * token_stride) + off, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(row + half + t * token_stride) + off, _MM_HINT_T1);
          }
      }
      for (int g = 0; g < G; ++g) {
        __m512bh qv[CH];
        for (int c = 0; c < CH; ++c)
          qv[c] = (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(qh + g * D + 32 * c));
        __m512 part[8];
        for (int t = 0; t < 8; ++t) {
          part[t] = _mm512_setzero_ps();
          if (t < n) {
            const c10::BFloat16* k = kb + t * token_stride;
            for (int c = 0; c < CH; ++c)
              part[t] = _mm512_dpbf16_ps(part[t], qv[c],
                                         (__m512bh)_mm512_loadu_si512(reinterpret_cast<const void*>(k + 32 * c)));
          }
        }
        float sums[8];
        _mm256_storeu_ps(sums, _mm256_mul_ps(hsum8(part), _mm256_set1_ps(scale)));
        for (int64_t t = 0; t < n; ++t) scores[(hb + g) * len + s0 + t] = sums[t];
      }
    }
  }
  const int64_t nh = (h1 - h0) * G;
  // Positions before a sliding window's start that share its first group of 8 were scored for
  // alignment only: they get no weight.
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t s = 0; s < skip; ++s) scores[h * len + s] = -std::numeric_limits<float>::infinity();
  for (int64_t h = 0; h < nh; ++h) softmax_avx512(scores + h * len, len);
  for (int64_t h = 0; h < nh; ++h)
    for (int64_t s = 0; s < skip; ++s) scores[h * len + s] = 0.0f;
  sum_values<Vec16, G, D>(cache, table, first, skip, len, scores, acc, h0, h1, BS, token_stride, block_stride, half);
}

using Bf16ItemFn = void (*)(const c10::BFloat16*, const int64_t*, int64_t, int64_t, int64_t, const c10::BFloat16*,
                            float, float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

template <int CH>
Bf16ItemFn bf16_item_for_group(int64_t G) {
  switch (G) {
    case 1: return decode_item_bf16<1, CH>;
    case 2: return decode_item_bf16<2, CH>;
    case 3: return decode_item_bf16<3, CH>;
    case 4: return decode_item_bf16<4, CH>;
    case 5: return decode_item_bf16<5, CH>;
    case 6: return decode_item_bf16<6, CH>;
    case 7: return decode_item_bf16<7, CH>;
    case 8: return decode_item_bf16<8, CH>;
    default: return nullptr;
  }
}

// The specialised kernel for (G, D), or nullptr (the generic paths then run).
Bf16ItemFn bf16_item(int64_t G, int64_t D, int64_t BS) {
  if (BS % 8 != 0) return nullptr;
  if (D == 64) return bf16_item_for_group<2>(G);
  if (D == 128) return bf16_item_for_group<4>(G);
  return nullptr;
}
#endif

// ---- int8 caches with compile-time (G, D) ----------------------------------------------------------
// The quantized counterpart of decode_item_bf16: rows are D int8 elements and a bf16 scale (66 bytes
// at D 64), read in place. Positions go 8 at a time within one block (the caller checks BS % 8 == 0
// and aligns `first` down to 8, `skip` positions of weight zero), the rows a few positions ahead are
// prefetched (blocks sit at random places), each key row is scaled once (its 8 finished scores times
// the row's scale), and each value row's scale is folded into its softmax weight.
#if defined(__AVX2__) || defined(__AVX512F__)
constexpr int64_t kQ8PrefetchAhead = 16;  // positions

// Brings position p's rows (keys and values, KV heads [h0, h1)) towards the core.
inline void prefetch_q8_rows(const int8_t* cache, const int64_t* table, int64_t p, int64_t h0, int64_t h1,
                             int64_t RW, int64_t BS, int64_t token_stride, int64_t block_stride, int64_t half) {
  const int8_t* row = cache + table[p / BS] * block_stride + (p % BS) * token_stride + h0 * RW;
  const int64_t bytes = (h1 - h0) * RW;
  for (int64_t off = 0; off < bytes; off += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(row + off), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(row + half + off), _MM_HINT_T1);
  }
  _mm_prefetch(reinterpret_cast<const char*>(row + bytes - 1), _MM_HINT_T0);  // rows end off a line boundary
  _mm_prefetch(reinterpret_cast<const char*>(row + half + bytes - 1), _MM_HINT_T1);
}

// The 8 horizontal sums of v[0..7] (8-lane vectors) as one vector.
inline __m256 hsum8x8(const __m256* w) {
  const __m256 t0 = _mm256_hadd_ps(w[0], w[1]), t1 = _mm256_hadd_ps(w[2], w[3]);
  const __m256 t2 = _mm256_hadd_ps(w[4], w[5]), t3 = _mm256_hadd_ps(w[6], w[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Softmax over scores[h * len + s] for every head, positions before `skip` given weight zero.
template <typename Softmax>
inline void softmax_skipping(float* scores, int64_t nh, int64_t len, int64_t skip, Softmax softmax) {
  for (int64_t h = 0; h < nh; ++h) {
    for (int64_t s = 0; s < skip; ++s) scores[h * len + s] = -std::numeric_limits<float>::infinity();
    softmax(scores + h * len, len);
    for (int64_t s = 0; s < skip; ++s) scores[h * len + s] = 0.0f;
  }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
// Scores as integer dot products: the scaled query is quantized once per item to int16 with one
// scale per head (a step of 1/32767 of the head's largest element: finer than the bf16 query it
// comes from, so the scores keep the accuracy of the fp32 path; an int8 query, one vpdpbusd per 64
// elements, measured 5% output error on sharp softmaxes), the key rows widen int8 -> int16 once
// (shared by the G heads) and vpdpwssd sums pairs of products into int32 lanes. The lanes convert to
// fp32 once per position and head; the key row's scale and the head's scale are applied to the 8
// finished scores. Values stay fp32 FMAs on the softmax weight times the row's scale.
template <int G, int CH>  // D = 64 * CH
void decode_item_i8_vnni(const int8_t* cache, const int64_t* table, int64_t first, int64_t skip, int64_t len,
                         const float* qf, float* scores, float* acc, int64_t h0, int64_t h1, int64_t BS,
                         int64_t token_stride, int64_t block_stride, int64_t half) {
  constexpr int D = 64 * CH;
  constexpr int W = 2 * CH;  // 32-element (int16) chunks per row
  constexpr int64_t RW = D + 2;
  for (int64_t kh = h0; kh < h1; ++kh) {
    const int64_t hb = (kh - h0) * G;
    alignas(64) int16_t qi[G][D];
    float qs[G];
    for (int g = 0; g < G; ++g) {
      const float* x = qf + (hb + g) * D;
      float amax = 0.0f;
      for (int i = 0; i < D; ++i) amax = std::max(amax, std::fabs(x[i]));
      const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
      for (int i = 0; i < D; ++i)
        qi[g][i] = static_cast<int16_t>(std::max(-32767.0f, std::min(32767.0f, std::nearbyint(x[i] * inv))));
      qs[g] = amax / 32767.0f;
    }
    for (int64_t s0 = 0; s0 < len; s0 += 8) {
      const int64_t n = std::min<int64_t>(8, len - s0);
      const int64_t p0 = first + s0;  // a multiple of 8: the 8 positions share a block
      const int8_t* kb = cache + table[p0 / BS] * block_stride + (p0 % BS) * token_stride + kh * RW;
      if (kh == h0)
        for (int64_t t = 0; t < 8 && s0 + kQ8PrefetchAhead + t < len; ++t)
          prefetch_q8_rows(cache, table, first + s0 + kQ8PrefetchAhead + t, h0, h1, RW, BS, token_stride,
                           block_stride, half);
      __m512i kw[8][W];
      alignas(32) float ks[8];
      for (int t = 0; t < 8; ++t) {
        ks[t] = t < n ? bf16_bytes_to_float(kb + t * token_stride + D) : 0.0f;
        for (int c = 0; c < W; ++c)
          kw[t][c] = t < n ? _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kb + t * token_stride + 32 * c)))
                           : _mm512_setzero_si512();
      }
      const __m256 kscale = _mm256_load_ps(ks);
      for (int g = 0; g < G; ++g) {
        __m512 part[8];
        for (int t = 0; t < 8; ++t) {
          __m512i dot = _mm512_setzero_si512();
          for (int c = 0; c < W; ++c) dot = _mm512_dpwssd_epi32(dot, kw[t][c], _mm512_load_si512(qi[g] + 32 * c));
          part[t] = _mm512_cvtepi32_ps(dot);
        }
        float sums[8];
        _mm256_storeu_ps(sums, _mm256_mul_ps(hsum8(part), _mm256_mul_ps(kscale, _mm256_set1_ps(qs[g]))));
        for (int64_t t = 0; t < n; ++t) scores[(hb + g) * len + s0 + t] = sums[t];
      }
    }
  }
  softmax_skipping(scores, (h1 - h0) * G, len, skip, softmax_avx512);
  sum_values<Vec16, G, D>(cache, table, first, skip, len, scores, acc, h0, h1, BS, token_stride, block_stride, half);
}
#define ZILI_Q8_ITEM decode_item_i8_vnni
#define ZILI_Q8_D_UNIT 64
#elif defined(__AVX2__) && !defined(__AVX512F__)
// AVX2: scores in fp32 FMAs on 8-lane vectors, each key chunk converted once and used by the G heads
// (the integer route of the AVX-512 kernel, vpmaddwd on an int16 query, is not written for this level
// yet), values through sum_values as in the AVX-512 kernels.
inline void softmax_avx2(float* x, int64_t n) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) mx = x[i] > mx ? x[i] : mx;
  softmax_tail(x, n, mx);
}

template <int G, int CH>  // D = 64 * CH
void decode_item_i8_avx2(const int8_t* cache, const int64_t* table, int64_t first, int64_t skip, int64_t len,
                         const float* qf, float* scores, float* acc, int64_t h0, int64_t h1, int64_t BS,
                         int64_t token_stride, int64_t block_stride, int64_t half) {
  constexpr int D = 64 * CH;
  constexpr int VC = D / 8;  // 8-lane chunks per row
  constexpr int64_t RW = D + 2;
  for (int64_t kh = h0; kh < h1; ++kh) {
    const int64_t hb = (kh - h0) * G;
    const float* qh = qf + hb * D;
    for (int64_t s0 = 0; s0 < len; s0 += 8) {
      const int64_t n = std::min<int64_t>(8, len - s0);
      const int64_t p0 = first + s0;
      const int8_t* kb = cache + table[p0 / BS] * block_stride + (p0 % BS) * token_stride + kh * RW;
      if (kh == h0)
        for (int64_t t = 0; t < 8 && s0 + kQ8PrefetchAhead + t < len; ++t)
          prefetch_q8_rows(cache, table, first + s0 + kQ8PrefetchAhead + t, h0, h1, RW, BS, token_stride,
                           block_stride, half);
      alignas(32) float ks[8];
      __m256 part[G][8];
      for (int t = 0; t < 8; ++t) {
        __m256 a[G];
        for (int g = 0; g < G; ++g) a[g] = _mm256_setzero_ps();
        if (t < n) {
          const int8_t* k = kb + t * token_stride;
          for (int c = 0; c < VC; ++c) {
            const __m256 kc = load8(k + 8 * c);
            for (int g = 0; g < G; ++g) a[g] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + g * D + 8 * c), kc, a[g]);
          }
        }
        ks[t] = t < n ? bf16_bytes_to_float(kb + t * token_stride + D) : 0.0f;
        for (int g = 0; g < G; ++g) part[g][t] = a[g];
      }
      const __m256 kscale = _mm256_load_ps(ks);
      for (int g = 0; g < G; ++g) {
        float sums[8];
        _mm256_storeu_ps(sums, _mm256_mul_ps(hsum8x8(part[g]), kscale));
        for (int64_t t = 0; t < n; ++t) scores[(hb + g) * len + s0 + t] = sums[t];
      }
    }
  }
  softmax_skipping(scores, (h1 - h0) * G, len, skip, softmax_avx2);
  sum_values<Vec8, G, D>(cache, table, first, skip, len, scores, acc, h0, h1, BS, token_stride, block_stride, half);
}
#define ZILI_Q8_ITEM decode_item_i8_avx2
#endif

#if defined(ZILI_Q8_ITEM)
using Q8ItemFn = void (*)(const int8_t*, const int64_t*, int64_t, int64_t, int64_t, const float*, float*, float*,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int64_t);

template <int CH>
Q8ItemFn q8_item_for_group(int64_t G) {
  switch (G) {
    case 1: return ZILI_Q8_ITEM<1, CH>;
    case 2: return ZILI_Q8_ITEM<2, CH>;
    case 3: return ZILI_Q8_ITEM<3, CH>;
    case 4: return ZILI_Q8_ITEM<4, CH>;
    case 5: return ZILI_Q8_ITEM<5, CH>;
    case 6: return ZILI_Q8_ITEM<6, CH>;
    case 7: return ZILI_Q8_ITEM<7, CH>;
    case 8: return ZILI_Q8_ITEM<8, CH>;
    default: return nullptr;
  }
}

// The specialised int8 kernel for (G, D), or nullptr (the generic paths then run). At the AVX-512
// level it quantizes the query (to int16), which only a bf16 / fp16 query (8 / 11 significant bits)
// takes: a float32 one keeps the exact generic path.
Q8ItemFn q8_item(int64_t G, int64_t D, int64_t BS, bool float32_query) {
  if (BS % 8 != 0) return nullptr;
#if defined(__AVX512F__)
  if (float32_query) return nullptr;
#else
  (void)float32_query;
#endif
  if (D == 64) return q8_item_for_group<1>(G);
  if (D == 128) return q8_item_for_group<2>(G);
  return nullptr;
}
#endif

template <typename T, typename C>
void paged_decode_kernel(const T* q, const C* cache, const int64_t* tables, const int64_t* lens, T* out,
                         int64_t B, int64_t H, int64_t D, int64_t NB, int64_t BS, int64_t KVH, int64_t W,
                         float scale, int64_t window) {
  const int64_t G = H / KVH;
  const int64_t RW = D + CacheRow<C>::kExtra;      // elements of one cache row (one head of one position)
  const int64_t token_stride = KVH * RW;           // between positions inside a block
  const int64_t block_stride = BS * token_stride;  // between blocks
  const int64_t half = NB * block_stride;          // keys -> values
  // A work item is a sequence with all its KV heads (each position's keys are one contiguous row),
  // or, when there are fewer sequences than threads, one KV head of a sequence.
  const int64_t split = B >= at::get_num_threads() ? 1 : KVH;
  // Bytes of keys and values the call reads (every sequence at its full length: an upper bound).
  int64_t kv_bytes = 0;
  for (int64_t b = 0; b < B; ++b) kv_bytes += lens[b] * 2 * token_stride * static_cast<int64_t>(sizeof(C));
  const int64_t grain = kv_bytes < ZILI_OPS_NS::parallel_min_bytes.load() ? B * split : 1;
#if defined(__AVX512BF16__)
  const Bf16ItemFn bf16_fn =
      std::is_same<T, c10::BFloat16>::value && std::is_same<C, T>::value ? bf16_item(G, D, BS) : nullptr;
#endif
#if defined(ZILI_Q8_ITEM)
  const Q8ItemFn q8_fn = std::is_same<C, int8_t>::value ? q8_item(G, D, BS, std::is_same<T, float>::value) : nullptr;
#endif
  at::parallel_for(0, B * split, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), row(KVH * D), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / split;
      const int64_t h0 = split == 1 ? 0 : item % split, h1 = split == 1 ? KVH : h0 + 1;  // KV heads [h0, h1)
      const int64_t nh = (h1 - h0) * G;       // query heads of this item
      const int64_t qh0 = h0 * G;             // first of them
      const int64_t total = lens[b];
      // A sliding window attends to the last `window` positions only: [first, total).
      const int64_t first = window > 0 && total > window ? total - window : 0;
      const int64_t len = total - first;
      T* o = out + (b * H + qh0) * D;
      if (total <= 0) {  // a padded row: zeros
        for (int64_t i = 0; i < nh * D; ++i) o[i] = T(0.0f);
        continue;
      }
#if defined(__AVX512BF16__)
      if constexpr (std::is_same<T, c10::BFloat16>::value && std::is_same<C, T>::value) {
        if (bf16_fn != nullptr) {
          const int64_t aligned = first & ~int64_t{7};
          scores.resize(nh * (total - aligned));
          bf16_fn(cache, tables + b * W, aligned, first - aligned, total - aligned, q + (b * H + qh0) * D, scale,
                  scores.data(), acc.data(), h0, h1, BS, token_stride, block_stride, half);
          for (int64_t i = 0; i < nh * D; ++i) o[i] = T(acc[i]);
          continue;
        }
      }
#endif
      load_row(q + (b * H + qh0) * D, qf.data(), nh * D);
      for (int64_t i = 0; i < nh * D; ++i) qf[i] *= scale;
#if defined(ZILI_Q8_ITEM)
      if constexpr (std::is_same<C, int8_t>::value) {
        if (q8_fn != nullptr) {
          const int64_t aligned = first & ~int64_t{7};
          scores.resize(nh * (total - aligned));
          q8_fn(cache, tables + b * W, aligned, first - aligned, total - aligned, qf.data(), scores.data(),
                acc.data(), h0, h1, BS, token_stride, block_stride, half);
          for (int64_t i = 0; i < nh * D; ++i) o[i] = T(acc[i]);
          continue;
        }
      }
#endif
      scores.assign(nh * len, 0.0f);
      const int64_t* table = tables + b * W;
#if defined(__AVX512F__)
      if (decode_item_avx512(cache, table, first, len, qf.data(), scores.data(), acc.data(), h0, h1, G, D, BS,
                             token_stride, block_stride, half)) {
        for (int64_t i = 0; i < nh * D; ++i) o[i] = T(acc[i]);
        continue;
      }
#endif
      for (int64_t s = 0; s < len; ++s) {
        const int64_t p = first + s;
        const C* k = cache + table[p / BS] * block_stride + (p % BS) * token_stride + h0 * RW;
        for (int64_t j = 0; j < h1 - h0; ++j) CacheRow<C>::load(k + j * RW, row.data() + j * D, D);
        for (int64_t h = 0; h < nh; ++h) {
          const float* qh = qf.data() + h * D;
          const float* kh = row.data() + (h / G) * D;
          float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qh[d] * kh[d];
          scores[h * len + s] = dot;
        }
      }
      for (int64_t h = 0; h < nh; ++h) {
        float* sh = scores.data() + h * len;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < len; ++s) mx = sh[s] > mx ? sh[s] : mx;
        softmax_tail(sh, len, mx);
      }
      std::fill(acc.begin(), acc.begin() + nh * D, 0.0f);
      for (int64_t s = 0; s < len; ++s) {
        const int64_t p = first + s;
        const C* v = cache + half + table[p / BS] * block_stride + (p % BS) * token_stride + h0 * RW;
        for (int64_t j = 0; j < h1 - h0; ++j) CacheRow<C>::load(v + j * RW, row.data() + j * D, D);
        for (int64_t h = 0; h < nh; ++h) {
          const float p = scores[h * len + s];
          const float* vh = row.data() + (h / G) * D;
          float* ah = acc.data() + h * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ah[d] += p * vh[d];
        }
      }
      for (int64_t i = 0; i < nh * D; ++i) o[i] = T(acc[i]);
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& kv_cache, const at::Tensor& block_tables,
                        const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "paged_decode: bad shapes");
  const auto kv_type = kv_cache.scalar_type();
  const bool quantized = kv_type == at::kChar || kv_type == at::kFloat8_e4m3fn;
  TORCH_CHECK(quantized || q.scalar_type() == kv_type, "paged_decode: q and kv_cache dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "paged_decode: block_tables and seq_lens must be int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = kv_cache.size(1), BS = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D + (quantized ? 2 : 0) && H % KVH == 0, "paged_decode: head sizes do not match");
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "paged_decode: batch sizes differ");
  TORCH_CHECK(window >= 0, "paged_decode: window must be >= 0 (0: full context), got ", window);
  auto qc = q.contiguous();
  auto cache = kv_cache.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = at::empty_like(qc);
  const int64_t W = tables.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto* cache_ptr) {
      paged_decode_kernel(qc.data_ptr<scalar_t>(), cache_ptr, tables.data_ptr<int64_t>(), lens.data_ptr<int64_t>(),
                          out.data_ptr<scalar_t>(), B, H, D, NB, BS, KVH, W, static_cast<float>(scale), window);
    };
    if (kv_type == at::kChar) {
      run(cache.data_ptr<int8_t>());
    } else if (kv_type == at::kFloat8_e4m3fn) {
      run(cache.data_ptr<c10::Float8_e4m3fn>());
    } else {
      run(cache.data_ptr<scalar_t>());
    }
  });
  return out;
}

}  // namespace

// One library per instruction-set level (zili.kernels.cpu_isa): ZILI_OPS_NS names its namespace.
#ifndef ZILI_OPS_NS
#error "ZILI_OPS_NS (the operator namespace of this build) must be defined"
#endif
#define ZILI_ATTN_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define ZILI_ATTN_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

ZILI_ATTN_FRAGMENT(ZILI_OPS_NS, m) {
  m.def("paged_decode(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale, "
        "int window=0) -> Tensor");
}

ZILI_ATTN_IMPL(ZILI_OPS_NS, CPU, m) { m.impl("paged_decode", &paged_decode); }
