// 16 fp32 lanes for the project's CPU kernels, on AVX-512 or on AVX2 + FMA.
//
// Why: the kernels were written for AVX512-BF16, and a machine without it (AMD EPYC Zen 2/3,
// older Intel) fell back to the torch forward, which pays per-op Python overhead that the fused
// decode step removes. The same sources are compiled twice (backend/kernels/native.py): once with
// the AVX-512 flags, where V is one __m512, and once with -mavx2 -mfma, where V is two __m256
// halves. The lane count (16) stays, so every loop and layout is the same; only the matmul
// inner loops, which use VDPBF16PS on AVX-512, have their own AVX2 code (int4 / int8 sources).
//
// bf16 rounding is round-to-nearest-even in both variants (VCVTNEPS2BF16 on AVX-512, the same
// rule in integer arithmetic on AVX2), so the rounding points of backend/models/llama.py are
// kept on either machine. Results are not bitwise equal across the two variants (sums reduce in
// a different order), but within one variant a token's numbers never depend on its batch.
#pragma once

#include <ATen/ATen.h>
#include <immintrin.h>

#include <cstdint>

namespace msk {

using bf16 = at::BFloat16;

#if defined(__AVX512F__)

constexpr bool kAvx512 = true;

struct V {
  __m512 v;
};
inline V vzero() { return {_mm512_setzero_ps()}; }
inline V vset(float x) { return {_mm512_set1_ps(x)}; }
inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a.v); }
inline V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V vsub(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V vmul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V vdiv(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V vmin(V a, V b) { return {_mm512_min_ps(a.v, b.v)}; }
inline V vmax(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }    // a * b + c
inline V vfnma(V a, V b, V c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a * b
inline float vsum(V a) { return _mm512_reduce_add_ps(a.v); }
inline V vrint(V a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline V vscale2(V y, V n) { return {_mm512_scalef_ps(y.v, n.v)}; }  // y * 2^n, n integral
// a where live != -inf, else exactly 0
inline V vlive(V live, V a) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(live.v, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ), a.v)};
}
// 16 bf16 <-> 16 fp32 lanes
inline V ld(const bf16* p) {
  __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16))};
}
inline __m256i to_bf16_bits(V a) { return (__m256i)_mm512_cvtneps_pbh(a.v); }
inline void st(bf16* p, V a) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(a)); }
inline V round(V a) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(a)), 16))}; }

#elif defined(__AVX2__) && defined(__FMA__)

constexpr bool kAvx512 = false;

struct V {
  __m256 lo, hi;
};
inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vset(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, V a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline V vadd(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V vsub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V vmul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V vdiv(V a, V b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V vmin(V a, V b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline V vmax(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vfnma(V a, V b, V c) { return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)}; }
inline float vsum(V a) {
  __m256 s = _mm256_add_ps(a.lo, a.hi);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}
inline V vrint(V a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
// y * 2^n for integral n in [-126, 127] (exp16's range): 2^n built in the exponent field
inline __m256 pow2(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
inline V vscale2(V y, V n) { return {_mm256_mul_ps(y.lo, pow2(n.lo)), _mm256_mul_ps(y.hi, pow2(n.hi))}; }
inline V vlive(V live, V a) {
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  return {_mm256_and_ps(_mm256_cmp_ps(live.lo, ninf, _CMP_NEQ_OQ), a.lo),
          _mm256_and_ps(_mm256_cmp_ps(live.hi, ninf, _CMP_NEQ_OQ), a.hi)};
}
inline __m256 ld8(const bf16* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
inline V ld(const bf16* p) { return {ld8(p), ld8(p + 8)}; }
// fp32 bits rounded to bf16 (nearest even), left in the high half of each 32-bit lane
inline __m256i rne_bits(__m256 a) {
  const __m256i b = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(b, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
  return _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)));
}
inline V round(V a) { return {_mm256_castsi256_ps(rne_bits(a.lo)), _mm256_castsi256_ps(rne_bits(a.hi))}; }
inline void st(bf16* p, V a) {
  // high halves of 16 lanes -> 16 uint16; packus works per 128-bit lane, so reorder after
  const __m256i packed =
      _mm256_packus_epi32(_mm256_srli_epi32(rne_bits(a.lo), 16), _mm256_srli_epi32(rne_bits(a.hi), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}

#else
#error "backend/kernels need AVX-512 (with BF16) or AVX2 with FMA"
#endif

}  // namespace msk
