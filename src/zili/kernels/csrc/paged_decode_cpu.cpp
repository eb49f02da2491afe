// Paged decode attention for CPUs: one query token per sequence, keys and values read in place
// from the paged KV cache (no gathered copy), float32 math.
//
//   q            [B, H, D]                    float32 / bfloat16 / float16
//   kv_cache     [2, NB, BS, KVH, D]          same dtype family (index 0 keys, 1 values)
//   block_tables [B, W] int64, seq_lens [B] int64 (context length including the new token)
//   returns      [B, H, D] in q's dtype
//
// Work is split over sequences (over (sequence, KV head) pairs when there are fewer sequences than
// threads). Each position's key and value rows are loaded once, converted to float32, and used by
// every query head that reads them (grouped-query attention). Per item: scores for every context
// position, a softmax per query head, then the value-weighted sum.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <algorithm>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

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

// One (sequence, KV-head range) item with D a multiple of 16: keys are read 8 positions at a time
// and scored against the G query heads of their KV head while in registers; values are summed into
// per-head accumulators held in registers. Returns false when D does not suit (scalar path then).
template <typename T>
bool decode_item_avx512(const T* cache, const int64_t* table, int64_t len, const float* qf, float* scores,
                        float* acc, int64_t h0, int64_t h1, int64_t G, int64_t D, int64_t BS,
                        int64_t token_stride, int64_t block_stride, int64_t half) {
  constexpr int kMaxChunks = 8;  // D up to 128
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
        for (int64_t t = 0; t < n; ++t) {
          const int64_t s = s0 + t;
          const T* k = cache + table[s / BS] * block_stride + (s % BS) * token_stride + kh * D;
          for (int64_t c = 0; c < chunks; ++c) {
            const __m512 kc = load16(k + 16 * c);
            for (int64_t g = 0; g < ng; ++g)
              part[g][t] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + (hb + g0 + g) * D + 16 * c), kc, part[g][t]);
          }
        }
        for (int64_t g = 0; g < ng; ++g) {
          float sums[8];
          _mm256_storeu_ps(sums, hsum8(part[g]));
          for (int64_t t = 0; t < n; ++t) scores[(hb + g0 + g) * len + s0 + t] = sums[t];
        }
      }
    }
  }
  for (int64_t h = 0; h < nh; ++h) {  // softmax per query head
    float* sh = scores + h * len;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < len; ++s) mx = sh[s] > mx ? sh[s] : mx;
    softmax_tail(sh, len, mx);
  }
  for (int64_t kh = h0; kh < h1; ++kh) {  // values: accumulators in registers per query head
    const int64_t hb = (kh - h0) * G;
    __m512 out[8][kMaxChunks];
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < chunks; ++c) out[g][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < len; ++s) {
      const T* v = cache + half + table[s / BS] * block_stride + (s % BS) * token_stride + kh * D;
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 vc = load16(v + 16 * c);
        for (int64_t g = 0; g < G; ++g)
          out[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(hb + g) * len + s]), vc, out[g][c]);
      }
    }
    for (int64_t g = 0; g < G; ++g)
      for (int64_t c = 0; c < chunks; ++c) _mm512_storeu_ps(acc + (hb + g) * D + 16 * c, out[g][c]);
  }
  return true;
}
#endif

template <typename T>
void paged_decode_kernel(const T* q, const T* cache, const int64_t* tables, const int64_t* lens, T* out,
                         int64_t B, int64_t H, int64_t D, int64_t NB, int64_t BS, int64_t KVH, int64_t W,
                         float scale) {
  const int64_t G = H / KVH;
  const int64_t token_stride = KVH * D;            // between positions inside a block
  const int64_t block_stride = BS * token_stride;  // between blocks
  const int64_t half = NB * block_stride;          // keys -> values
  // A work item is a sequence with all its KV heads (each position's keys are one contiguous row),
  // or, when there are fewer sequences than threads, one KV head of a sequence.
  const int64_t split = B >= at::get_num_threads() ? 1 : KVH;
  at::parallel_for(0, B * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), row(token_stride), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / split;
      const int64_t h0 = split == 1 ? 0 : item % split, h1 = split == 1 ? KVH : h0 + 1;  // KV heads [h0, h1)
      const int64_t nh = (h1 - h0) * G;       // query heads of this item
      const int64_t qh0 = h0 * G;             // first of them
      const int64_t width = (h1 - h0) * D;    // elements of a key row this item reads
      const int64_t len = lens[b];
      T* o = out + (b * H + qh0) * D;
      if (len <= 0) {  // a padded row: zeros
        for (int64_t i = 0; i < nh * D; ++i) o[i] = T(0.0f);
        continue;
      }
      load_row(q + (b * H + qh0) * D, qf.data(), nh * D);
      for (int64_t i = 0; i < nh * D; ++i) qf[i] *= scale;
      scores.assign(nh * len, 0.0f);
      const int64_t* table = tables + b * W;
#if defined(__AVX512F__)
      if (decode_item_avx512(cache, table, len, qf.data(), scores.data(), acc.data(), h0, h1, G, D, BS,
                             token_stride, block_stride, half)) {
        for (int64_t i = 0; i < nh * D; ++i) o[i] = T(acc[i]);
        continue;
      }
#endif
      for (int64_t s = 0; s < len; ++s) {
        const T* k = cache + table[s / BS] * block_stride + (s % BS) * token_stride + h0 * D;
        load_row(k, row.data(), width);
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
        const T* v = cache + half + table[s / BS] * block_stride + (s % BS) * token_stride + h0 * D;
        load_row(v, row.data(), width);
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
                        const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv_cache.dim() == 5 && kv_cache.size(0) == 2, "paged_decode: bad shapes");
  TORCH_CHECK(q.scalar_type() == kv_cache.scalar_type(), "paged_decode: q and kv_cache dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong,
              "paged_decode: block_tables and seq_lens must be int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t NB = kv_cache.size(1), BS = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D && H % KVH == 0, "paged_decode: head sizes do not match");
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "paged_decode: batch sizes differ");
  auto qc = q.contiguous();
  auto cache = kv_cache.contiguous();
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = at::empty_like(qc);
  const int64_t W = tables.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qc.scalar_type(), "paged_decode", [&] {
    paged_decode_kernel<scalar_t>(qc.data_ptr<scalar_t>(), cache.data_ptr<scalar_t>(), tables.data_ptr<int64_t>(),
                                  lens.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), B, H, D, NB, BS, KVH, W,
                                  static_cast<float>(scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(zili_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor seq_lens, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(zili_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
