"""The C++ decode step (``backend.kernels.decode_step``) and the int8 LM head against the torch forward.

The reference is the project's own torch forward on the same int4 weights (the path every
prompt chunk still takes) and the fp32 model; nothing here is compared with a number the
C++ code produced itself.
"""

from __future__ import annotations

import pytest
import torch

from backend.engine.kv_cache import KVPool
from backend.kernels import decode_step, int8, native
from backend.models import LlamaModel
from backend.models.config import ModelConfig
from backend.models.inputs import PackedBatch, PackedSplit
from backend.tokenizer import Tokenizer
from tests.engine_helpers import prompt_batch

pytestmark = pytest.mark.skipif(
    not native.has("DecodeStep"),
    reason="the project's CPU kernels cannot be built here (no AVX512-BF16 or compiler)",
)

PROMPTS = ("Why do cats purr? Explain.", "Write a haiku about the sea.", "What is 17 times 23?")


def run(model: LlamaModel, batch: PackedBatch, sessions: int = 1) -> torch.Tensor:
    c = model.cfg
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, sessions, 256, torch.float32)
    return model.forward(batch, pool.k, pool.v)


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.fixture(scope="module")
def models(default_model_dir):
    fused = LlamaModel.from_dir(default_model_dir, dtype=torch.bfloat16).quantize("int4")
    torch_path = LlamaModel.from_dir(default_model_dir, dtype=torch.bfloat16).quantize("int4")
    torch_path._fused_step = lambda batch, kv_k: None  # the torch forward, same weights, int8 head
    fp32 = LlamaModel.from_dir(default_model_dir, dtype=torch.float32)
    return fused, torch_path, fp32, Tokenizer.from_dir(default_model_dir)


def test_fused_step_predicts_like_the_torch_forward_and_the_fp32_model(models) -> None:
    fused, torch_path, fp32, tok = models
    kl_fused, kl_torch, agree_torch, agree_fp32 = [], [], [], []
    for text in PROMPTS:
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
        got = run(fused, prompt_batch(ids, True))
        assert fused._fused is not None, "an all-int4 step must take the C++ path"
        ref = run(torch_path, prompt_batch(ids, True))
        exact = run(fp32, prompt_batch(ids, False))
        kl_fused.append(kl(exact, got))
        kl_torch.append(kl(exact, ref))
        agree_torch.append((got.argmax(-1) == ref.argmax(-1)).float())
        agree_fp32.append((got.argmax(-1) == exact.argmax(-1)).float())
    # As close to the fp32 model as the torch int4 path is (measured: KL 0.0015 vs 0.0017).
    assert torch.cat(kl_fused).mean() <= 1.25 * torch.cat(kl_torch).mean()
    assert torch.cat(agree_fp32).mean() >= 0.95
    assert torch.cat(agree_torch).mean() >= 0.95


def test_a_rows_logits_do_not_depend_on_its_batch(models) -> None:
    """Six sessions' decode rows in one step, and each alone: bitwise the same logits."""
    fused = models[0]
    c = fused.cfg
    keys = 40
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, 6, 128, torch.float32)
    g = torch.Generator().manual_seed(1)
    for t in pool.k + pool.v:
        t.copy_(torch.randn(t.shape, generator=g))

    def step(slots: list[int]) -> torch.Tensor:
        b = len(slots)
        batch = PackedBatch(
            tokens=torch.tensor([100 + s for s in slots]),
            positions=torch.full((b,), keys),
            channel_embed_ids=None,
            slot=torch.tensor(slots),
            cache_index=torch.full((b,), keys),
            slot_list=slots,
            slots_tensor=torch.tensor(slots),
            pad_index=torch.arange(b),
            max_q=1,
            key_len=keys + 1,
            mask=torch.ones(b, 1, 1, keys + 1, dtype=torch.bool),
            logit_index=torch.arange(b),
            split=PackedSplit.from_flags([False] * b),
        )
        return fused.forward(batch, pool.k, pool.v)

    batched = step(list(range(6)))
    for s in range(6):
        assert torch.equal(step([s])[0], batched[s]), f"session {s}'s logits changed with its batch"
    assert not torch.equal(batched[0], batched[1])  # the rows really are different tokens


def test_int8_head_reads_the_checkpoints_8_bit_values(models) -> None:
    """Quantizing the head again from its own dequantized values changes nothing (Q8_0's rule),
    and the kernel equals an fp32 product with those values within bf16 rounding of x."""
    fused = models[0]
    head = fused.head_q8
    assert head is not None
    w = head.dequantize()
    again = int8.quantize_int8_head(w)
    assert torch.equal(again.packed, head.packed)
    x = torch.randn(5, w.shape[1]).bfloat16()
    exact = x.float() @ w.T
    got = head.mm(x)
    assert (got - exact).abs().max() < 1e-3 * exact.abs().max()
    assert (w - fused.lm_head.float()).abs().max() <= fused.lm_head.float().abs().max() / 127


def test_steps_the_fused_path_does_not_take_use_the_torch_forward(models) -> None:
    fused, _, fp32, tok = models
    assert not decode_step.eligible(fp32, torch.float32)  # fp32 model: exact path
    assert not decode_step.eligible(fused, torch.bfloat16)  # bf16 pool
    ids = tok.encode("Hello there")
    batch = prompt_batch(ids, decode_rows=False)  # a prompt chunk: dense weights
    assert fused._fused_step(batch, [torch.zeros(1)]) is None
    tiny = ModelConfig(
        vocab_size=64,
        hidden_size=40,  # not a multiple of 16: the C++ step does not take it
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=20,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_bias=False,
        architecture="LlamaForCausalLM",
    )
    assert not decode_step.eligible(LlamaModel.random(tiny, dtype=torch.bfloat16), torch.float32)


def test_split_gives_prompt_tokens_int4_in_every_step() -> None:
    """``int4_prompts``: prompt tokens int4 whatever the step's size (a prompt token must
    compute the same in any step); decode rows go dense only when there are more than the
    limit; without it prompt tokens are dense."""
    mixed = [False] * 3 + [True] * 5
    assert PackedSplit.from_flags(mixed, 8, int4_prompts=True).all_q4
    assert PackedSplit.from_flags(mixed + [True] * 20, 8, int4_prompts=True).all_q4
    many_rows = PackedSplit.from_flags([False] * 9 + [True] * 2, 8, int4_prompts=True)
    assert many_rows.dense.tolist() == list(range(9)) and many_rows.q4.tolist() == [9, 10]
    off = PackedSplit.from_flags(mixed, 8, int4_prompts=False)
    assert off.q4.tolist() == [0, 1, 2] and off.dense.tolist() == list(range(3, 8))
    assert PackedSplit.from_flags([False] * 9, 8, int4_prompts=True).all_dense  # many decode rows
    assert PackedSplit.from_flags([False] * 9 + [True], None, int4_prompts=False).q4.tolist() == list(
        range(9)
    )


def test_int4_prompts_auto_follows_our_int4_kernel() -> None:
    """auto: int4 prompts wherever decode rows take our kernel (``bf16dp``), not with torch's
    or none; an explicit setting wins; the model parameter is auto / true / false only."""
    from backend.engine import config
    from backend.serving.parameters import parse_auto_bool

    assert config.resolve_int4_prompts(None, "bf16dp") is True
    assert config.resolve_int4_prompts(None, "torch") is False
    assert config.resolve_int4_prompts(None, None) is False
    assert config.resolve_int4_prompts(True, None) is True
    assert config.resolve_int4_prompts(False, "bf16dp") is False
    assert [parse_auto_bool("int4_prompts", v) for v in ("auto", "", None, "TRUE", "0")] == [
        None, None, None, True, False
    ]  # fmt: skip
    with pytest.raises(ValueError, match="int4_prompts must be auto, true or false"):
        parse_auto_bool("int4_prompts", "ture")


def test_a_mixed_step_is_one_fused_call_and_no_token_depends_on_its_batch(models, default_model_dir) -> None:
    """Decode rows of three sessions plus a fresh session's prompt chunk in one step: with
    ``int4_prompts`` the step takes the C++ path, the decode rows' logits are bitwise those
    of a decode-only step, and the chunk's last logits bitwise those of the prompt alone."""
    fused, torch_path, _, tok = models
    c = fused.cfg
    keys, dec = 40, 3
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}]))
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, dec + 1, 128, torch.float32)
    g = torch.Generator().manual_seed(2)
    for t in pool.k + pool.v:
        t.copy_(torch.randn(t.shape, generator=g))

    def step(decode: bool, prompt: bool) -> torch.Tensor:
        chunk = len(ids) if prompt else 0
        rows = dec if decode else 0
        b = rows + (1 if prompt else 0)
        max_q = max(chunk, 1)
        key_len = max(keys + 1 if decode else 0, chunk)
        mask = torch.zeros(b, 1, max_q, key_len, dtype=torch.bool)
        mask[:rows, :, 0, : keys + 1] = True
        mask[:rows, :, 1:, 0] = True  # padding queries see key 0 (batch.step_mask's rule)
        if prompt:
            mask[rows, 0, :chunk, :chunk] = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool))
        slots = list(range(rows)) + ([dec] if prompt else [])
        n = rows + chunk
        batch = PackedBatch(
            tokens=torch.tensor([100 + s for s in range(rows)] + ids[:chunk]),
            positions=torch.tensor([keys] * rows + list(range(chunk))),
            channel_embed_ids=None,
            slot=torch.tensor(list(range(rows)) + [dec] * chunk),
            cache_index=torch.tensor([keys] * rows + list(range(chunk))),
            slot_list=slots,
            slots_tensor=torch.tensor(slots),
            pad_index=torch.tensor(
                [i * max_q for i in range(rows)] + [rows * max_q + j for j in range(chunk)]
            ),
            max_q=max_q,
            key_len=key_len,
            mask=mask,
            logit_index=torch.tensor(list(range(rows)) + ([n - 1] if prompt else [])),
            split=PackedSplit.from_flags([False] * rows + [True] * chunk, 96, int4_prompts=True),
        )
        assert batch.split.all_q4
        fused._fused = None
        out = fused.forward(batch, pool.k, pool.v)
        assert fused._fused is not None, "a small mixed step must take the C++ path"
        return out

    mixed = step(decode=True, prompt=True)
    assert torch.equal(mixed[:dec], step(decode=True, prompt=False))
    assert torch.equal(mixed[dec], step(decode=False, prompt=True)[0])
    # and the chunk predicts as the torch forward does on the same int4 weights
    ref = run(torch_path, prompt_batch(ids, True))[-1]
    assert ref.argmax() == mixed[dec].argmax() and kl(ref[None], mixed[dec][None]).item() < 0.01


def test_kernel_variant_follows_the_cpu_and_the_override(monkeypatch) -> None:
    """``MULTISTREAM_CPU_KERNELS`` picks a variant the CPU has; a wrong name is an error naming it."""
    fits = native.fitting_variants()
    monkeypatch.delenv("MULTISTREAM_CPU_KERNELS", raising=False)  # the other-variant rerun sets it
    assert native.variant() == fits[0]
    for name in native.VARIANT_FLAGS:
        monkeypatch.setenv("MULTISTREAM_CPU_KERNELS", name)
        assert native.variant() == (name if name in fits else None)
    monkeypatch.setenv("MULTISTREAM_CPU_KERNELS", "sse2")
    with pytest.raises(ValueError, match="MULTISTREAM_CPU_KERNELS"):
        native.variant()
    monkeypatch.setenv("MULTISTREAM_INT4_KERNEL", "torch")
    assert native.variant() is None


def test_the_other_kernel_variant_passes_these_tests_too() -> None:
    """On an AVX-512 machine, the AVX2 variant (what EPYC machines without AVX-512 get) is built
    and put through this module's tests in a child process; skipped where only one variant fits."""
    import os
    import subprocess
    import sys

    others = [v for v in native.fitting_variants() if v != native.variant()]
    if not others or os.environ.get("MULTISTREAM_CPU_KERNELS"):
        pytest.skip("only one kernel variant fits this CPU")
    env = dict(os.environ, MULTISTREAM_CPU_KERNELS=others[0])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            __file__,
            "-k",
            "not other_kernel_variant",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1]
