// int8 x bf16 -> fp32 matmul for the LM head on AVX512-BF16 CPUs (and, without it, on AVX2 + FMA).
//
// Why: the LM head of a small model is its largest matmul (SmolLM2-135M: 49152 x 576, 57 MB
// in bf16, more than all 30 int4 layers together) and a decode step reads it whole. The
// default checkpoint keeps it at 8 bits in its GGUF (Q8_0: groups of 32, one scale each);
// this kernel reads those 8-bit values, half the bytes of bf16.
//
// Layout (backend/kernels/int8.py):
//   packed  int8 [N/16][K/2][16][2]: pair p of lane j = (q[n0+j][2p], q[n0+j][2p+1]), the
//           VNNI-2 order VDPBF16PS wants once widened (|q| <= 127 is exact in bf16);
//   scales  fp32 [N/16][K/32][16]: w = q * scale.
// Each row goes through the same instructions in the same order whatever the number of rows,
// so a row's logits never depend on the other rows of its batch.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu_kernels.h"
#include "simd.h"

namespace msk {
namespace {

constexpr int64_t kGroup = 32;
#if defined(__AVX512BF16__)
constexpr int64_t kMaxRows = 8;

// 32 int8 -> 32 bf16 (exact), in memory order.
inline __m512bh widen32(const int8_t* p) {
  __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16));
  __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a));
  __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  return _mm512_cvtne2ps_pbh(hi, lo);  // elements 0..15 from lo, 16..31 from hi
}

template <int64_t R>
void block_rows(const at::BFloat16* x, int64_t ldx, int64_t groups, const int8_t* w, const float* scales,
                float* out, int64_t ldo) {
  __m512 acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    __m512 part[R];
    for (int64_t r = 0; r < R; ++r) part[r] = _mm512_setzero_ps();
    const int8_t* wg = w + g * (kGroup / 2) * 32;
    for (int64_t p = 0; p < kGroup / 2; ++p) {
      const __m512bh b = widen32(wg + p * 32);
      const int64_t k = g * kGroup + 2 * p;
      for (int64_t r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * ldx + k, sizeof(pair));
        part[r] = _mm512_dpbf16_ps(part[r], (__m512bh)_mm512_set1_epi32(pair), b);
      }
    }
    const __m512 scale = _mm512_loadu_ps(scales + g * 16);
    for (int64_t r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(part[r], scale, acc[r]);
  }
  for (int64_t r = 0; r < R; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}
#else
// AVX2 + FMA: the int8 pairs widened to fp32 once per block (even bytes = input k, odd = k + 1),
// each row's two inputs of the pair broadcast from bf16, 8-lane FMAs; the same per-group sum.
constexpr int64_t kMaxRows = 4;

// 8 lanes of (int8 at k, int8 at k + 1) pairs -> the two as fp32
inline void widen_pairs(const int8_t* p, __m256& even, __m256& odd) {
  const __m256i v = _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  even = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 24));
  odd = _mm256_cvtepi32_ps(_mm256_srai_epi32(v, 8));
}

template <int64_t R>
void block_rows(const at::BFloat16* x, int64_t ldx, int64_t groups, const int8_t* w, const float* scales,
                float* out, int64_t ldo) {
  V acc[R];
  for (int64_t r = 0; r < R; ++r) acc[r] = vzero();
  for (int64_t g = 0; g < groups; ++g) {
    __m256 p0[R], p1[R];
    for (int64_t r = 0; r < R; ++r) p0[r] = p1[r] = _mm256_setzero_ps();
    const int8_t* wg = w + g * (kGroup / 2) * 32;
    for (int64_t p = 0; p < kGroup / 2; ++p) {
      __m256 e0, o0, e1, o1;
      widen_pairs(wg + p * 32, e0, o0);       // columns 0..7
      widen_pairs(wg + p * 32 + 16, e1, o1);  // columns 8..15
      const int64_t k = g * kGroup + 2 * p;
      for (int64_t r = 0; r < R; ++r) {
        const __m256 xk = _mm256_set1_ps(static_cast<float>(x[r * ldx + k]));
        const __m256 xk1 = _mm256_set1_ps(static_cast<float>(x[r * ldx + k + 1]));
        p0[r] = _mm256_fmadd_ps(xk1, o0, _mm256_fmadd_ps(xk, e0, p0[r]));
        p1[r] = _mm256_fmadd_ps(xk1, o1, _mm256_fmadd_ps(xk, e1, p1[r]));
      }
    }
    const V scale = vload(scales + g * 16);
    for (int64_t r = 0; r < R; ++r) acc[r] = vfma(V{p0[r], p1[r]}, scale, acc[r]);
  }
  for (int64_t r = 0; r < R; ++r) vstore(out + r * ldo, acc[r]);
}
#endif

using BlockFn = void (*)(const at::BFloat16*, int64_t, int64_t, const int8_t*, const float*, float*, int64_t);
#if defined(__AVX512BF16__)
const BlockFn kBlock[kMaxRows + 1] = {nullptr,       block_rows<1>, block_rows<2>, block_rows<3>, block_rows<4>,
                                      block_rows<5>, block_rows<6>, block_rows<7>, block_rows<8>};
#else
const BlockFn kBlock[kMaxRows + 1] = {nullptr, block_rows<1>, block_rows<2>, block_rows<3>, block_rows<4>};
#endif

}  // namespace

void int8_mm_blocks(const at::BFloat16* x, int64_t M, int64_t K, const int8_t* packed, const float* scales,
                    float* out, int64_t ldo, int64_t nb_lo, int64_t nb_hi) {
  const int64_t groups = K / kGroup;
  for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
    const int8_t* w = packed + nb * K * 16;
    const float* s = scales + nb * groups * 16;
    for (int64_t m = 0; m < M; m += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, M - m);
      kBlock[rows](x + m * K, K, groups, w, s, out + m * ldo + nb * 16, ldo);
    }
  }
}

void int8_mm_raw(const at::BFloat16* x, int64_t M, int64_t K, const int8_t* packed, const float* scales,
                 int64_t N, float* out, int64_t ldo) {
  at::parallel_for(0, N / 16, 1, [&](int64_t lo, int64_t hi) {
    int8_mm_blocks(x, M, K, packed, scales, out, ldo, lo, hi);
  });
}

// x [M, K] bf16; packed [N/16, K/2, 16, 2] int8; scales [N/16, K/32, 16] fp32 -> [M, N] fp32.
at::Tensor int8_mm(at::Tensor x, at::Tensor packed, at::Tensor scales) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2, "int8_mm: x must be 2-D bfloat16");
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == 16, "int8_mm: bad packed");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.dim() == 3, "int8_mm: bad scales");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16;
  TORCH_CHECK(K % kGroup == 0 && packed.size(1) * 2 == K, "int8_mm: K mismatch");
  auto out = at::empty({M, N}, x.options().dtype(at::kFloat));
  int8_mm_raw(x.data_ptr<at::BFloat16>(), M, K, packed.data_ptr<int8_t>(), scales.data_ptr<float>(), N,
              out.data_ptr<float>(), N);
  return out;
}

}  // namespace msk
