// The packed q4/q8 products of kernels/csrc/quant_gemm_cpu.cpp without torch, for a CPU this machine
// cannot run: cross-compiled for AArch64 (with and without ZILI_ISA_NEON) and run under qemu-user by
// tests/unit/test_cpu_kernels_neon.py. It packs random weights in the documented layouts itself (an
// independent reading of the layout comment at the top of the kernel source), runs the kernel's group
// products over every group and row tile, as its `gemm` does, and checks them against the exact sums
// over the kernel's own int8 activations, computed here in double. Prints one line per case; exits 1 on
// the first mismatch.

#define ZILI_STANDALONE
#include "../../src/zili/kernels/csrc/quant_gemm_cpu.cpp"

#include <cstdio>
#include <cstdlib>

namespace {

struct Lcg {  // a fixed-seed generator, so that a failure reproduces
  uint64_t s;
  explicit Lcg(uint64_t seed) : s(seed * 6364136223846793005ULL + 1442695040888963407ULL) {}
  uint32_t next() {
    s = s * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<uint32_t>(s >> 33);
  }
  float uniform() { return static_cast<float>(next() % 1000001) / 1000000.0f; }  // [0, 1]
};

uint16_t to_half(float f) {
  __fp16 h = static_cast<__fp16>(f);
  uint16_t u;
  std::memcpy(&u, &h, 2);
  return u;
}

// Runs one product and compares; returns false on a mismatch.
bool check(bool q4, int64_t M, int64_t N, int64_t K, uint64_t seed) {
  Lcg rng(seed);
  const int64_t KB = (K + QK - 1) / QK, NG = (N + R - 1) / R;
  const int64_t per_block = q4 ? 4 * R * 4 : 8 * R * 4, scales_per_block = q4 ? 2 * R : R;
  std::vector<uint8_t> qs(NG * KB * per_block, q4 ? 0 : 128);
  std::vector<uint16_t> sc(NG * KB * scales_per_block, 0);
  std::vector<int> code(NG * R * KB * QK, 0);  // [row][k] (rows and k padded), the unpacked codes
  std::vector<float> dd(NG * R * KB), mm(NG * R * KB);  // per row and block, as rounded to float16
  for (int64_t n = 0; n < N; ++n)
    for (int64_t b = 0; b < KB; ++b) {
      const int64_t g = n / R, i = n % R;
      const float d = (0.002f + rng.uniform() * 0.05f) * (q4 ? 1.0f : 0.2f);
      const float m = q4 ? (rng.uniform() - 0.5f) * 0.4f : 0.0f;
      const uint16_t dh = to_half(d), mh = to_half(m);
      dd[n * KB + b] = half_to_float(dh);
      mm[n * KB + b] = half_to_float(mh);
      sc[(g * KB + b) * scales_per_block + i] = dh;
      if (q4) sc[(g * KB + b) * scales_per_block + R + i] = mh;
      for (int64_t e = 0; e < QK && b * QK + e < K; ++e) {
        const int c = q4 ? static_cast<int>(rng.next() % 16) : static_cast<int>(rng.next() % 255) - 127;
        code[n * KB * QK + b * QK + e] = c;
        if (q4) {  // octet o = e / 8; byte t of (o, row i): low nibble element 8o + t, high 8o + 4 + t
          const int64_t o = e / 8, t = e % 4, high = (e % 8) >= 4;
          qs[(g * KB + b) * per_block + (o * R + i) * 4 + t] |= static_cast<uint8_t>(c << (high ? 4 : 0));
        } else {  // quad j = e / 4, byte t = e % 4, code + 128
          qs[(g * KB + b) * per_block + ((e / 4) * R + i) * 4 + e % 4] = static_cast<uint8_t>(c + 128);
        }
      }
    }
  std::vector<float> x(M * K);
  for (auto& v : x) v = (rng.uniform() - 0.5f) * 4.0f;
  const QuantizedActs a = quantize_acts(x.data(), M, K);
  std::vector<float> y(M * N, 0.0f);
  float out[kRowTile * R];
  for (int64_t g = 0; g < NG; ++g)
    for (int64_t m0 = 0; m0 < M; m0 += kRowTile) {
      const int64_t mt = std::min(kRowTile, M - m0);
      if (q4) group_dot<true>(qs.data() + g * KB * per_block, sc.data() + g * KB * scales_per_block, a, m0, mt, out);
      else group_dot<false>(qs.data() + g * KB * per_block, sc.data() + g * KB * scales_per_block, a, m0, mt, out);
      for (int64_t r = 0; r < mt; ++r)
        for (int64_t i = 0; i < R && g * R + i < N; ++i) y[(m0 + r) * N + g * R + i] = out[r * R + i];
    }
  double worst = 0.0, scale = 1e-6;
  std::vector<double> exact(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double sum = 0.0;
      for (int64_t b = 0; b < KB; ++b) {
        double isum = 0.0, qsum = 0.0;
        for (int64_t e = 0; e < QK; ++e) {
          const int q = a.q[(m * KB + b) * QK + e];
          isum += static_cast<double>(code[n * KB * QK + b * QK + e]) * q;
          qsum += q;
        }
        sum += static_cast<double>(dd[n * KB + b]) * a.d[m * KB + b] * isum
               + static_cast<double>(mm[n * KB + b]) * a.d[m * KB + b] * qsum;
      }
      exact[m * N + n] = sum;
      scale = std::max(scale, std::fabs(sum));
    }
  for (int64_t i = 0; i < M * N; ++i) worst = std::max(worst, std::fabs(y[i] - exact[i]));
  const bool ok = worst <= 1e-4 * scale;
  std::printf("%s %s M=%lld N=%lld K=%lld max|err|/max|y| = %.2e\n", ok ? "ok" : "MISMATCH", q4 ? "q4" : "q8",
              static_cast<long long>(M), static_cast<long long>(N), static_cast<long long>(K), worst / scale);
  return ok;
}

}  // namespace

int main() {
  std::printf("isa_level %lld\n", static_cast<long long>(kIsaLevel));
  // 1..33 rows (the tile of 4 and its remainders), N not a multiple of 16, K not a multiple of 32
  const int64_t shapes[][3] = {{1, 1, 32}, {1, 7, 64}, {2, 33, 96}, {3, 64, 1000}, {4, 5, 576},
                               {5, 577, 256}, {7, 32, 1536}, {16, 9, 300}, {33, 17, 160}};
  uint64_t seed = 1;
  for (const auto& s : shapes)
    for (bool q4 : {true, false})
      if (!check(q4, s[0], s[1], s[2], seed++)) return 1;
  return 0;
}
