"""int4 decode weights: they must reproduce the checkpoint's own 4-bit values, not approximate them."""

from __future__ import annotations

import pytest
import torch

from backend.engine.kv_cache import KVPool
from backend.kernels import int4 as int4_kernel
from backend.kernels.quant import Int4Weight, int4_supported, quantize_int4, quantize_int8
from backend.models import LlamaModel
from backend.tokenizer import Tokenizer
from tests.engine_helpers import prompt_batch

pytestmark = pytest.mark.skipif(
    not int4_supported(torch.device("cpu"), torch.bfloat16), reason="no CPU int4 kernel in this torch"
)


def _dequantized(q: Int4Weight, in_features: int) -> torch.Tensor:
    """The ``[out, in]`` weight an int4 weight stands for, read back through its own kernel."""
    dtype = q.scales_zeros.dtype
    return q.mm(torch.eye(in_features, dtype=dtype)).T


def test_int4_recovers_q4_1_weights_exactly_in_fp32(default_model_dir):
    """The default GGUF is Q4_1: each group of 32 is a scale and a minimum times codes 0..15.

    Re-quantizing must give back exactly the shipped values: read through the kernel with
    fp32 scales every weight is bit-identical; with the bf16 scales the engine serves with,
    every weight is the bf16 rounding of its code on the bf16 grid. Checked on the
    dequantized groups themselves, not on the source weights.
    """
    model = LlamaModel.from_dir(default_model_dir, dtype=torch.float32)
    layer = model.layers[7]
    for name in ("qkv", "o", "gate_up", "down"):
        w = getattr(layer, name)
        q32 = quantize_int4(w, torch.float32, own_kernel=False)
        assert q32.out_features == w.shape[0]
        deq = _dequantized(q32, w.shape[1])
        assert torch.equal(deq, w), f"{name}: max |error| {(deq - w).abs().max().item():.3g}"
        # Each dequantized group holds codes 0..15 on its own evenly spaced grid.
        sz = q32.scales_zeros  # [in / 32, out, 2]
        scale = sz[..., 0].T.repeat_interleave(32, 1)
        zero = sz[..., 1].T.repeat_interleave(32, 1)
        code = (deq - zero) / scale + 8
        assert (code - code.round()).abs().max() < 1e-3, name
        assert code.round().min() >= 0 and code.round().max() <= 15, name
        groups = deq.reshape(-1, 32)
        assert max(len(torch.unique(g)) for g in groups[:: max(1, len(groups) // 512)]) <= 16, name
        # What serving runs: bf16 scales and zeros, the same codes.
        qb = quantize_int4(w, torch.bfloat16)
        sb = qb.scales_zeros.float()
        expect = (
            (code.round() - 8) * sb[..., 0].T.repeat_interleave(32, 1) + sb[..., 1].T.repeat_interleave(32, 1)
        ).to(torch.bfloat16)
        assert torch.equal(_dequantized(qb, w.shape[1]), expect), name


def test_int8_rows_are_close():
    w = torch.randn(64, 128)
    q = quantize_int8(w, torch.bfloat16)
    out = q.mm(torch.eye(128, dtype=torch.bfloat16)).float().T
    assert (out - w).abs().max() < w.abs().max() / 100


def test_int4_model_predicts_like_fp32(default_model_dir):
    tok = Tokenizer.from_dir(default_model_dir)
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Why do cats purr? Explain."}]))

    def logits(model: LlamaModel, prompt_rows: bool) -> torch.Tensor:
        c = model.cfg
        pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, 1, 256, model.dtype)
        batch = prompt_batch(ids, decode_rows=not prompt_rows)
        return model.forward(batch, pool.k, pool.v)

    ref = logits(LlamaModel.from_dir(default_model_dir, dtype=torch.float32), True)
    q4 = LlamaModel.from_dir(default_model_dir, dtype=torch.bfloat16).quantize("int4")
    got = logits(q4, False)  # every token through the int4 path
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree


needs_own_kernel = pytest.mark.skipif(
    not int4_kernel.available(),
    reason="the bf16dp int4 kernel cannot be built here (no AVX512-BF16 or compiler)",
)


def _q_and_weight(n: int, k: int):
    """A random weight as int4 for our kernel and for torch's (same numbers), and the exact
    dequantized values both stand for."""
    torch.manual_seed(n + k)
    w = torch.randn(n, k) * 0.05
    ours = quantize_int4(w, torch.bfloat16)
    theirs = quantize_int4(w, torch.bfloat16, own_kernel=False)
    assert theirs.dp is None and torch.equal(theirs.scales_zeros, ours.scales_zeros)
    sz = ours.scales_zeros.float()  # [k/32, n, 2]
    scale = sz[..., 0].T.repeat_interleave(32, 1)
    zero = sz[..., 1].T.repeat_interleave(32, 1)
    deq = theirs.mm(torch.eye(k, dtype=torch.bfloat16))
    q = torch.round((deq.float().T - zero) / scale + 8).clamp(0, 15)
    return ours, theirs, (q - 8) * scale + zero


@needs_own_kernel
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
def test_own_int4_kernel_equals_the_dequantized_weights(rows):
    """Same numbers as torch's kernel (the packing is derived from its q / scale / zero);
    both within bf16 rounding of an exact fp32 product with the dequantized weights."""
    for n, k in ((960, 576), (576, 1536)):
        q4, torch_q4, exact_w = _q_and_weight(n, k)
        assert q4.dp is not None and q4.packed is None  # one packing kept, not two
        x = torch.randn(rows, k, dtype=torch.bfloat16)
        exact = x.float() @ exact_w.T
        ours = q4.mm(x).float()
        theirs = torch_q4.mm(x).float()
        tol = 1e-2 * exact.abs().max()
        assert (ours - exact).abs().max() < tol and (theirs - exact).abs().max() < tol
        assert (ours - theirs).abs().max() < tol


@needs_own_kernel
def test_own_int4_kernel_rows_do_not_depend_on_the_batch():
    """A token's result must not change with what shares its step (batching equivalence)."""
    q4, _, _ = _q_and_weight(576, 576)
    assert q4.dp is not None
    x = torch.randn(13, 576, dtype=torch.bfloat16)
    together = q4.mm(x)
    for i in (0, 5, 8, 12):
        assert torch.equal(q4.mm(x[i : i + 1])[0], together[i])


def test_pack_layout_is_what_the_kernel_reads():
    """Byte j of pair p of block b holds q[16b + j][2p] (low nibble) and q[16b + j][2p + 1]."""
    q = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    sz = torch.randn(2, 32, 2).to(torch.bfloat16)
    packed, szk = int4_kernel.pack(q, sz)
    assert packed.shape == (2, 32, 16) and szk.shape == (2, 2, 2, 16)
    b, p, j = 1, 7, 5
    assert packed[b, p, j] & 0xF == q[16 * b + j, 2 * p] and packed[b, p, j] >> 4 == q[16 * b + j, 2 * p + 1]
    assert szk[b, 1, 0, j] == sz[1, 16 * b + j, 0] and szk[b, 1, 1, j] == sz[1, 16 * b + j, 1]
    with pytest.raises(ValueError, match="N % 16"):
        int4_kernel.pack(q[:20], sz)
