"""Our own int4 decode kernel (AVX512-BF16), built on first use, with torch's as fallback.

Why: torch's CPU int4 kernel multiplies in fp32, so its cost grows with every row; ours
widens each 4-bit weight to bf16 once and spends one ``VDPBF16PS`` per row on it (see
``int4_bf16dp.cpp`` beside this file). The extension is compiled by ``backend.kernels.build``
into the project's cache the first time a process needs it (about 30 s, once per machine;
an interrupted build never blocks a later one); where there is no compiler or no
AVX512-BF16, ``available()`` is False and the model keeps torch's kernel.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

from backend.kernels import build

log = logging.getLogger(__name__)

GROUP = 32  # the kernel's group size (kGroup in the source)
NAME = "multistream_int4_bf16dp"
SOURCE = Path(__file__).parent / "int4_bf16dp.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-fopenmp"]
LDFLAGS = ["-fopenmp"]


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@functools.cache
def _module():
    """The compiled extension, or None (logged once) when it cannot be built here."""
    if os.environ.get("MULTISTREAM_INT4_KERNEL", "auto") == "torch" or not _cpu_has_avx512_bf16():
        return None
    try:
        return build.load(NAME, [SOURCE], FLAGS, LDFLAGS)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, old binutils: fall back
        log.warning("int4 kernel not built (%s: %s); using torch's", type(exc).__name__, exc)
        return None


def available() -> bool:
    return _module() is not None


def is_built() -> bool:
    """Whether the extension is already in the kernel cache (loading is then instant)."""
    return build.is_built(NAME, [SOURCE], FLAGS, LDFLAGS)


def prebuild(say=None) -> str:
    """Builds the extension now, before several processes need it at once; returns which
    kernel decode rows will use. The launcher calls it so that Triton's model stubs only
    load the cached library instead of racing to compile it during start-up."""
    if say is not None and _cpu_has_avx512_bf16() and not is_built():
        say("building the int4 decode kernel (once per machine, about 30 s) ...")
    return "bf16dp" if available() else "torch"


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
    module = _module()
    assert module is not None, "int4 kernel not available"
    return module.int4_mm(x, packed, sz)
