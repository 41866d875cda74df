"""Weight-only int4 (group-wise, asymmetric) for the memory-bound decode rows.

Why: a decode step reads every weight once to produce a handful of tokens, so its speed
is the memory bandwidth divided by the weights' bytes. On this project's CPU a bf16 step
of SmolLM2-135M moves ~270 MB and takes as long as HF ``generate`` (both sit at the same
bandwidth wall); int4 weights move ~4x less. The default checkpoint ships as GGUF Q4_1
(4-bit, groups of 32, a scale and a minimum per group), which is exactly this format, so
re-quantizing its dequantized weights with group 32 recovers the shipped values up to the
rounding of the scales.

Large-M matmuls (prefill chunks) are compute-bound and faster in dense bf16, so the model
keeps both and picks per token kind (prompt tokens dense, decode rows int4) and, above
``EngineConfig.int4_max_rows`` decode rows in one step, dense for all: past that size the
int4 kernel is slower. Below it, a token's numerics do not depend on what shares its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.kernels import int4 as int4_kernel

GROUP_SIZE = 32


@dataclass
class Int4Weight:
    """A ``[out, in]`` int4 weight: packed for torch's CPU kernel and, where it builds, for ours.

    ``dp`` holds the same numbers in the layout of ``backend.kernels.int4`` (bf16 dot
    products: extra rows nearly free); ``mm`` uses it when present, else torch's kernel.
    """

    packed: torch.Tensor | None  # torch's packing; None when ``dp`` is used instead
    scales_zeros: torch.Tensor  # [in / group, out, 2] in the activation dtype
    out_features: int
    group: int
    dp: tuple[torch.Tensor, torch.Tensor] | None = None

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.scales_zeros.dtype:
            x = x.to(self.scales_zeros.dtype)
        if self.dp is not None:
            return int4_kernel.mm(x, *self.dp)
        return torch._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_zeros)


def int4_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """The packed kernel used here is the CPU one; CUDA would take TensorRT-LLM's instead."""
    return device.type == "cpu" and dtype == torch.bfloat16 and hasattr(torch, "_weight_int4pack_mm_for_cpu")


def quantize_int4(
    w: torch.Tensor, dtype: torch.dtype, group: int = GROUP_SIZE, own_kernel: bool = True
) -> Int4Weight:
    """Min/max asymmetric 4-bit quantization per group of ``group`` input features.

    ``own_kernel``: pack for ``backend.kernels.int4`` when it is available here and the
    shape suits it (out_features a multiple of 16), else for torch's kernel.
    """
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"in_features {in_f} is not a multiple of the int4 group size {group}")
    wf = w.detach().float().reshape(out_f, in_f // group, group)
    lo = wf.amin(-1, keepdim=True)
    hi = wf.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((wf - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale.
    zero = lo + 8 * scale
    sz = torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)  # [in/g, out, 2]
    fits = group == int4_kernel.GROUP and out_f % 16 == 0 and dtype == torch.bfloat16
    if own_kernel and fits and int4_kernel.available():
        return Int4Weight(None, sz, out_f, group, int4_kernel.pack(q, sz))
    return Int4Weight(torch._convert_weight_to_int4pack_for_cpu(q, 1), sz, out_f, group)


@dataclass
class Int8Weight:
    """A ``[out, in]`` weight as int8 with one scale per output row (``_weight_int8pack_mm``).

    For weights that are not 4-bit in the checkpoint: SmolLM2's GGUF keeps its (tied)
    embedding / LM head at 8 bits, and forcing it to 4 bits visibly changes answers.
    """

    weight: torch.Tensor
    scales: torch.Tensor

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.scales.dtype:
            x = x.to(self.scales.dtype)
        return torch._weight_int8pack_mm(x, self.weight, self.scales)


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> Int8Weight:
    """Symmetric per-row int8."""
    wf = w.detach().float()
    scale = (wf.abs().amax(-1) / 127).clamp(min=1e-8)
    q = (wf / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    return Int8Weight(q.contiguous(), scale.to(dtype))
