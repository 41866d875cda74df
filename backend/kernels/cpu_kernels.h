// The project's CPU kernels (AVX512-BF16, or AVX2 + FMA: simd.h), one extension per variant:
// declarations shared by its sources.
//
//   int4_bf16dp.cpp  int4 x bf16 matmul for decode rows (the decoder layers' weights)
//   int8_bf16dp.cpp  int8 (groups of 32, one fp32 scale each) x bf16 -> fp32: the LM head
//   decode_step.cpp  a whole decode step (every layer, attention over the KV pool, LM head)
//   bindings.cpp     the Python module
//   simd.h           16 fp32 lanes on either instruction set
//
// Every kernel runs each row through the same instructions in the same order whatever the
// number of rows, so a token's result never depends on what else is in its step.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace msk {

// out[M, N] (bf16, row stride ldo) = x[M, K] (bf16, contiguous) times an int4 weight in the
// bf16dp layout (packed [N/16][K/2][16] uint8, sz [N/16][K/32][2][16] bf16). Parallel over N.
void int4_mm_raw(const at::BFloat16* x, int64_t M, int64_t K, const uint8_t* packed, const at::BFloat16* sz,
                 int64_t N, at::BFloat16* out, int64_t ldo);

// out[M, N] (fp32) = x[M, K] (bf16) times an int8 weight (packed [N/16][K/2][16][2] int8,
// scales [N/16][K/32][16] fp32: w = q * scale). Parallel over N.
void int8_mm_raw(const at::BFloat16* x, int64_t M, int64_t K, const int8_t* packed, const float* scales,
                 int64_t N, float* out, int64_t ldo);

// The same, for the output blocks [nb_lo, nb_hi) of 16 columns only, on the calling thread;
// ``prep`` (M * int4_prep_floats(K) floats) from int4_prep: the per-group input sums the zero
// point needs, and on AVX2 also the inputs widened to fp32 once (simd.h).
int64_t int4_prep_floats(int64_t K);
void int4_prep(const at::BFloat16* x, int64_t M, int64_t K, float* prep);
void int4_mm_blocks(const at::BFloat16* x, int64_t M, int64_t K, const float* prep, const uint8_t* packed,
                    const at::BFloat16* sz, at::BFloat16* out, int64_t ldo, int64_t nb_lo, int64_t nb_hi);
void int8_mm_blocks(const at::BFloat16* x, int64_t M, int64_t K, const int8_t* packed, const float* scales,
                    float* out, int64_t ldo, int64_t nb_lo, int64_t nb_hi);

at::Tensor int4_mm(at::Tensor x, at::Tensor packed, at::Tensor sz);
at::Tensor int8_mm(at::Tensor x, at::Tensor packed, at::Tensor scales);

}  // namespace msk
