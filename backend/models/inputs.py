"""What one forward takes: the packed tokens of a step and the attention metadata.

Defined beside the models (not the engine) because it is the models' input contract:
``backend.engine.batch`` builds it, every model family reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """One step's tokens from every session in the batch, flattened, plus what attention needs."""

    tokens: torch.Tensor  # [n] int64
    positions: torch.Tensor  # [n] RoPE position = row index
    channel_embed_ids: torch.Tensor | None  # [n] channel-embedding row, None for ordinary checkpoints
    slot: torch.Tensor  # [n] KV slot of each token
    cache_index: torch.Tensor  # [n] index in that slot
    slot_list: list[int]  # distinct slots, in batch order
    slots_tensor: torch.Tensor  # [B]
    pad_index: torch.Tensor  # [n] position of each token in the [B * max_q] padded layout
    max_q: int
    key_len: int
    mask: torch.Tensor  # [B, 1, max_q, key_len] bool, True = may attend
    logit_index: torch.Tensor  # [m] which packed tokens need logits
    split: PackedSplit | None = None  # which tokens are prompt (dense) and which decode (int4)
    #: Steps with prompt tokens: per session, ``(first cache index, query count)``, and the
    #: block that prompt attention is computed in (``LlamaModel._attention``); None otherwise.
    prompt_spans: list[tuple[int, int]] | None = None
    attention_block: int = 16

    @property
    def slot_range(self) -> tuple[int, int] | None:
        """``(lo, hi)`` when the batch's slots are exactly ``lo..hi-1`` in order."""
        lo = self.slot_list[0]
        if self.slot_list == list(range(lo, lo + len(self.slot_list))):
            return lo, lo + len(self.slot_list)
        return None

    @property
    def num_sessions(self) -> int:
        return len(self.slot_list)


@dataclass
class PackedSplit:
    """Prompt tokens (dense matmuls) versus decode-row tokens (int4 matmuls) of one step."""

    dense: torch.Tensor
    q4: torch.Tensor
    all_dense: bool
    all_q4: bool

    @classmethod
    def from_flags(
        cls, is_prompt: list[bool], int4_max_rows: int | None = None, int4_prompts: bool = False
    ) -> PackedSplit:
        """``int4_max_rows``: above that many decode tokens, dense matmuls are faster.

        An int4 kernel's cost grows with rows while dense bf16 stays memory-bound, so they
        cross: at about 20 rows with torch's kernel and about 100 with ours on 2 cores
        (figures at ``EngineConfig.int4_max_rows``). So a step with more decode rows than that
        runs them dense, as any serving stack picks its GEMM kernel by batch size. The price:
        a decode token's numerics depend on whether its step had more than that many rows
        (int4 and dense weights differ by the 4-bit rounding).

        ``int4_prompts``: prompt tokens take the int4 weights, in every step whatever its size
        (``EngineConfig.int4_prompts``): a step of int4 decode rows and prompt chunks is then
        the one fused C++ call, and a prompt token's numerics never depend on the step it
        landed in (the prefix cache relies on that: ``LlamaModel._attention``). Otherwise
        prompt tokens are dense.
        """
        decode_dense = int4_max_rows is not None and len(is_prompt) - sum(is_prompt) > int4_max_rows
        flags = torch.tensor([not int4_prompts if p else decode_dense for p in is_prompt], dtype=torch.bool)
        dense = flags.nonzero().flatten()
        q4 = (~flags).nonzero().flatten()
        return cls(dense, q4, all_dense=q4.numel() == 0, all_q4=dense.numel() == 0)
