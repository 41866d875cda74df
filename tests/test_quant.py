"""int4 decode weights: they must reproduce the checkpoint's own 4-bit values, not approximate them."""

from __future__ import annotations

import pytest
import torch

from backend.kv_cache import KVPool
from backend.llama import LlamaModel, PackedBatch, PackedSplit
from backend.quant import int4_supported, quantize_int4, quantize_int8
from backend.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(
    not int4_supported(torch.device("cpu"), torch.bfloat16), reason="no CPU int4 kernel in this torch"
)


def test_int4_recovers_q4_1_weights_exactly_in_fp32(default_model_dir):
    """The default GGUF is Q4_1: every group of 32 holds at most 16 evenly spaced values."""
    model = LlamaModel.from_dir(default_model_dir, dtype=torch.float32)
    w = model.layers[7].gate_up
    q = quantize_int4(w, torch.float32)
    eye = torch.eye(w.shape[1], dtype=torch.bfloat16)
    deq = quantize_int4(w, torch.bfloat16).mm(eye).float().T
    assert q.out_features == w.shape[0]
    # bf16 scales round a little: error of the order of bf16 rounding of the weights themselves.
    assert (deq - w).abs().mean() < 1e-3 * w.abs().mean() * 10
    g = w.reshape(w.shape[0], -1, 32)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    steps = (g - lo) / ((hi - lo) / 15).clamp(min=1e-12)
    assert (steps - steps.round()).abs().max() < 1e-3


def test_int8_rows_are_close():
    w = torch.randn(64, 128)
    q = quantize_int8(w, torch.bfloat16)
    out = q.mm(torch.eye(128, dtype=torch.bfloat16)).float().T
    assert (out - w).abs().max() < w.abs().max() / 100


def test_int4_model_predicts_like_fp32(default_model_dir):
    tok = Tokenizer.from_dir(default_model_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Why do cats purr? Explain."}]))
    n = len(ids)

    def logits(model: LlamaModel, prompt_rows: bool) -> torch.Tensor:
        c = model.cfg
        pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, 1, 256, model.dtype)
        batch = PackedBatch(
            tokens=torch.tensor(ids),
            positions=torch.arange(n),
            channel_embed_ids=None,
            slot=torch.zeros(n, dtype=torch.long),
            cache_index=torch.arange(n),
            slot_list=[0],
            slots_tensor=torch.tensor([0]),
            pad_index=torch.arange(n),
            max_q=n,
            key_len=n,
            mask=torch.ones(n, n, dtype=torch.bool).tril()[None, None],
            logit_index=torch.arange(n),
            split=PackedSplit.from_flags([prompt_rows] * n),
        )
        return model.forward(batch, pool.k, pool.v)

    ref = logits(LlamaModel.from_dir(default_model_dir, dtype=torch.float32), True)
    q4 = LlamaModel.from_dir(default_model_dir, dtype=torch.bfloat16).quantize("int4")
    got = logits(q4, False)  # every token through the int4 path
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree
