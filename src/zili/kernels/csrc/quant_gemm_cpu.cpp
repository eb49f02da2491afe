// Packed 4-bit and 8-bit weight x activation products for CPU decode (a few rows at a time).
//
// The same source is compiled once per instruction-set level, each as its own library with its own
// compiler flags (zili.kernels.cpu_isa): ZILI_ISA_AVX512 (AVX512F/BW/VL/DQ + VNNI + BF16), ZILI_ISA_AVX2
// (AVX2 + FMA + F16C), ZILI_ISA_NEON (AArch64 + the dot-product extension) or none (portable C++).
// ZILI_OPS_NS names the operator namespace of the build, so a machine's levels can be loaded side by
// side (the tests run every path the machine executes). With ZILI_STANDALONE the file compiles without
// torch (no gemm driver, no operator registration): tests/native/quant_gemm_harness.cpp includes it to
// run the NEON and portable group products under qemu-user.
//
// Weights are packed in groups of R = 16 output rows interleaved (N padded to a multiple of 16, K to
// KB = ceil(K/32) blocks of 32), so that one vector holds the same input features of 16 rows: a
// broadcast activation quad times it gives 16 row sums at once, and no horizontal reduction is
// needed (the idea of llama.cpp's repacked Q4_0x8 kernels; our own layout):
//   q4: qs uint8 [NG, KB, 4, R, 4]: octet o of a block, row r, byte t = code[8o+t] | code[8o+4+t] << 4
//       (codes 0..15); dm float16 [NG, KB, 2, R] = scales then mins: w = d * code + m
//       (Q4_0: m = -8d; Q4_1: its own min; Q4_K: sub-block scale and min).
//   q8: qs uint8 [NG, KB, 8, R, 4] = code + 128 (codes -127..127, quad j = elements 4j..4j+3);
//       d float16 [NG, KB, R]: w = d * code (GGUF Q8_0's per-block scale).
//
// Activations are quantized per 32-block to int8 with one fp32 scale (llama.cpp's Q8_1 scheme), and
// the products run as integer dot products:
//   sum_i w_i x_i = d * xd * sum_i code_i xq_i  (+ m * xd * sum_i xq_i for q4).
// AVX-512: vpdpbusd (VNNI; u8 x s8 -> s32; q8 codes carry +128, taken off with 128 * sum xq);
// AVX2: vpmaddubsw (u8 x s8 -> s16 pairs) + vpmaddwd; q8 moves the weight's sign onto the activation
// so that the unsigned operand is |code| (vpmaddubsw would saturate on code + 128). Every tile of 1-4
// activation rows is one pass over a group's blocks, both 8-row halves per activation broadcast, with
// the weights prefetched a fixed distance ahead (kPrefetchBytes).
// NEON: sdot (s8 x s8 -> s32, 4 per lane): a 16-byte weight vector is one quad of 4 output rows; q8
// codes xor 0x80 are the signed codes.
//
//   x [M, K] float32 or bfloat16 -> y [M, N] in x's dtype. Work is split over row groups.

#ifndef ZILI_STANDALONE
#include <ATen/ATen.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(ZILI_ISA_AVX512) || defined(ZILI_ISA_AVX2)
#include <immintrin.h>
#endif
#if defined(ZILI_ISA_NEON)
#include <arm_neon.h>
#endif

#ifndef ZILI_OPS_NS
#error "ZILI_OPS_NS (the operator namespace of this build) must be defined"
#endif

// The least work (bytes of packed weights x activation rows, or bytes of KV rows for the attention
// kernel in paged_decode_cpu.cpp) that a kernel splits over the intra-op threads; less runs on the calling
// thread alone. A single-stream decode step is ~150 products of 0.2-1 MB and 30 attention calls:
// at two threads each parallel region saves a few microseconds of a 6-30 us product, and costs a
// fork and a join that wait for the other thread to be scheduled, which on a shared machine can take
// a scheduler time slice (milliseconds). Set per level by `set_parallel_min_bytes` (zili.kernels.cpu_isa);
// named by the level's namespace, so the three builds in one process keep their own value.
namespace ZILI_OPS_NS {
std::atomic<int64_t> parallel_min_bytes{0};
}

namespace {

constexpr int64_t QK = 32;        // elements per block
constexpr int64_t R = 16;         // interleaved output rows
constexpr int64_t kRowTile = 4;   // activation rows whose accumulators stay in registers together

#if defined(ZILI_ISA_AVX512)
constexpr int64_t kIsaLevel = 2;
#elif defined(ZILI_ISA_AVX2)
constexpr int64_t kIsaLevel = 1;
#elif defined(ZILI_ISA_NEON)
constexpr int64_t kIsaLevel = 3;
#else
constexpr int64_t kIsaLevel = 0;
#endif

inline float half_to_float(uint16_t h) {
#if defined(ZILI_ISA_AVX512) || defined(ZILI_ISA_AVX2)
  return _cvtsh_ss(h);
#elif defined(__aarch64__)
  __fp16 v;
  std::memcpy(&v, &h, sizeof(h));
  return static_cast<float>(v);
#else
  c10::Half v;
  std::memcpy(&v, &h, sizeof(h));
  return static_cast<float>(v);
#endif
}

inline float to_float(float x) { return x; }
#ifndef ZILI_STANDALONE
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
#endif

// Activations quantized per block: q [M, KB*32] int8, d [M, KB] scale, s [M, KB] = d * sum(q),
// isum [M, KB] = sum(q).
struct QuantizedActs {
  int64_t M = 0, KB = 0;
  std::vector<int8_t> q;
  std::vector<float> d, s;
  std::vector<int32_t> isum;
};

#if defined(ZILI_ISA_AVX512) || defined(ZILI_ISA_AVX2)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// One whole block of 32 activations -> int8 codes, scale, d * sum and sum: the scalar loop below,
// vectorised, with the same arithmetic (x * (127 / amax), rounded half to even), so the same codes.
template <typename T>
inline void quantize_block(const T* x, int8_t* q, float& d_out, float& s_out, int32_t& isum_out) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 v[4];
  __m256 mx = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) {
    v[i] = load8(x + 8 * i);
    mx = _mm256_max_ps(_mm256_and_ps(v[i], absmask), mx);  // a NaN lane keeps mx, as std::max does below
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm_cvtss_f32(m4);
  const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
  const __m256 idv = _mm256_set1_ps(id);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i)
    qi[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  // |x * id| <= 127 (amax is the block's largest magnitude), so the saturating packs are exact.
  const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
  // per 128-bit lane the packs leave dwords (a0-3, b0-3, c0-3, d0-3 | a4-7, b4-7, c4-7, d4-7): restore order
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q),
                      _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  const int32_t sum = _mm_cvtsi128_si32(s4);
  d_out = d;
  s_out = d * static_cast<float>(sum);
  isum_out = sum;
}
#endif

template <typename T>
QuantizedActs quantize_acts(const T* x, int64_t M, int64_t K) {
  QuantizedActs a;
  a.M = M;
  a.KB = (K + QK - 1) / QK;
  a.q.assign(M * a.KB * QK, 0);
  a.d.assign(M * a.KB, 0.0f);
  a.s.assign(M * a.KB, 0.0f);
  a.isum.assign(M * a.KB, 0);
  float buf[QK];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < a.KB; ++b) {
      const int64_t k0 = b * QK, n = std::min<int64_t>(QK, K - k0);
#if defined(ZILI_ISA_AVX512) || defined(ZILI_ISA_AVX2)
      if (n == QK) {
        quantize_block(x + m * K + k0, a.q.data() + (m * a.KB + b) * QK, a.d[m * a.KB + b], a.s[m * a.KB + b],
                       a.isum[m * a.KB + b]);
        continue;
      }
#endif
      float amax = 0.0f;
      for (int64_t i = 0; i < QK; ++i) {
        buf[i] = i < n ? to_float(x[m * K + k0 + i]) : 0.0f;
        amax = std::max(amax, std::fabs(buf[i]));
      }
      const float d = amax / 127.0f, id = amax > 0.0f ? 127.0f / amax : 0.0f;
      int8_t* q = a.q.data() + (m * a.KB + b) * QK;
      int32_t sum = 0;
      for (int64_t i = 0; i < QK; ++i) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(buf[i] * id));
        q[i] = static_cast<int8_t>(std::max(-127, std::min(127, v)));
        sum += q[i];
      }
      a.d[m * a.KB + b] = d;
      a.s[m * a.KB + b] = d * static_cast<float>(sum);
      a.isum[m * a.KB + b] = sum;
    }
  }
  return a;
}

inline int32_t load_quad(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

#if defined(ZILI_ISA_AVX2)
// How far ahead of the block being multiplied the AVX2 kernels prefetch its weights (codes; the scales,
// a quarter as dense, the same number of blocks ahead). Measured on a Zen 3 (AVX2, 2 threads) over a
// whole SmolLM2-135M decode step (benchmarks/notes/cpu-isa.md): 1-2 KiB ahead cut the int4 products'
// time by 20-25% and the int8 LM head's by ~20% at one activation row; 4 KiB did no better.
constexpr int64_t kPrefetchBytes = 2048;

// Prefetch the block kPrefetchBytes / block_bytes blocks ahead of `wb` (codes) and `sb` (scales).
// Past the end of the weight this touches the next tensor or nothing: a prefetch never faults.
template <int64_t block_bytes>
inline void prefetch_block(const uint8_t* wb, const uint16_t* sb) {
  const char* p = reinterpret_cast<const char*>(wb) + kPrefetchBytes;
  for (int64_t l = 0; l < block_bytes; l += 64) _mm_prefetch(p + l, _MM_HINT_T0);
  // scales: 64 (q4) or 32 (q8) bytes a block, so the same blocks ahead is kPrefetchBytes / 4 or / 16
  _mm_prefetch(reinterpret_cast<const char*>(sb) + kPrefetchBytes * (block_bytes == 256 ? 64 : 32) / block_bytes,
               _MM_HINT_T0);
}
#endif


#if defined(ZILI_ISA_AVX2)
// Ends a value's live range in a register here: an empty asm that "reads and writes" v. Integer adds
// are associative, so without it GCC reorders the row loop below into a tree that issues every
// vpmaddubsw of a block before the first add, keeps ~30 products live in 16 registers and spills them
// to the stack (130 stack accesses per 4-row block in rows_avx2<true, 4>, measured with objdump). Pinning
// each row's running sums once per weight vector keeps the products to one or two registers.
#define ZILI_PIN(v) __asm__ volatile("" : "+x"(v))

// The product of one group for MT activation rows (MT a constant, so that the accumulators stay in
// registers), both 8-row halves of the group (one 256-bit register each) in one pass over its blocks:
// each weight vector is prepared once (q4: an octet's low and high nibbles unpacked; q8: the code's
// sign moved onto the activation, |code| kept) and each activation quad is broadcast once, for the
// 16 output rows. The weights are prefetched kPrefetchBytes ahead. Per block the integer sums are
// exact (q4: 8 products of <= 2 * 15 * 127 fit in int16, one vpmaddwd a block; q8: a pair of
// |code| * x products can reach 2 * 127 * 127, widened to int32 per quad), then scaled in fp32.
// MT = 1 is single-stream decode (bound by memory bandwidth), MT 2-4 the tiles of larger batches.
template <bool Q4, int MT>
void rows_avx2(const uint8_t* wq, const uint16_t* wd, const QuantizedActs& a, int64_t m0, float* out) {
  const int64_t KB = a.KB;
  constexpr int64_t block_bytes = Q4 ? 4 * R * 4 : 8 * R * 4, block_scales = Q4 ? 2 * R : R;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const int8_t* xrow[MT];
  const float* xd[MT];
  const float* xs[MT];
  for (int r = 0; r < MT; ++r) {
    xrow[r] = a.q.data() + (m0 + r) * KB * QK;
    xd[r] = a.d.data() + (m0 + r) * KB;
    xs[r] = a.s.data() + (m0 + r) * KB;
  }
  __m256 acc0[MT], acc1[MT];
  for (int r = 0; r < MT; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* wb = wq + b * block_bytes;
    const uint16_t* sb = wd + b * block_scales;
    prefetch_block<block_bytes>(wb, sb);
    __m256i s0[MT], s1[MT];
    for (int r = 0; r < MT; ++r) s0[r] = s1[r] = _mm256_setzero_si256();
    if constexpr (Q4) {
      for (int o = 0; o < 4; ++o) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + o * R * 4));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + o * R * 4 + 32));
        const __m256i lo0 = _mm256_and_si256(v0, low4), hi0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4);
        const __m256i lo1 = _mm256_and_si256(v1, low4), hi1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4);
        for (int r = 0; r < MT; ++r) {
          const int8_t* xq = xrow[r] + b * QK;
          const __m256i xl = _mm256_set1_epi32(load_quad(xq + 8 * o)), xh = _mm256_set1_epi32(load_quad(xq + 8 * o + 4));
          s0[r] = _mm256_add_epi16(s0[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, xl), _mm256_maddubs_epi16(hi0, xh)));
          s1[r] = _mm256_add_epi16(s1[r], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, xl), _mm256_maddubs_epi16(hi1, xh)));
        }
        for (int r = 0; r < MT; ++r) { ZILI_PIN(s0[r]); ZILI_PIN(s1[r]); }
      }
      for (int r = 0; r < MT; ++r) { s0[r] = _mm256_madd_epi16(s0[r], ones); s1[r] = _mm256_madd_epi16(s1[r], ones); }
    } else {
      for (int j = 0; j < 8; ++j) {
        const __m256i g0 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * R * 4)), flip);
        const __m256i g1 = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * R * 4 + 32)), flip);
        const __m256i a0 = _mm256_sign_epi8(g0, g0), a1 = _mm256_sign_epi8(g1, g1);
        for (int r = 0; r < MT; ++r) {
          const __m256i x = _mm256_set1_epi32(load_quad(xrow[r] + b * QK + 4 * j));
          s0[r] = _mm256_add_epi32(s0[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(x, g0)), ones));
          s1[r] = _mm256_add_epi32(s1[r], _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(x, g1)), ones));
        }
        for (int r = 0; r < MT; ++r) { ZILI_PIN(s0[r]); ZILI_PIN(s1[r]); }
      }
    }
    const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb)));
    const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 8)));
    for (int r = 0; r < MT; ++r) {
      const __m256 xdv = _mm256_set1_ps(xd[r][b]);
      acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0[r]), _mm256_mul_ps(d0, xdv), acc0[r]);
      acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1[r]), _mm256_mul_ps(d1, xdv), acc1[r]);
    }
    if constexpr (Q4) {
      const __m256 n0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + R)));
      const __m256 n1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + R + 8)));
      for (int r = 0; r < MT; ++r) {
        const __m256 xsv = _mm256_set1_ps(xs[r][b]);
        acc0[r] = _mm256_fmadd_ps(n0, xsv, acc0[r]);
        acc1[r] = _mm256_fmadd_ps(n1, xsv, acc1[r]);
      }
    }
  }
  for (int r = 0; r < MT; ++r) { _mm256_storeu_ps(out + r * R, acc0[r]); _mm256_storeu_ps(out + r * R + 8, acc1[r]); }
}
#endif

// One group of R rows against activation rows [m0, m0 + mt): out[r * R + i] = row i's result.
// Q4: the q4 format, else q8. wq/wd: this group's codes and scales.
template <bool Q4>
void group_dot(const uint8_t* wq, const uint16_t* wd, const QuantizedActs& a, int64_t m0, int64_t mt, float* out) {
  const int64_t KB = a.KB;
  constexpr int64_t block_bytes = Q4 ? 4 * R * 4 : 8 * R * 4;  // 256 / 512
  constexpr int64_t block_scales = Q4 ? 2 * R : R;
#if defined(ZILI_ISA_AVX512)
  __m512 acc[kRowTile];
  for (int64_t r = 0; r < mt; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* wb = wq + b * block_bytes;
    const uint16_t* sb = wd + b * block_scales;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb)));
    if constexpr (Q4) {
      const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + R)));
      __m512i lo[4], hi[4];
      for (int o = 0; o < 4; ++o) {
        const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(wb + o * R * 4));
        lo[o] = _mm512_and_si512(v, low4);
        hi[o] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
      }
      for (int64_t r = 0; r < mt; ++r) {
        const int64_t row = m0 + r;
        const int8_t* xq = a.q.data() + (row * KB + b) * QK;
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        for (int o = 0; o < 4; ++o) {
          s0 = _mm512_dpbusd_epi32(s0, lo[o], _mm512_set1_epi32(load_quad(xq + 8 * o)));
          s1 = _mm512_dpbusd_epi32(s1, hi[o], _mm512_set1_epi32(load_quad(xq + 8 * o + 4)));
        }
        const __m512 p = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
        acc[r] = _mm512_fmadd_ps(p, _mm512_mul_ps(dv, _mm512_set1_ps(a.d[row * KB + b])), acc[r]);
        acc[r] = _mm512_fmadd_ps(mv, _mm512_set1_ps(a.s[row * KB + b]), acc[r]);
      }
    } else {
      __m512i w[8];
      for (int j = 0; j < 8; ++j) w[j] = _mm512_loadu_si512(reinterpret_cast<const void*>(wb + j * R * 4));
      for (int64_t r = 0; r < mt; ++r) {
        const int64_t row = m0 + r;
        const int8_t* xq = a.q.data() + (row * KB + b) * QK;
        __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
        for (int j = 0; j < 8; j += 2) {
          s0 = _mm512_dpbusd_epi32(s0, w[j], _mm512_set1_epi32(load_quad(xq + 4 * j)));
          s1 = _mm512_dpbusd_epi32(s1, w[j + 1], _mm512_set1_epi32(load_quad(xq + 4 * j + 4)));
        }
        // codes carry +128: take 128 * sum(xq) off
        const __m512i isum = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(128 * a.isum[row * KB + b]));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dv, _mm512_set1_ps(a.d[row * KB + b])), acc[r]);
      }
    }
  }
  for (int64_t r = 0; r < mt; ++r) _mm512_storeu_ps(out + r * R, acc[r]);
#elif defined(ZILI_ISA_AVX2)
  // rows_avx2 (above), the row count a template argument.
  switch (mt) {
    case 1: rows_avx2<Q4, 1>(wq, wd, a, m0, out); return;
    case 2: rows_avx2<Q4, 2>(wq, wd, a, m0, out); return;
    case 3: rows_avx2<Q4, 3>(wq, wd, a, m0, out); return;
    default: rows_avx2<Q4, 4>(wq, wd, a, m0, out); return;
  }
#elif defined(ZILI_ISA_NEON)
  // AArch64 with the dot-product extension (sdot): one 16-byte weight vector holds the same 4 input
  // features of 4 output rows, and sdot against the broadcast activation quad gives those 4 rows' sums.
  // Per block the weights are prepared once (q4: nibbles split; q8: codes - 128, exactly the signed
  // code) and multiplied by every row of the tile; int32 sums per block, fp32 across blocks.
  float32x4_t acc[kRowTile][4];
  for (int64_t r = 0; r < mt; ++r)
    for (int q = 0; q < 4; ++q) acc[r][q] = vdupq_n_f32(0.0f);
  const uint8x16_t low4 = vdupq_n_u8(0x0F), flip = vdupq_n_u8(0x80);
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* wb = wq + b * block_bytes;
    const uint16_t* sb = wd + b * block_scales;
    int32x4_t s[kRowTile][4];
    for (int64_t r = 0; r < mt; ++r)
      for (int q = 0; q < 4; ++q) s[r][q] = vdupq_n_s32(0);
    if constexpr (Q4) {
      for (int o = 0; o < 4; ++o) {
        int8x16_t lo[4], hi[4];
        for (int q = 0; q < 4; ++q) {
          const uint8x16_t v = vld1q_u8(wb + o * R * 4 + q * 16);
          lo[q] = vreinterpretq_s8_u8(vandq_u8(v, low4));
          hi[q] = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
        }
        for (int64_t r = 0; r < mt; ++r) {
          const int8_t* xq = a.q.data() + ((m0 + r) * KB + b) * QK + 8 * o;
          const int8x16_t xl = vreinterpretq_s8_s32(vdupq_n_s32(load_quad(xq)));
          const int8x16_t xh = vreinterpretq_s8_s32(vdupq_n_s32(load_quad(xq + 4)));
          for (int q = 0; q < 4; ++q) s[r][q] = vdotq_s32(vdotq_s32(s[r][q], lo[q], xl), hi[q], xh);
        }
      }
    } else {
      for (int j = 0; j < 8; ++j) {
        int8x16_t c[4];
        for (int q = 0; q < 4; ++q) c[q] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(wb + j * R * 4 + q * 16), flip));
        for (int64_t r = 0; r < mt; ++r) {
          const int8x16_t xj = vreinterpretq_s8_s32(vdupq_n_s32(load_quad(a.q.data() + ((m0 + r) * KB + b) * QK + 4 * j)));
          for (int q = 0; q < 4; ++q) s[r][q] = vdotq_s32(s[r][q], c[q], xj);
        }
      }
    }
    for (int q = 0; q < 4; ++q) {
      const float32x4_t dv = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + 4 * q)));
      const float32x4_t mv = Q4 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + R + 4 * q))) : vdupq_n_f32(0.0f);
      for (int64_t r = 0; r < mt; ++r) {
        const int64_t row = m0 + r;
        acc[r][q] = vfmaq_f32(acc[r][q], vcvtq_f32_s32(s[r][q]), vmulq_n_f32(dv, a.d[row * KB + b]));
        if constexpr (Q4) acc[r][q] = vfmaq_n_f32(acc[r][q], mv, a.s[row * KB + b]);
      }
    }
  }
  for (int64_t r = 0; r < mt; ++r)
    for (int q = 0; q < 4; ++q) vst1q_f32(out + r * R + 4 * q, acc[r][q]);
#else
  // Portable: integer dot per block and row (loops the compiler vectorises), fp32 across blocks.
  for (int64_t r = 0; r < mt; ++r)
    for (int64_t i = 0; i < R; ++i) out[r * R + i] = 0.0f;
  for (int64_t b = 0; b < KB; ++b) {
    const uint8_t* wb = wq + b * block_bytes;
    const uint16_t* sb = wd + b * block_scales;
    float dv[R], mv[R];
    for (int64_t i = 0; i < R; ++i) {
      dv[i] = half_to_float(sb[i]);
      mv[i] = Q4 ? half_to_float(sb[R + i]) : 0.0f;
    }
    for (int64_t r = 0; r < mt; ++r) {
      const int64_t row = m0 + r;
      const int8_t* xq = a.q.data() + (row * KB + b) * QK;
      int32_t isum[R] = {0};
      if constexpr (Q4) {
        for (int64_t o = 0; o < 4; ++o)
          for (int64_t i = 0; i < R; ++i)
            for (int64_t t = 0; t < 4; ++t) {
              const uint8_t byte = wb[(o * R + i) * 4 + t];
              isum[i] += (byte & 0x0F) * xq[8 * o + t] + (byte >> 4) * xq[8 * o + 4 + t];
            }
      } else {
        for (int64_t j = 0; j < 8; ++j)
          for (int64_t i = 0; i < R; ++i)
            for (int64_t t = 0; t < 4; ++t) isum[i] += (static_cast<int32_t>(wb[(j * R + i) * 4 + t]) - 128) * xq[4 * j + t];
      }
      const float xd = a.d[row * KB + b], xs = a.s[row * KB + b];
      for (int64_t i = 0; i < R; ++i) out[r * R + i] += dv[i] * xd * static_cast<float>(isum[i]) + mv[i] * xs;
    }
  }
#endif
}

#ifndef ZILI_STANDALONE
template <bool Q4, typename T>
void gemm(const T* x, const uint8_t* wq, const uint16_t* wd, T* y, int64_t M, int64_t K, int64_t N) {
  const QuantizedActs a = quantize_acts(x, M, K);
  const int64_t KB = a.KB, NG = (N + R - 1) / R;
  const int64_t group_bytes = KB * (Q4 ? 4 * R * 4 : 8 * R * 4);
  const int64_t group_scales = KB * (Q4 ? 2 * R : R);
  // About 16 KB of weights per task: small enough to balance 2-64 threads on the smallest layers;
  // one task (no parallel region) when the whole product is below the threshold.
  const bool serial = NG * group_bytes * M < ZILI_OPS_NS::parallel_min_bytes.load();
  const int64_t grain = serial ? NG : std::max<int64_t>(1, 16384 / group_bytes);
  at::parallel_for(0, NG, grain, [&](int64_t begin, int64_t end) {
    alignas(64) float out[kRowTile * R];
    for (int64_t g = begin; g < end; ++g) {
      const int64_t rows = std::min(R, N - g * R);
      for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
        const int64_t mt = std::min(kRowTile, M - m0);
        group_dot<Q4>(wq + g * group_bytes, wd + g * group_scales, a, m0, mt, out);
        for (int64_t r = 0; r < mt; ++r)
          for (int64_t i = 0; i < rows; ++i) y[(m0 + r) * N + g * R + i] = T(out[r * R + i]);
      }
    }
  });
}

at::Tensor run(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t n_out, bool q4) {
  TORCH_CHECK(x.dim() == 2, "quant gemm: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "quant gemm: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), KB = (K + QK - 1) / QK;
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "quant gemm: scales must be float16");
  const int64_t NG = (n_out + R - 1) / R;
  const int64_t per_block = q4 ? 4 * R * 4 : 8 * R * 4;
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.numel() == NG * KB * per_block,
              q4 ? "q4_gemm" : "q8_gemm", ": qs must be uint8 holding ceil(N/16) * ceil(K/32) * ", per_block,
              " bytes (N = ", n_out, ", K = ", K, "), got ", qs.scalar_type(), " ", qs.sizes());
  TORCH_CHECK(scales.numel() == NG * KB * (q4 ? 2 : 1) * R, q4 ? "q4_gemm" : "q8_gemm",
              ": scales must hold ceil(N/16) * ceil(K/32) * ", (q4 ? 2 : 1) * R, " float16 values");
  auto xc = x.contiguous();
  auto qc = qs.contiguous();
  auto sc = scales.contiguous();
  auto y = at::empty({M, n_out}, x.options());
  if (M == 0 || n_out == 0) return y;
  const auto* wq = reinterpret_cast<const uint8_t*>(qc.data_ptr());
  const auto* wd = reinterpret_cast<const uint16_t*>(sc.data_ptr());
  if (x.scalar_type() == at::kFloat) {
    if (q4) gemm<true>(xc.data_ptr<float>(), wq, wd, y.data_ptr<float>(), M, K, n_out);
    else gemm<false>(xc.data_ptr<float>(), wq, wd, y.data_ptr<float>(), M, K, n_out);
  } else {
    using B = c10::BFloat16;
    if (q4) gemm<true>(xc.data_ptr<B>(), wq, wd, y.data_ptr<B>(), M, K, n_out);
    else gemm<false>(xc.data_ptr<B>(), wq, wd, y.data_ptr<B>(), M, K, n_out);
  }
  return y;
}

// ---- Dequantize-then-dense: the path for row counts where a dense matmul beats the integer kernel ----
//
// A layer served by the kernels above has no dense copy of its weight. For batches past its packed
// kernel's row limit (prefill, large decode batches) the weight is dequantized chunk by chunk into a
// per-thread scratch buffer in x's dtype (at most kScratchBytes: one layer of a small model, or a slice
// of a large one) and multiplied by the device BLAS (oneDNN / MKL through at::linear), so the only
// weight-sized memory a layer holds is its packed codes.

constexpr int64_t kScratchBytes = int64_t(4) << 20;

inline void store32(float* dst, const float* v, int64_t n) { std::memcpy(dst, v, n * sizeof(float)); }
inline void store32(c10::BFloat16* dst, const float* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(v[i]);
}

// Row `i` of group `g`, block `b` of a packed weight -> 32 floats (w = d * code + m, or d * code).
template <bool Q4>
inline void block_values(const uint8_t* wq, const uint16_t* wd, int64_t KB, int64_t g, int64_t b, int64_t i,
                         float* v) {
  if constexpr (Q4) {
    const uint8_t* blk = wq + (g * KB + b) * 4 * R * 4;
    const uint16_t* sb = wd + (g * KB + b) * 2 * R;
    const float d = half_to_float(sb[i]), m = half_to_float(sb[R + i]);
    for (int64_t o = 0; o < 4; ++o)
      for (int64_t t = 0; t < 4; ++t) {
        const uint8_t byte = blk[(o * R + i) * 4 + t];
        v[8 * o + t] = d * static_cast<float>(byte & 0x0F) + m;
        v[8 * o + 4 + t] = d * static_cast<float>(byte >> 4) + m;
      }
  } else {
    const uint8_t* blk = wq + (g * KB + b) * 8 * R * 4;
    const float d = half_to_float(wd[(g * KB + b) * R + i]);
    for (int64_t j = 0; j < 8; ++j)
      for (int64_t t = 0; t < 4; ++t) v[4 * j + t] = d * static_cast<float>(static_cast<int32_t>(blk[(j * R + i) * 4 + t]) - 128);
  }
}

#if defined(ZILI_ISA_AVX512)
// The same 32 values as block_values, in two vectors (elements 0..15, 16..31).
template <bool Q4>
inline void block_vectors(const uint8_t* wq, const uint16_t* wd, int64_t KB, int64_t g, int64_t b, int64_t i,
                          __m512& f0, __m512& f1) {
  if constexpr (Q4) {
    const uint8_t* blk = wq + (g * KB + b) * 4 * R * 4;
    const uint16_t* sb = wd + (g * KB + b) * 2 * R;
    const __m512 dv = _mm512_set1_ps(half_to_float(sb[i])), mv = _mm512_set1_ps(half_to_float(sb[R + i]));
    const __m128i v = _mm_set_epi32(load_quad(reinterpret_cast<const int8_t*>(blk + (3 * R + i) * 4)),
                                    load_quad(reinterpret_cast<const int8_t*>(blk + (2 * R + i) * 4)),
                                    load_quad(reinterpret_cast<const int8_t*>(blk + (1 * R + i) * 4)),
                                    load_quad(reinterpret_cast<const int8_t*>(blk + (0 * R + i) * 4)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(v, low4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
    // octet o = low nibbles of its quad, then high nibbles: interleave the quads of lo and hi
    f0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi32(lo, hi))), dv, mv);
    f1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi32(lo, hi))), dv, mv);
  } else {
    const uint8_t* blk = wq + (g * KB + b) * 8 * R * 4;
    const __m512 dv = _mm512_set1_ps(half_to_float(wd[(g * KB + b) * R + i]));
    int32_t quads[8];
    for (int j = 0; j < 8; ++j) quads[j] = load_quad(reinterpret_cast<const int8_t*>(blk + (j * R + i) * 4));
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    const __m256i c = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(quads)), flip);  // code
    f0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(c))), dv);
    f1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(c, 1))), dv);
  }
}

inline void store_vec(float* dst, __m512 v) { _mm512_storeu_ps(dst, v); }
inline void store_vec(c10::BFloat16* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
#endif

// Rows [n0, n0 + nc) of the weight (n0 a multiple of R) -> w [nc, K] in T.
template <bool Q4, typename T>
void dequant_rows(const uint8_t* wq, const uint16_t* wd, int64_t K, int64_t n0, int64_t nc, T* w) {
  const int64_t KB = (K + QK - 1) / QK;
  const int64_t g0 = n0 / R, g1 = (n0 + nc + R - 1) / R;
  at::parallel_for(g0, g1, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float v[QK];
    for (int64_t g = begin; g < end; ++g)
      for (int64_t i = 0; i < R; ++i) {
        const int64_t row = g * R + i - n0;
        if (row >= nc) break;
        T* out = w + row * K;
        for (int64_t b = 0; b < KB; ++b) {
          const int64_t n = std::min<int64_t>(QK, K - b * QK);
#if defined(ZILI_ISA_AVX512)
          if (n == QK) {
            __m512 f0, f1;
            block_vectors<Q4>(wq, wd, KB, g, b, i, f0, f1);
            store_vec(out + b * QK, f0);
            store_vec(out + b * QK + 16, f1);
            continue;
          }
#endif
          block_values<Q4>(wq, wd, KB, g, b, i, v);
          store32(out + b * QK, v, n);
        }
      }
  });
}

at::Tensor dequant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& scales, int64_t n_out, bool q4) {
  TORCH_CHECK(x.dim() == 2, "dequant linear: x must be [M, K], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "dequant linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(scales.scalar_type() == at::kHalf, "dequant linear: scales must be float16");
  const int64_t M = x.size(0), K = x.size(1), KB = (K + QK - 1) / QK, NG = (n_out + R - 1) / R;
  const int64_t per_block = q4 ? 4 * R * 4 : 8 * R * 4;
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.numel() == NG * KB * per_block,
              "dequant linear: qs must be uint8 holding ceil(N/16) * ceil(K/32) * ", per_block, " bytes");
  TORCH_CHECK(scales.numel() == NG * KB * (q4 ? 2 : 1) * R, "dequant linear: wrong number of scales");
  auto xc = x.contiguous();
  auto qc = qs.contiguous();
  auto sc = scales.contiguous();
  if (M == 0 || n_out == 0 || K == 0) return at::zeros({M, n_out}, x.options());
  const int64_t elt = x.element_size();
  const int64_t chunk = std::min(n_out, std::max<int64_t>(R, kScratchBytes / (K * elt) / R * R));
  // One buffer per calling thread, reused by every layer and step (never more than kScratchBytes,
  // or one chunk of R rows for a very wide K).
  thread_local at::Tensor scratch;
  if (!scratch.defined() || scratch.scalar_type() != x.scalar_type() || scratch.numel() < chunk * K)
    scratch = at::empty({chunk * K}, x.options());
  const auto* wq = reinterpret_cast<const uint8_t*>(qc.data_ptr());
  const auto* wd = reinterpret_cast<const uint16_t*>(sc.data_ptr());
  at::Tensor y = chunk == n_out ? at::Tensor() : at::empty({M, n_out}, x.options());
  for (int64_t n0 = 0; n0 < n_out; n0 += chunk) {
    const int64_t nc = std::min(chunk, n_out - n0);
    if (x.scalar_type() == at::kFloat) {
      if (q4) dequant_rows<true>(wq, wd, K, n0, nc, scratch.data_ptr<float>());
      else dequant_rows<false>(wq, wd, K, n0, nc, scratch.data_ptr<float>());
    } else {
      using B = c10::BFloat16;
      if (q4) dequant_rows<true>(wq, wd, K, n0, nc, scratch.data_ptr<B>());
      else dequant_rows<false>(wq, wd, K, n0, nc, scratch.data_ptr<B>());
    }
    at::Tensor part = at::linear(xc, scratch.narrow(0, 0, nc * K).view({nc, K}));
    if (chunk == n_out) return part;
    y.narrow(1, n0, nc).copy_(part);
  }
  return y;
}

at::Tensor q4_dequant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& dm, int64_t n_out) {
  return dequant_linear(x, qs, dm, n_out, true);
}

at::Tensor q8_dequant_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t n_out) {
  return dequant_linear(x, qs, d, n_out, false);
}

at::Tensor q4_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& dm, int64_t n_out) {
  return run(x, qs, dm, n_out, true);
}

at::Tensor q8_gemm(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t n_out) {
  return run(x, qs, d, n_out, false);
}

int64_t isa_level() { return kIsaLevel; }

int64_t set_parallel_min_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_parallel_min_bytes: bytes must be >= 0, got ", bytes);
  return ZILI_OPS_NS::parallel_min_bytes.exchange(bytes);
}

#endif  // ZILI_STANDALONE
}  // namespace

#ifndef ZILI_STANDALONE
#define ZILI_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
#define ZILI_IMPL(ns, k, m) TORCH_LIBRARY_IMPL(ns, k, m)

ZILI_FRAGMENT(ZILI_OPS_NS, m) {
  m.def("q4_gemm(Tensor x, Tensor qs, Tensor dm, int n_out) -> Tensor");
  m.def("q8_gemm(Tensor x, Tensor qs, Tensor d, int n_out) -> Tensor");
  m.def("q4_dequant_linear(Tensor x, Tensor qs, Tensor dm, int n_out) -> Tensor");
  m.def("q8_dequant_linear(Tensor x, Tensor qs, Tensor d, int n_out) -> Tensor");
  m.def("isa_level() -> int", &isa_level);
  // Returns the previous value. Not part of any graph: called at engine set-up and by the benchmarks.
  m.def("set_parallel_min_bytes(int bytes) -> int", &set_parallel_min_bytes);
}

ZILI_IMPL(ZILI_OPS_NS, CPU, m) {
  m.impl("q4_gemm", &q4_gemm);
  m.impl("q8_gemm", &q8_gemm);
  m.impl("q4_dequant_linear", &q4_dequant_linear);
  m.impl("q8_dequant_linear", &q8_dequant_linear);
}
#endif  // ZILI_STANDALONE
