"""From a step plan to the tensors one forward takes: packing and the attention mask.

The mask is a pure function of the grid coordinates (:func:`step_mask`), so the policies
(block-causal ``cross``, ``isolated``, the paper's ``skip_silence``) are unit-tested on
their own, without a model.
"""

from __future__ import annotations

import torch

from backend.engine.attention import MAX_CHANNELS
from backend.engine.kv_cache import KVPool
from backend.engine.scheduler import StepPlan
from backend.models.inputs import PackedBatch, PackedSplit


def step_mask(
    q_row: torch.Tensor,
    q_chan: torch.Tensor,
    q_idx: torch.Tensor,
    key_row: torch.Tensor,
    key_chan: torch.Tensor,
    key_tok: torch.Tensor,
    lengths: torch.Tensor,
    vis: torch.Tensor,
    skip_tok: torch.Tensor,
) -> torch.Tensor:
    """``[B, Q, L]`` bool, True where query ``q`` of session ``b`` may attend to key ``l``.

    Per session ``b``: queries ``[Q]`` (row, channel, own cache index; index -1 = padding),
    keys ``[L]`` (row, channel, token; only the first ``lengths[b]`` exist), the
    ``[MAX_CHANNELS, MAX_CHANNELS]`` visibility matrix ``vis[b]`` and the token whose keys
    are hidden (``skip_tok[b]``: the silence token with ``skip_silence``, else -1).

    A query sees a key when the key exists and either is the query itself, or lies in an
    earlier row on a channel it may see (and is not a hidden silence key). Padding queries
    see key 0 only, so their softmax stays finite (their output is discarded).
    """
    b, q = q_row.shape
    l = key_row.shape[1]  # noqa: E741 - the usual name for the key axis
    key_pos = torch.arange(l)
    exists = key_pos[None, :] < lengths[:, None]  # [B, L]
    pair = q_chan[:, :, None] * MAX_CHANNELS + key_chan[:, None, :]
    allowed = vis.view(b, -1).gather(1, pair.view(b, -1)).view(b, q, l)
    visible = allowed & (key_row[:, None, :] < q_row[:, :, None])
    visible &= ~(key_tok == skip_tok[:, None])[:, None, :]
    mask = exists[:, None, :] & (visible | (key_pos[None, None, :] == q_idx[:, :, None]))
    mask[:, :, 0] |= q_idx < 0
    return mask


def pack(
    plan: StepPlan,
    pool: KVPool,
    device: torch.device,
    *,
    channel_embedding: bool,
    int4_rows: int | None,
    int4_prompts: bool = False,
    block: int = 16,
) -> PackedBatch:
    """The plan's tokens as one packed batch: per-token slot/cache index for the KV writes,
    the padded ``[B, 1, Q, L]`` mask for attention, which tokens need logits, and (with int4
    weights, ``int4_rows`` not None) which tokens take the dense and which the int4 matmuls
    (``int4_prompts``: prompt tokens int4 too, ``PackedSplit.from_flags``). A step with
    prompt tokens also carries each session's query span, for attention in ``block``-aligned
    pieces (``LlamaModel._attention``)."""
    n = len(plan)
    slices = plan.slices
    b = len(slices)
    max_q = max(sl.count for sl in slices)
    slots = [sl.session.slot for sl in slices]
    lengths = [pool.lengths[s] for s in slots]
    key_len = max(lengths)
    slot_per_tok = torch.empty(n, dtype=torch.long)
    cache_idx = torch.empty(n, dtype=torch.long)
    pad_index = torch.empty(n, dtype=torch.long)
    q_row = torch.zeros((b, max_q), dtype=torch.int32)
    q_chan = torch.zeros((b, max_q), dtype=torch.long)
    q_idx = torch.full((b, max_q), -1, dtype=torch.long)
    pos_t = torch.tensor(plan.positions, dtype=torch.int32)
    chan_t = torch.tensor(plan.chans, dtype=torch.long)
    skip = torch.full((b,), -1, dtype=torch.long)
    for i, sl in enumerate(slices):
        start, cnt = sl.start, sl.count
        slot_per_tok[start : start + cnt] = sl.session.slot
        idx = torch.arange(sl.first, sl.first + cnt)
        cache_idx[start : start + cnt] = idx
        pad_index[start : start + cnt] = torch.arange(i * max_q, i * max_q + cnt)
        q_row[i, :cnt] = pos_t[start : start + cnt]
        q_chan[i, :cnt] = chan_t[start : start + cnt]
        q_idx[i, :cnt] = idx
        rules = sl.session.rules
        if rules is not None and rules.skip_silence:
            skip[i] = rules.silence_id
    slots_t = torch.tensor(slots, dtype=torch.long)
    mask = step_mask(
        q_row,
        q_chan,
        q_idx,
        pool.rows[slots_t, :key_len],
        pool.chans[slots_t, :key_len],
        pool.toks[slots_t, :key_len],
        torch.tensor(lengths),
        torch.stack([sl.session.vis for sl in slices]),
        skip,
    )
    is_prompt = [False] * n
    for sl in slices:
        if sl.prefill:
            is_prompt[sl.start : sl.start + sl.count] = [True] * sl.count
    return PackedBatch(
        tokens=torch.tensor(plan.tokens, dtype=torch.long, device=device),
        positions=pos_t.to(device, torch.long),
        channel_embed_ids=torch.tensor(plan.embeds, dtype=torch.long, device=device)
        if channel_embedding
        else None,
        slot=slot_per_tok.to(device),
        cache_index=cache_idx.to(device),
        slot_list=slots,
        slots_tensor=slots_t.to(device),
        pad_index=pad_index.to(device),
        max_q=max_q,
        key_len=key_len,
        mask=mask[:, None].to(device),
        logit_index=torch.tensor(plan.logit_index, dtype=torch.long, device=device),
        split=PackedSplit.from_flags(is_prompt, int4_rows, int4_prompts) if int4_rows is not None else None,
        prompt_spans=[(sl.first, sl.count) for sl in slices] if any(is_prompt) else None,
        attention_block=block,
    )


__all__ = ["pack", "step_mask"]
