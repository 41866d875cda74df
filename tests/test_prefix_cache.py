"""Prefix caching (``backend.engine.prefix_cache``): reuse is exact, bounded, keyed safely, counted.

A small random fp32 model (the default tokenizer's vocabulary) keeps each engine cheap; the
reference for every reuse is the same engine with the cache off, i.e. the prefix recomputed.
"""

from __future__ import annotations

import time

import pytest
import torch

from backend.engine import Engine, EngineConfig, SamplingParams, StreamSpec
from backend.engine.session import GridRules, Prefix
from backend.models import LlamaModel
from backend.models.config import ModelConfig
from backend.tokenizer import Tokenizer
from tests.engine_helpers import LogitRecorder, run
from tests.reliability_helpers import gauge_sum, scrape

CFG = ModelConfig(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    max_position_embeddings=1024,
    tie_word_embeddings=True,
    attention_bias=False,
    architecture="LlamaForCausalLM",
)
PASSAGE = list(range(1000, 1000 + 70))  # 4 full blocks of 16 and a bit


def engine(default_model_dir, cache_mb: float = 8, **kw) -> Engine:
    model = LlamaModel.random(CFG, dtype=torch.float32, seed=3)
    cfg = EngineConfig(dtype="float32", max_sessions=4, max_context=256, prefix_cache_mb=0, **kw)
    eng = Engine(model, Tokenizer.from_dir(default_model_dir), cfg)
    eng.prefix_cache.capacity_bytes = int(cache_mb * 2**20)  # below 1 MB too, for the bound test
    eng.prefix_cache.stats.capacity_bytes = eng.prefix_cache.capacity_bytes
    return eng


def answer(eng: Engine, prompt: list[int], tokens: int = 6) -> tuple[list[int], torch.Tensor]:
    rec = LogitRecorder(eng)
    spec = StreamSpec("output", sampling=SamplingParams(max_tokens=tokens, ignore_eos=True))
    got = run(eng, prompt, [spec])
    first = min(rec.logits, key=lambda k: k[1])
    return got.tokens("output"), rec.logits[first]


def test_a_repeated_prefix_is_reused_and_answers_as_if_recomputed(default_model_dir) -> None:
    cached, fresh = engine(default_model_dir), engine(default_model_dir, cache_mb=0)
    try:
        answer(cached, PASSAGE + [5, 6, 7])  # fills the cache
        assert cached.stats()["prefix_cache_hit_tokens"] == 0
        assert cached.stats()["prefix_cache_blocks"] == 4
        answer(cached, list(range(2000, 2080)))  # overwrites the slot: reuse must copy, not find
        question = PASSAGE + [8, 9, 10, 11]
        got_tokens, got_logits = answer(cached, question)
        ref_tokens, ref_logits = answer(fresh, question)
        stats = cached.stats()
        assert stats["prefix_cache_hit_tokens"] == 64 and stats["prefix_cache_hits"] == 1
        assert stats["prefix_cache_lookup_tokens"] == 64 + 64 + 64
        assert fresh.stats()["prefix_cache_hit_tokens"] == 0
        assert got_tokens == ref_tokens
        torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
    finally:
        cached.shutdown()
        fresh.shutdown()


def test_a_different_start_misses_and_reused_slots_never_leak_into_the_cache(default_model_dir) -> None:
    eng, fresh = engine(default_model_dir), engine(default_model_dir, cache_mb=0)
    try:
        answer(eng, PASSAGE)
        other = [7] + PASSAGE[1:]  # differs in the first token: every block's digest differs
        answer(eng, other)
        assert eng.stats()["prefix_cache_hit_tokens"] == 0
        # the slots of both sessions have been reused since; the cached copies must not change
        for i in range(3):
            answer(eng, list(range(3000 + 100 * i, 3040 + 100 * i)))
        got, got_logits = answer(eng, PASSAGE + [1, 2])
        ref, ref_logits = answer(fresh, PASSAGE + [1, 2])
        assert got == ref
        torch.testing.assert_close(got_logits, ref_logits, rtol=1e-5, atol=1e-5)
        assert eng.stats()["prefix_cache_hit_tokens"] == 64
    finally:
        eng.shutdown()
        fresh.shutdown()


def test_the_cache_stays_within_its_bytes_evicting_the_oldest(default_model_dir) -> None:
    eng = engine(default_model_dir)
    block_bytes = eng.prefix_cache._block_bytes
    eng.prefix_cache.capacity_bytes = 6 * block_bytes  # room for 6 blocks
    try:
        answer(eng, PASSAGE)  # 4 blocks
        answer(eng, list(range(5000, 5070)))  # 4 more: 2 of the first run go
        stats = eng.stats()
        assert stats["prefix_cache_blocks"] == 6 and stats["prefix_cache_bytes"] <= 6 * block_bytes
        assert stats["prefix_cache_evicted_blocks"] == 2
        answer(eng, PASSAGE + [3])  # the first run lost its last two blocks, not its first
        assert eng.stats()["prefix_cache_hit_tokens"] == 32, "the run's head must outlive its tail"
    finally:
        eng.shutdown()


def test_prefill_export_shares_the_cache_with_sessions(default_model_dir) -> None:
    """The served path: the prefill model exports prefixes; a repeated one is not recomputed."""
    eng, fresh = engine(default_model_dir), engine(default_model_dir, cache_mb=0)
    try:
        eng.prefill_export(PASSAGE + [1])
        second = eng.prefill_export(PASSAGE + [2, 3], timeout=60)
        assert eng.stats()["prefix_cache_hit_tokens"] == 64
        ref = fresh.prefill_export(PASSAGE + [2, 3], timeout=60)
        torch.testing.assert_close(second.kv, ref.kv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(second.logits, ref.logits, rtol=1e-5, atol=1e-5)
    finally:
        eng.shutdown()
        fresh.shutdown()


def test_keys_cover_the_attention_rules_of_the_prefix(default_model_dir) -> None:
    """The same tokens under another mask (the paper's skip_silence) must not share KV."""
    eng = engine(default_model_dir)
    try:
        rows = [[731, 40 + r, 50 + r] for r in range(12)]  # 3 channels, 36 entries: 2 blocks
        grid = Prefix.grid(rows)
        plain = GridRules(num_channels=3, silence_id=731, skip_silence=False)
        skipping = GridRules(num_channels=3, silence_id=731, skip_silence=True)
        eng.prefill_export(grid, rules=plain, timeout=60)
        eng.prefill_export(grid, rules=skipping, timeout=60)
        assert eng.stats()["prefix_cache_hit_tokens"] == 0
        eng.prefill_export(grid, rules=skipping, timeout=60)
        assert eng.stats()["prefix_cache_hit_tokens"] == 32
    finally:
        eng.shutdown()


@pytest.mark.parametrize(
    ("threads", "text"),
    [
        # 49 tokens: a full hit computes the last token alone (a one-row matmul)
        (1, "Name a colour, then say in two or three short sentences why so many people like it."),
        (2, "Name a colour, then say in one sentence why people like it so much, and thank you."),
    ],
)
def test_a_served_prompt_is_bitwise_the_same_cold_cached_chunked_or_batched(
    default_model_dir, threads, text
) -> None:
    """The default model in bf16, as served: a prompt's KV and first logits must not depend
    on how its tokens were grouped into steps: cold in one chunk, after a partial prefix-cache
    hit (another prompt cached the system prompt's block), after a full hit, in chunks of one
    block, cut by a step budget, or computed beside another prompt. Otherwise a seeded answer
    changes with the cache's state (it did: torch's CPU attention and one-row matmuls sum in
    an order that depends on what shares the call; ``LlamaModel._attention`` / ``_dense``)."""
    from concurrent.futures import ThreadPoolExecutor

    from backend.serving.preprocessing import prompt_ids

    def make(**kw) -> Engine:
        cfg = dict(dtype="bfloat16", threads=threads, max_sessions=4, max_context=512, prefix_cache_mb=0)
        return Engine.from_model_dir(default_model_dir, EngineConfig(**(cfg | kw)))

    tok = Tokenizer.from_dir(default_model_dir)
    prompt = prompt_ids(tok, text)
    other = prompt_ids(tok, "The capital of France is")
    assert len(prompt) > 48 and len(prompt) % 16 and prompt[:16] == other[:16]

    def same(eng: Engine, label: str, *first: list[int]) -> None:
        try:
            for p in first:
                eng.prefill_export(p, timeout=60)
            got = eng.prefill_export(prompt, timeout=60)
        finally:
            eng.shutdown()
        assert torch.equal(got.kv, ref.kv), f"{label}: KV differs by {(got.kv - ref.kv).abs().max():.3g}"
        assert torch.equal(got.logits, ref.logits), label

    cold = make()
    try:
        ref = cold.prefill_export(prompt, timeout=60)
    finally:
        cold.shutdown()
    cached = make(prefix_cache_mb=64)
    try:
        cached.prefill_export(other, timeout=60)
        part = cached.prefill_export(prompt, timeout=60)
        hit = cached.stats()["prefix_cache_hit_tokens"]
        full = cached.prefill_export(prompt, timeout=60)
        assert hit >= 16 and cached.stats()["prefix_cache_hit_tokens"] - hit == len(prompt) // 16 * 16
    finally:
        cached.shutdown()
    for label, got in (("partial hit", part), ("full hit", full)):
        assert torch.equal(got.kv, ref.kv), f"{label}: KV differs by {(got.kv - ref.kv).abs().max():.3g}"
        assert torch.equal(got.logits, ref.logits), label
    same(make(prefill_chunk=16), "chunks of one block")
    same(make(max_step_tokens=40), "chunks cut by the step budget")
    batched = make()
    try:
        with ThreadPoolExecutor(2) as pool:  # queued together: one step computes both prompts
            got, _ = pool.map(lambda p: batched.prefill_export(p, timeout=60), [prompt, other])
    finally:
        batched.shutdown()
    assert torch.equal(got.kv, ref.kv) and torch.equal(got.logits, ref.logits), "beside another prompt"


def test_a_dense_row_is_the_same_alone_or_with_others() -> None:
    """``LlamaModel._dense``: torch's one-row CPU matmul sums in another order than its
    many-row one (one thread, 576 x 1536 bf16: 27 of 300 rows differed), which a prompt's last
    token computed alone after a prefix-cache hit would inherit."""
    torch.manual_seed(0)
    w = (torch.randn(576, 1536) * 0.05).to(torch.bfloat16)
    x = torch.randn(300, 1536).to(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        together = LlamaModel._dense(x, w)
        alone = [
            r for r in range(300) if not torch.equal(LlamaModel._dense(x[r : r + 1], w), together[r : r + 1])
        ]
    finally:
        torch.set_num_threads(threads)
    assert alone == []


@pytest.mark.server
def test_the_server_reuses_a_repeated_prefix_and_says_so_in_metrics(triton_server) -> None:
    """Through Triton: the cache of the instances that compute prompts (decode, ``prefill_at``
    auto on a CPU) is hit by a repeated system prompt, the hit shows in /metrics, and every
    answer is the one the first request got. The session server has two decode instances,
    each with its own cache: of three requests, two land on the same instance, so at least
    one repeat is a hit."""
    from client import MultiStreamClient

    system = "You are a careful assistant for a river town's council. " * 12  # ~130 tokens
    url = triton_server.metrics_url

    def hit_tokens() -> float:
        return gauge_sum(scrape(url), "multistream_prefix_cache_hit_tokens", model="decode")

    def settled() -> float:
        """The counter once the first request's own hits (its chat template's head) have been
        published: the stats poller and the metrics flusher lag by about a second each."""
        last, since = hit_tokens(), time.monotonic()
        while time.monotonic() - since < 2.5:
            time.sleep(0.25)
            now = hit_tokens()
            if now != last:
                last, since = now, time.monotonic()
        return last

    with MultiStreamClient(triton_server.grpc_url, protocol="grpc") as c:
        first = c.generate(system + "What should the council discuss first?", max_tokens=8).result()
        before = settled()
        again = [
            c.generate(system + "What should the council discuss first?", max_tokens=8).result()
            for _ in (1, 2)
        ]
    deadline = time.monotonic() + 15
    while hit_tokens() - before < 112 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hit_tokens() - before >= 112, "the repeated ~130-token prefix should come from the cache"
    assert [r.output_text for r in again] == [first.output_text] * 2
