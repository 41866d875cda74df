"""Weight formats and the native kernels that multiply by them.

``quant``: group-wise int4 (and per-row int8) weights for the memory-bound decode rows;
``int4``: our AVX512-BF16 int4 matmul (``int4_bf16dp.cpp``), built on first use, with
torch's kernel as the fallback.
"""
