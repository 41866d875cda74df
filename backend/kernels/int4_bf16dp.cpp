// int4 x bf16 matmul for decode rows on AVX512-BF16 CPUs (and, without it, on AVX2 + FMA).
//
// Why not torch._weight_int4pack_mm_for_cpu: it multiplies in fp32 FMAs, so its cost grows
// with every row (all 30 layers of SmolLM2-135M on 2 cores: 3.6 ms for 1 row, 6.1 for 4,
// 21.4 for 16) and a 4-stream step cost 1.5x a 1-stream one. Here each 4-bit weight is
// widened once to bf16 and then used by one VDPBF16PS per row (two multiply-adds each), so
// extra rows are nearly free until the kernel becomes compute-bound.
//
// Layout (built by backend/kernels/int4.py from the same q / scale / zero as the torch
// kernel, so the weights are the same numbers):
//   packed  uint8 [N/16][K/2][16]: byte j of pair p holds q[n0+j][2p] (low nibble) and
//           q[n0+j][2p+1] (high nibble); widened, that is the VNNI-2 order VDPBF16PS wants.
//   sz      bf16  [N/16][K/32][2][16]: scale, then zero (w = (q - 8) * scale + zero).
// Per row and per group of 32 inputs: sum_k x_k w_k = scale * sum_k x_k q_k
// + (zero - 8 scale) * sum_k x_k. Every row goes through the same instructions in the same
// order whatever the number of rows, so a token's result does not depend on its batch.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "simd.h"

namespace msk {
namespace {

constexpr int64_t kGroup = 32;

#if defined(__AVX512BF16__)
constexpr int64_t kMaxRows = 8;  // accumulators: 2 zmm per row
constexpr bool kWidenX = false;

inline __m512 load_bf16x16(const at::BFloat16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

template <int64_t R>
void block_rows(const at::BFloat16* x, int64_t ldx, const float* xsum, const float* /*xf*/, int64_t groups,
                const uint8_t* w, const at::BFloat16* sz, at::BFloat16* out, int64_t ldo) {
  // bf16 of 0..15, indexed by the widened nibble (VPERMW uses the low 5 bits of each word).
  static const __m512i lut = _mm512_set_epi16(
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100,
      0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);
  const __m512i low4 = _mm512_set1_epi32(0x000F);
  const __m512i high4 = _mm512_set1_epi32(0x00F0);
  __m512 acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[R];
    for (int64_t r = 0; r < R; ++r) part[r] = _mm512_setzero_ps();
    const uint8_t* wg = w + g * (kGroup / 2) * 16;
    for (int64_t p = 0; p < kGroup / 2; ++p) {
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wg + p * 16));
      __m512i d = _mm512_cvtepu8_epi32(bytes);
      // word 2j = low nibble (input k), word 2j+1 = high nibble (input k+1)
      __m512i idx = _mm512_or_si512(_mm512_and_si512(d, low4), _mm512_slli_epi32(_mm512_and_si512(d, high4), 12));
      __m512bh b = (__m512bh)_mm512_permutexvar_epi16(idx, lut);
      const int64_t k = g * kGroup + 2 * p;
      for (int64_t r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * ldx + k, sizeof(pair));
        part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)_mm512_set1_epi32(pair), b);
      }
    }
    const __m512 scale = load_bf16x16(sz + g * 32);
    const __m512 zero = load_bf16x16(sz + g * 32 + 16);
    const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), scale, zero);  // zero - 8 scale
    for (int64_t r = 0; r < R; ++r) {
      acc[r] = _mm512_fmadd_ps(part[r], scale, acc[r]);
      acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[r * groups + g]), offset, acc[r]);
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    __m256i bf = (__m256i)_mm512_cvtneps_pbh(acc[r]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + r * ldo), bf);
  }
}
#else
// AVX2 + FMA: no bf16 dot product, so each nibble is widened to fp32 once per block and every
// row multiplies it with its fp32 input (``xf``, widened once per matmul by int4_prep) in
// 8-lane FMAs: 4 per row per pair of inputs, 16 columns. The same sum as above,
// scale * sum_k x_k q_k + (zero - 8 scale) * sum_k x_k, per group of 32.
constexpr int64_t kMaxRows = 4;  // 2 ymm partial sums per row, plus 4 ymm of weights
constexpr bool kWidenX = true;

template <int64_t R>
void block_rows(const at::BFloat16* /*x*/, int64_t ldx, const float* xsum, const float* xf, int64_t groups,
                const uint8_t* w, const at::BFloat16* sz, at::BFloat16* out, int64_t ldo) {
  const __m256i low4 = _mm256_set1_epi32(0x0F);
  V acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = vzero();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 p0[R], p1[R];
    for (int64_t r = 0; r < R; ++r) p0[r] = p1[r] = _mm256_setzero_ps();
    const uint8_t* wg = w + g * (kGroup / 2) * 16;
    for (int64_t p = 0; p < kGroup / 2; ++p) {
      // bytes j = 0..7 (columns 0..7) and 8..15; low nibble = input k, high = input k + 1
      const __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wg + p * 16)));
      const __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wg + p * 16 + 8)));
      const __m256 a0 = _mm256_cvtepi32_ps(_mm256_and_si256(d0, low4));
      const __m256 a1 = _mm256_cvtepi32_ps(_mm256_and_si256(d1, low4));
      const __m256 b0 = _mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4));
      const __m256 b1 = _mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4));
      const int64_t k = g * kGroup + 2 * p;
      for (int64_t r = 0; r < R; ++r) {
        const __m256 xk = _mm256_broadcast_ss(xf + r * ldx + k);
        const __m256 xk1 = _mm256_broadcast_ss(xf + r * ldx + k + 1);
        p0[r] = _mm256_fmadd_ps(xk1, b0, _mm256_fmadd_ps(xk, a0, p0[r]));
        p1[r] = _mm256_fmadd_ps(xk1, b1, _mm256_fmadd_ps(xk, a1, p1[r]));
      }
    }
    const V scale = ld(sz + g * 32);
    const V offset = vfnma(vset(8.0f), scale, ld(sz + g * 32 + 16));  // zero - 8 scale
    for (int64_t r = 0; r < R; ++r) {
      acc[r] = vfma(V{p0[r], p1[r]}, scale, acc[r]);
      acc[r] = vfma(vset(xsum[r * groups + g]), offset, acc[r]);
    }
  }
  for (int64_t r = 0; r < R; ++r) st(out + r * ldo, acc[r]);
}
#endif

using BlockFn = void (*)(const at::BFloat16*, int64_t, const float*, const float*, int64_t, const uint8_t*,
                         const at::BFloat16*, at::BFloat16*, int64_t);
#if defined(__AVX512BF16__)
const BlockFn kBlock[kMaxRows + 1] = {nullptr,       block_rows<1>, block_rows<2>, block_rows<3>, block_rows<4>,
                                      block_rows<5>, block_rows<6>, block_rows<7>, block_rows<8>};
#else
const BlockFn kBlock[kMaxRows + 1] = {nullptr, block_rows<1>, block_rows<2>, block_rows<3>, block_rows<4>};
#endif

}  // namespace

int64_t int4_prep_floats(int64_t K) { return K / kGroup + (kWidenX ? K : 0); }

void int4_prep(const at::BFloat16* x, int64_t M, int64_t K, float* prep) {
  const int64_t groups = K / kGroup;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.f;
      for (int64_t k = 0; k < kGroup; ++k) s += static_cast<float>(x[m * K + g * kGroup + k]);
      prep[m * groups + g] = s;
    }
  if (kWidenX) {
    float* xf = prep + M * groups;
    for (int64_t i = 0; i < M * K; i += 16) vstore(xf + i, ld(x + i));
  }
}

void int4_mm_blocks(const at::BFloat16* x, int64_t M, int64_t K, const float* prep, const uint8_t* packed,
                    const at::BFloat16* sz, at::BFloat16* out, int64_t ldo, int64_t nb_lo, int64_t nb_hi) {
  const int64_t groups = K / kGroup;
  const float* xf = prep + M * groups;  // only read on AVX2 (kWidenX)
  for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
    const uint8_t* w = packed + nb * (K / 2) * 16;
    const at::BFloat16* s = sz + nb * groups * 32;
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, M - m);
      kBlock[rows](x + m * K, K, prep + m * groups, xf + m * K, groups, w, s, out + m * ldo + nb * 16, ldo);
    }
  }
}

void int4_mm_raw(const at::BFloat16* x, int64_t M, int64_t K, const uint8_t* packed, const at::BFloat16* sz,
                 int64_t N, at::BFloat16* out, int64_t ldo) {
  // Per row and group, the sum of the inputs (fp32), for the zero-point term (and on AVX2 the
  // inputs in fp32).
  std::vector<float> prep(M * int4_prep_floats(K));
  int4_prep(x, M, K, prep.data());
  at::parallel_for(0, N / 16, 1, [&](int64_t lo, int64_t hi) {
    int4_mm_blocks(x, M, K, prep.data(), packed, sz, out, ldo, lo, hi);
  });
}

// x [M, K] bf16 contiguous; packed [N/16, K/2, 16] uint8; sz [N/16, K/32, 2, 16] bf16 -> [M, N] bf16.
at::Tensor int4_mm(at::Tensor x, at::Tensor packed, at::Tensor sz) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "int4_mm: x must be 2-D bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 3 && packed.size(2) == 16, "int4_mm: bad packed");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.dim() == 4, "int4_mm: bad scales");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16;
  TORCH_CHECK(K % kGroup == 0 && packed.size(1) * 2 == K, "int4_mm: K mismatch");
  auto out = at::empty({M, N}, x.options());
  int4_mm_raw(x.data_ptr<at::BFloat16>(), M, K, packed.data_ptr<uint8_t>(), sz.data_ptr<at::BFloat16>(), N,
              out.data_ptr<at::BFloat16>(), N);
  return out;
}

}  // namespace msk
