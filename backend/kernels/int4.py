"""Our own int4 decode kernel (AVX512-BF16), built on first use, with torch's as fallback.

Why: torch's CPU int4 kernel multiplies in fp32, so its cost grows with every row; ours
widens each 4-bit weight to bf16 once and spends one ``VDPBF16PS`` per row on it (see
``int4_bf16dp.cpp`` beside this file), part of the project's one C++ extension
(``backend.kernels.native``), compiled into the project's cache the first time a process
needs it (once per machine; an interrupted build never blocks a later one); where there is no
compiler or no AVX512-BF16, ``available()`` is False and the model keeps torch's kernel.
"""

from __future__ import annotations

import torch

from backend.kernels import native

GROUP = 32  # the kernel's group size (kGroup in the source)


def available() -> bool:
    return native.module() is not None


def is_built() -> bool:
    """Whether the extension is already in the kernel cache (loading is then instant)."""
    return native.is_built()


def prebuild(say=None) -> str:
    """Builds the extension now, before several processes need it at once; returns which
    kernel decode rows will use. The launcher calls it so that Triton's model stubs only
    load the cached library instead of racing to compile it during start-up."""
    return "bf16dp" if native.prebuild(say) else "torch"


def pack(q: torch.Tensor, scales_zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``q`` [N, K] ints 0..15 and ``scales_zeros`` [K/32, N, 2] bf16 (torch's layout) ->
    ``packed`` [N/16, K/2, 16] uint8 and ``sz`` [N/16, K/32, 2, 16] bf16 (the kernel's)."""
    n, k = q.shape
    if n % 16 or k % 32:
        raise ValueError(f"int4 kernel needs N % 16 == 0 and K % 32 == 0, got {n} x {k}")
    pairs = q.to(torch.uint8).reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).contiguous()
    sz = scales_zeros.reshape(k // 32, n // 16, 16, 2).permute(1, 0, 3, 2).contiguous()
    return packed, sz


def mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    module = native.module()
    assert module is not None, "int4 kernel not available"
    return module.int4_mm(x, packed, sz)
