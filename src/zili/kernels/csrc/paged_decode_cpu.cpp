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
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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
        float sum = 0.0f;
        for (int64_t s = 0; s < len; ++s) {
          sh[s] = std::exp(sh[s] - mx);
          sum += sh[s];
        }
        const float inv = 1.0f / sum;
        for (int64_t s = 0; s < len; ++s) sh[s] *= inv;
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
