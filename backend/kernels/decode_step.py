"""A whole int4 decode step in one C++ call (``decode_step.cpp``), with the torch forward as fallback.

Why: measured on this project's 2-core CPU, the torch forward of a one-row SmolLM2-135M
step spent more time in per-op Python and dispatcher overhead (about 25 small ops per layer,
30 layers) than in its int4 matmuls; the C++ step runs the same computation with no Python
in between and reads the LM head as int8 (``backend.kernels.int8``). The alternative the
issue names, ``torch.compile`` at fixed row buckets, was measured against it
(``python -m bench.compile_step``): even with our kernels as torch custom ops, so inductor
sees whole layers, the compiled step took 2.0x / 1.6x / 1.3x the C++ step's time at 1 / 4 /
16 rows, compiled for up to a minute per bucket and did not keep torch's rounding points
(docs/performance.md).

Used for steps whose every token takes the int4 weights (decode rows, at most
``int4_max_rows`` of them) when the model is bf16 with our int4 kernel and the KV pool is
fp32 (the CPU defaults); prompt chunks keep the torch forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from backend.kernels import native

if TYPE_CHECKING:
    from backend.models.inputs import PackedBatch
    from backend.models.llama import LlamaModel


class FusedDecodeStep:
    """The C++ step built once from a quantized model's weights (no copies: it holds references)."""

    def __init__(self, model: LlamaModel, head: Any) -> None:
        module = native.module()
        assert module is not None, "CPU kernels not available"
        cfg = model.cfg
        t = torch.arange(max(cfg.max_position_embeddings, 4096), dtype=torch.float32)
        freqs = torch.outer(t, model._inv_freq.float().cpu())
        emb = torch.cat([freqs, freqs], dim=-1)
        self.max_positions = emb.shape[0]
        self._step = module.DecodeStep(
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.hidden_size,
            cfg.intermediate_size,
            float(cfg.rms_norm_eps),
            model.final_norm,
            head.packed,
            head.scales,
            # the bf16 table of the torch path (llama.py _ensure_rope), widened: same numbers
            emb.cos().to(model.dtype).float().contiguous(),
            emb.sin().to(model.dtype).float().contiguous(),
        )
        for layer in model.layers:
            q4 = layer.q4 or {}
            dp = {name: q4[name].dp for name in ("qkv", "o", "gate_up", "down")}
            assert all(v is not None for v in dp.values()), "every int4 weight must use our kernel's packing"
            self._step.add_layer(
                layer.input_norm,
                layer.post_norm,
                *dp["qkv"],
                *dp["o"],
                *dp["gate_up"],
                *dp["down"],
                layer.qkv_bias,
                layer.q_norm,
                layer.k_norm,
            )

    def forward(
        self, x: torch.Tensor, batch: PackedBatch, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor]
    ) -> torch.Tensor:
        """``x``: the step's embedded tokens (bf16 ``[n, hidden]``) -> fp32 logits ``[m, vocab]``."""
        return self._step.forward(
            x,
            batch.positions,
            batch.slot,
            batch.cache_index,
            batch.pad_index,
            batch.max_q,
            batch.key_len,
            batch.slots_tensor,
            batch.mask,
            batch.logit_index,
            kv_k,
            kv_v,
        )


def eligible(model: LlamaModel, kv_dtype: torch.dtype) -> bool:
    """The fused step's preconditions: int4 via our kernel, bf16 on CPU, an fp32 pool, and
    shapes its 16-lane loops take (hidden and intermediate % 16, head_dim % 32, <= 512)."""
    c = model.cfg
    return (
        c.hidden_size % 16 == 0
        and c.intermediate_size % 16 == 0
        and c.head_dim % 32 == 0
        and c.head_dim <= 512
        and c.num_heads % c.num_kv_heads == 0
        and native.has("DecodeStep")
        and model.int4_kernel == "bf16dp"
        and model.dtype == torch.bfloat16
        and model.device.type == "cpu"
        and kv_dtype == torch.float32
    )
