"""int8 weights in groups of 32 (one fp32 scale each) for the LM head, on our AVX512-BF16 kernel.

Why: the LM head is a small model's largest matmul (SmolLM2-135M: 49152 x 576, 57 MB in bf16)
and every decode step reads all of it. The default checkpoint ships it at 8 bits (GGUF Q8_0:
groups of 32, ``w = q * d``, ``d = max|w| / 127``); quantizing the dequantized weights the
same way gives back those 8-bit values (up to the bf16 rounding of the conversion), so the
head reads the checkpoint's own numbers in half the bytes. Each row's logits go through the
same instructions whatever else is in the batch (``int8_bf16dp.cpp``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.kernels import native

GROUP = 32


@dataclass
class Int8Head:
    """``[out, in]`` as int8 ``packed`` ``[out/16, in/2, 16, 2]`` and fp32 ``scales`` ``[out/16, in/32, 16]``."""

    packed: torch.Tensor
    scales: torch.Tensor
    out_features: int

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [M, in] (any float dtype) -> fp32 logits [M, out]."""
        module = native.module()
        assert module is not None, "int8 kernel not available"
        return module.int8_mm(x.to(torch.bfloat16).contiguous(), self.packed, self.scales)

    def dequantize(self) -> torch.Tensor:
        """The fp32 ``[out, in]`` weight these bytes stand for (tests, references)."""
        nb, half, _, _ = self.packed.shape
        q = self.packed.permute(0, 2, 1, 3).reshape(nb * 16, half * 2).float()
        s = self.scales.permute(0, 2, 1).reshape(nb * 16, -1).repeat_interleave(GROUP, 1)
        return q * s


def supported(w: torch.Tensor) -> bool:
    out_f, in_f = w.shape
    return native.has("int8_mm") and out_f % 16 == 0 and in_f % GROUP == 0


def quantize_int8_head(w: torch.Tensor) -> Int8Head:
    """Symmetric int8 per group of 32 inputs, ``scale = max|w| / 127`` (Q8_0's rule)."""
    out_f, in_f = w.shape
    if out_f % 16 or in_f % GROUP:
        raise ValueError(f"int8 head needs out % 16 == 0 and in % {GROUP} == 0, got {out_f} x {in_f}")
    wf = w.detach().float().reshape(out_f, in_f // GROUP, GROUP)
    scale = wf.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, wf / scale.clamp(min=1e-30), torch.zeros_like(wf)).round().clamp(-127, 127)
    q = q.to(torch.int8).reshape(out_f, in_f)
    packed = q.reshape(out_f // 16, 16, in_f // 2, 2).permute(0, 2, 1, 3).contiguous()
    scales = scale.reshape(out_f // 16, 16, in_f // GROUP).permute(0, 2, 1).contiguous()
    return Int8Head(packed, scales, out_f)
