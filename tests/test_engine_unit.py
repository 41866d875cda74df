"""Fast engine tests on a tiny random-weight Llama (real tokenizer, made-up weights).

The tiny model is a real ``transformers`` ``LlamaForCausalLM`` saved to a temp folder,
so the same checkpoint is the reference for the attention policies.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from backend.engine import (
    ContextLengthError,
    Engine,
    EngineBusyError,
    EngineConfig,
    SamplingParams,
    StreamSpec,
)
from backend.engine.attention import PROMPT_CHANNEL, USER_CHANNEL
from backend.models import LlamaModel
from backend.tokenizer import Tokenizer
from tests.engine_helpers import LogitRecorder, collector, run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, default_model_dir):
    torch.manual_seed(0)
    tok = Tokenizer.from_dir(default_model_dir)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture
def tiny_engine(tiny_dir, default_model_dir):
    model = LlamaModel.from_dir(tiny_dir, dtype=torch.float32)
    eng = Engine(
        model,
        Tokenizer.from_dir(default_model_dir),
        EngineConfig(max_sessions=4, max_context=256, max_queued=2, prefill_chunk=8),
    )
    yield eng
    eng.shutdown()


def _grid_reference(
    hf,
    prompt,
    inputs: dict[str, list[int]],
    chan_of: dict[str, int],
    mode: str,
    channel_embedding: torch.Tensor | None = None,
    embed_of: dict[str, int] | None = None,
):
    """Flattens the grid row-major and runs HF with a mask built from the policy's definition.

    With ``channel_embedding``, row ``embed_of[stream]`` of it (row 0 for the prompt) is added
    to each token's embedding before the first layer, as the paper's model does.
    """
    p = len(prompt)
    flat, rows, chans, where = list(prompt), list(range(p)), [PROMPT_CHANNEL] * p, {}
    for r in range(max(len(v) for v in inputs.values())):
        for name, seq in inputs.items():
            if r < len(seq):
                where[(name, p + r)] = len(flat)
                flat.append(seq[r])
                rows.append(p + r)
                chans.append(chan_of[name])
    n = len(flat)
    row = torch.tensor(rows)
    ch = torch.tensor(chans)
    earlier = row[None, :] < row[:, None]
    if mode == "cross":
        see = torch.ones(n, n, dtype=torch.bool)
    else:
        see = (ch[None, :] == PROMPT_CHANNEL) | (ch[None, :] == USER_CHANNEL) | (ch[None, :] == ch[:, None])
    mask = (earlier & see) | torch.eye(n, dtype=torch.bool)
    with torch.inference_mode():
        if channel_embedding is None:
            logits = hf(torch.tensor([flat]), attention_mask=mask[None, None], position_ids=row[None]).logits[
                0
            ]
            return logits, where
        emb_rows = [0] * p + [0] * (n - p)
        for (name, _r), i in where.items():
            emb_rows[i] = embed_of[name]
        embeds = (
            hf.get_input_embeddings()(torch.tensor([flat])) + channel_embedding[torch.tensor(emb_rows)][None]
        )
        logits = hf(inputs_embeds=embeds, attention_mask=mask[None, None], position_ids=row[None]).logits[0]
    return logits, where


@pytest.mark.parametrize("mode", ["cross", "isolated"])
def test_attention_policy_matches_dense_reference(tiny_engine, tiny_hf, mode):
    prompt = list(range(100, 120))
    pre = {"a": [5, 6], "b": [7], "c": [8, 9, 10]}
    streams = [
        StreamSpec(
            name,
            kind="output" if name == "a" else "reasoning",
            preamble_ids=p,
            sampling=SamplingParams(max_tokens=6, ignore_eos=True),
        )
        for name, p in pre.items()
    ]
    rec = LogitRecorder(tiny_engine)
    out = run(tiny_engine, prompt, streams, attention=mode)
    inputs = {k: pre[k] + out.tokens(k)[:-1] for k in pre}
    ref, where = _grid_reference(tiny_hf, prompt, inputs, {"a": 2, "b": 3, "c": 4}, mode)
    compared = 0
    for key, logits in rec.logits.items():
        if key in where:
            assert torch.allclose(logits, ref[where[key]], atol=1e-4), key
            compared += 1
    assert compared == 3 * 6


def test_isolated_streams_equal_single_stream_runs(tiny_engine):
    """In isolated mode a stream's tokens do not depend on its neighbours."""
    prompt = list(range(200, 230))
    specs = lambda: [  # noqa: E731
        StreamSpec(f"s{i}", preamble_ids=[11 + i], sampling=SamplingParams(max_tokens=10, ignore_eos=True))
        for i in range(3)
    ]
    together = run(tiny_engine, prompt, specs(), attention="isolated")
    for i, spec in enumerate(specs()):
        alone = run(tiny_engine, prompt, [spec])
        assert alone.tokens(f"s{i}") == together.tokens(f"s{i}")


def test_kv_slot_freed_after_finish_and_cancel(tiny_engine):
    prompt = list(range(300, 310))
    run(tiny_engine, prompt, [StreamSpec("output", sampling=SamplingParams(max_tokens=3, ignore_eos=True))])
    assert _wait_idle(tiny_engine)
    c, cb = collector(1)
    sid = tiny_engine.submit(
        prompt, [StreamSpec("output", sampling=SamplingParams(max_tokens=200, ignore_eos=True))], on_event=cb
    )
    time.sleep(0.05)
    assert tiny_engine.cancel(sid)
    assert c.done.wait(10)
    assert c.finish_reason("output") == "cancelled"
    assert _wait_idle(tiny_engine)
    assert not tiny_engine.has_session(sid)


def _wait_idle(engine, timeout=10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        st = engine.stats()
        if st["active_sessions"] == 0 and st["kv_slots_used"] == 0 and st["kv_used_tokens"] == 0:
            return True
        time.sleep(0.01)
    return False


def test_context_limit_is_a_clear_error(tiny_engine):
    with pytest.raises(ContextLengthError, match="context limit is 256"):
        tiny_engine.submit(list(range(300)), [StreamSpec("output")])
    with pytest.raises(ContextLengthError, match="max_tokens"):
        tiny_engine.submit(list(range(100)), [StreamSpec("output", sampling=SamplingParams(max_tokens=200))])


def test_busy_when_slots_and_queue_are_full(tiny_engine):
    spec = lambda: [StreamSpec("output", sampling=SamplingParams(max_tokens=150, ignore_eos=True))]  # noqa: E731
    ids = [tiny_engine.submit(list(range(10)), spec()) for _ in range(6)]  # 4 slots + 2 queued
    with pytest.raises(EngineBusyError, match="server busy"):
        tiny_engine.submit(list(range(10)), spec())
    for sid in ids:
        tiny_engine.cancel(sid)
    assert _wait_idle(tiny_engine)


def test_seeded_sampling_is_reproducible_and_per_stream(tiny_engine):
    prompt = list(range(400, 420))

    def go(seed_a, seed_b):
        streams = [
            StreamSpec(
                "a",
                sampling=SamplingParams(
                    temperature=1.0, top_k=50, seed=seed_a, max_tokens=12, ignore_eos=True
                ),
            ),
            StreamSpec(
                "b",
                kind="reasoning",
                sampling=SamplingParams(
                    temperature=0.8, top_p=0.9, seed=seed_b, max_tokens=12, ignore_eos=True
                ),
            ),
        ]
        out = run(tiny_engine, prompt, streams)
        return out.tokens("a"), out.tokens("b")

    a1, b1 = go(1, 2)
    a2, b2 = go(1, 2)
    a3, b3 = go(3, 2)
    assert (a1, b1) == (a2, b2)
    assert a3 != a1
    # Each stream has its own generator: re-seeding "a" leaves "b" (isolated) untouched.
    # One generator shared by the streams would shift b's draws with a's.
    assert b3 == b1


def test_stop_token_ids_and_max_tokens(tiny_engine):
    prompt = list(range(500, 510))
    first = run(
        tiny_engine, prompt, [StreamSpec("o", sampling=SamplingParams(max_tokens=8, ignore_eos=True))]
    )
    toks = first.tokens("o")
    assert len(toks) == 8 and first.finish_reason("o") == "length"
    stop_at = toks[3]
    second = run(
        tiny_engine,
        prompt,
        [StreamSpec("o", sampling=SamplingParams(max_tokens=8, stop_token_ids=[stop_at], ignore_eos=True))],
    )
    assert second.tokens("o") == toks[: toks.index(stop_at) + 1]
    assert second.finish_reason("o") == "stop"


def test_long_prompt_prefill_is_chunked_while_others_decode(tiny_engine):
    """A 200-token prompt (chunk 8 -> 25 steps) must not stall a running session's rows."""
    c, cb = collector(1)
    sid = tiny_engine.submit(
        list(range(10, 20)),
        [StreamSpec("o", sampling=SamplingParams(max_tokens=200, ignore_eos=True))],
        on_event=cb,
    )
    while not c.events:
        time.sleep(0.001)
    long_c, long_cb = collector(1)
    tiny_engine.submit(
        list(range(1000, 1200)),
        [StreamSpec("o", sampling=SamplingParams(max_tokens=2, ignore_eos=True))],
        on_event=long_cb,
    )
    assert long_c.done.wait(30)
    t_first_long = min(e.t for e in long_c.events if e.token_ids)
    t_submit_long = min(e.t for e in c.events)  # lower bound; the long session came later
    during = [e for e in list(c.events) if t_submit_long < e.t < t_first_long]
    tiny_engine.cancel(sid)
    assert c.done.wait(10)
    assert len(during) >= 20, f"only {len(during)} rows decoded while a 25-chunk prompt was prefilled"


@pytest.mark.parametrize(
    "arch",
    ["llama-untied-llama3-rope", "qwen2-bias-high-theta", "mistral"],
)
def test_checkpoint_variants_match_transformers(tmp_path, default_model_dir, arch):
    """Untied LM head, llama3 RoPE scaling, Qwen2 q/k/v bias and theta, Mistral: same logits as HF."""
    torch.manual_seed(1)
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch.startswith("llama"):
        cfg = transformers.LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
        hf = transformers.LlamaForCausalLM(cfg)
    elif arch.startswith("qwen2"):
        cfg = transformers.Qwen2Config(**common, rope_theta=1_000_000.0, tie_word_embeddings=False)
        hf = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(**common, sliding_window=None)
        hf = transformers.MistralForCausalLM(cfg)
    hf.eval().save_pretrained(tmp_path)
    model = LlamaModel.from_dir(tmp_path, dtype=torch.float32)
    if arch.startswith("qwen2"):
        assert model.layers[0].qkv_bias is not None and model.cfg.rope_theta == 1_000_000.0
    eng = Engine(model, Tokenizer.from_dir(default_model_dir), EngineConfig(max_sessions=1, max_context=256))
    try:
        ids = torch.randint(3, 512, (150,)).tolist()  # past original_max_position_embeddings
        last = eng.prefill_export(ids, timeout=60).logits[-1]
    finally:
        eng.shutdown()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(last, ref, atol=1e-4), (last - ref).abs().max()


def test_step_time_is_measured(tiny_engine):
    """Serving loops pace their cancel checks by it; 0 would mean "poll as fast as possible"."""
    run(
        tiny_engine,
        [1, 2, 3, 4],
        [StreamSpec("output", sampling=SamplingParams(max_tokens=4, ignore_eos=True))],
    )
    t = tiny_engine.step_time_s
    assert 0.0 < t < 5.0, t


def test_fp32_kv_pool_changes_no_number(tiny_dir, default_model_dir):
    """CPU engines keep keys in fp32 (attention runs in fp32 there; it saves a whole-cache
    conversion per layer). A bf16 value widens to fp32 exactly, so a bf16 model must
    produce bit-identical logits with either pool, and ``auto`` must pick fp32 on CPU."""
    tok = Tokenizer.from_dir(default_model_dir)
    streams = [
        StreamSpec(name, kind=kind, sampling=SamplingParams(max_tokens=6, ignore_eos=True))
        for name, kind in (("output", "output"), ("reasoning/0", "reasoning"))
    ]
    got = {}
    for kv_dtype in ("auto", "bfloat16"):
        eng = Engine(
            LlamaModel.from_dir(tiny_dir, dtype=torch.bfloat16),
            tok,
            EngineConfig(max_sessions=2, max_context=64, kv_dtype=kv_dtype),
        )
        try:
            rec = LogitRecorder(eng)
            run(
                eng,
                [5, 6, 7, 8, 9],
                [StreamSpec(s.name, s.kind, SamplingParams(**vars(s.sampling))) for s in streams],
            )
            got[kv_dtype] = (eng.stats()["kv_dtype"], rec.logits)
        finally:
            eng.shutdown()
    assert got["auto"][0] == "float32" and got["bfloat16"][0] == "bfloat16"
    fp32_logits, bf16_logits = got["auto"][1], got["bfloat16"][1]
    assert fp32_logits.keys() == bf16_logits.keys() and len(fp32_logits) == 12
    for key, value in fp32_logits.items():
        assert torch.equal(value, bf16_logits[key]), key


def test_from_model_dir_loads_on_the_engine_thread(tiny_dir, default_model_dir, tmp_path, monkeypatch):
    """One thread does all the torch work (libgomp stops spinning with two computing
    threads, ~1.7x slower steps on 2 cores); a load error still reaches the caller."""
    import shutil

    import backend.engine.engine as engine_module

    for src in [
        *tiny_dir.iterdir(),
        *default_model_dir.glob("tokenizer*"),
        *default_model_dir.glob("special*"),
    ]:
        shutil.copy(src, tmp_path / src.name)
    tiny_dir = tmp_path

    seen = []
    real = engine_module.LlamaModel.from_dir

    def spy(*a, **kw):
        seen.append(threading.current_thread())
        return real(*a, **kw)

    monkeypatch.setattr(engine_module.LlamaModel, "from_dir", spy)
    eng = Engine.from_model_dir(tiny_dir, EngineConfig(dtype="float32", max_sessions=1, max_context=64))
    try:
        assert seen == [eng._thread] and eng._thread is not threading.current_thread()
        c = run(
            eng, [1, 2, 3], [StreamSpec("output", sampling=SamplingParams(max_tokens=3, ignore_eos=True))]
        )
        assert len(c.tokens("output")) == 3
    finally:
        eng.shutdown()
    assert not eng._thread.is_alive()
    with pytest.raises(ValueError, match="quantization must be"):
        Engine.from_model_dir(tiny_dir, EngineConfig(dtype="float32", quantization="int8"))


def _run_capturing_prompt_kv(engine, prompt, streams, **kw):
    """Runs a session and returns it with the prompt's KV as its slot held it at the first event."""
    kv: list[torch.Tensor] = []
    c, cb = collector(len(streams))

    def on_event(ev):  # the engine thread: the session is active and owns its slot
        if not kv:
            slot = engine.scheduler.active[ev.session_id].slot
            kv.append(engine.pool.export_prefix(slot, len(prompt)).clone())
        cb(ev)

    engine.submit(prompt, streams, on_event=on_event, **kw)
    assert c.done.wait(60)
    return c, kv[0]


def test_prefix_kv_handoff_equals_a_local_prefill(tiny_engine):
    """prefill -> decode at engine level: an imported prefix puts the same KV in the slot and
    gives the same logits and tokens as prefilling locally; nothing of the prompt is recomputed."""
    from backend.engine import PrefixKV

    prompt = list(range(300, 323))
    streams = lambda: [StreamSpec("o", sampling=SamplingParams(max_tokens=6, ignore_eos=True))]  # noqa: E731
    rec = LogitRecorder(tiny_engine)
    local, local_kv = _run_capturing_prompt_kv(tiny_engine, prompt, streams())
    local_logits = dict(rec.logits)
    exported = tiny_engine.prefill_export(prompt, timeout=60)
    assert exported.kv.shape[3] == len(prompt) and exported.logits.shape[0] == 1
    torch.testing.assert_close(exported.kv, local_kv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported.logits[0], local_logits[("o", len(prompt) - 1)], rtol=1e-5, atol=1e-5)
    before = tiny_engine.stats()["tokens_processed"]
    rec.logits.clear()
    imported, imported_kv = _run_capturing_prompt_kv(
        tiny_engine, prompt, streams(), prefix_kv=PrefixKV(exported.kv.clone(), exported.logits.clone())
    )
    # 6 tokens: the first sampled from the imported logits, 5 rows fed. No prompt token.
    assert tiny_engine.stats()["tokens_processed"] - before == 5
    assert torch.equal(imported_kv, exported.kv)
    assert imported.tokens("o") == local.tokens("o")
    assert rec.logits.keys() == local_logits.keys()
    for key, value in local_logits.items():
        torch.testing.assert_close(rec.logits[key], value, rtol=1e-5, atol=1e-5)
    # The KV covers exactly the prompt: anything else is refused, naming both lengths.
    with pytest.raises(ValueError, match="covers 22 tokens but the prompt has 23"):
        tiny_engine.submit(prompt, streams(), prefix_kv=PrefixKV(exported.kv[:, :, :, :-1], exported.logits))
    # Several prompts exported together: tests/test_behaviour_engine.py (they share steps).


def test_channel_embedding_is_added_per_stream_row(tiny_dir, tiny_hf, default_model_dir, tmp_path):
    """A checkpoint's channel embedding (the paper's ``model.channel_embedding.weight``) is
    loaded and added to every token: row 0 for the prompt, 1 for the output stream, 2 + i
    for reasoning stream i; checked against a transformers forward adding the same rows."""
    import shutil

    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "with-channels"
    shutil.copytree(tiny_dir, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    table = torch.randn(6, tiny_hf.config.hidden_size) * 0.5
    weights["model.channel_embedding.weight"] = table
    save_file(weights, ckpt / "model.safetensors", metadata={"format": "pt"})
    model = LlamaModel.from_dir(ckpt, dtype=torch.float32)
    assert model.channel_embedding is not None
    eng = Engine(model, Tokenizer.from_dir(default_model_dir), EngineConfig(max_sessions=2, max_context=256))
    try:
        prompt = list(range(100, 116))
        pre = {"a": [5, 6], "b": [7], "c": [8, 9]}
        kinds = {"a": "output", "b": "reasoning", "c": "reasoning"}
        streams = [
            StreamSpec(
                n, kind=kinds[n], preamble_ids=p, sampling=SamplingParams(max_tokens=4, ignore_eos=True)
            )
            for n, p in pre.items()
        ]
        rec = LogitRecorder(eng)
        out = run(eng, prompt, streams, attention="cross")
        inputs = {k: pre[k] + out.tokens(k)[:-1] for k in pre}
        chans = {"a": 2, "b": 3, "c": 4}
        ref, where = _grid_reference(tiny_hf, prompt, inputs, chans, "cross", table, {"a": 1, "b": 2, "c": 3})
        plain, _ = _grid_reference(tiny_hf, prompt, inputs, chans, "cross")
        compared = 0
        for key, logits in rec.logits.items():
            if key in where:
                torch.testing.assert_close(logits, ref[where[key]], atol=1e-4, rtol=1e-4)
                assert not torch.allclose(logits, plain[where[key]], atol=1e-3)  # the embedding mattered
                compared += 1
        assert compared == 3 * 4
    finally:
        eng.shutdown()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_top_logprobs_are_log_softmax_topk_of_the_logits(tiny_engine, temperature):
    """Per emitted token, the engine's ``top_logprobs`` are torch's ``log_softmax`` + ``topk`` of
    the logits that token was sampled from, and the sampled token's own log probability is the
    one ``logprobs`` already returns (the first alternative under greedy decoding)."""
    sampling = SamplingParams(
        max_tokens=5, ignore_eos=True, logprobs=True, top_logprobs=3, temperature=temperature, seed=1
    )
    rec = LogitRecorder(tiny_engine)
    out = run(tiny_engine, list(range(40, 52)), [StreamSpec("output", sampling=sampling)])
    events = [e for e in out.events if e.stream == "output" and e.token_ids]
    rows = sorted(row for stream, row in rec.logits if stream == "output")
    assert len(events) == len(rows) == 5
    for ev, row in zip(events, rows, strict=True):
        lps = torch.log_softmax(rec.logits[("output", row)].float(), dim=-1)
        want = torch.topk(lps, 3)
        [(ids, values)], [lp] = ev.top_logprobs, ev.logprobs
        assert ids == want.indices.tolist()
        torch.testing.assert_close(torch.tensor(values), want.values)
        assert lp == pytest.approx(float(lps[ev.token_ids[0]]), abs=1e-6)
        if temperature == 0.0:
            assert ids[0] == ev.token_ids[0] and values[0] == pytest.approx(lp, abs=1e-6)
    plain = run(
        tiny_engine, list(range(40, 52)), [StreamSpec("output", sampling=SamplingParams(max_tokens=2))]
    )
    assert all(e.top_logprobs == [] for e in plain.events)  # only sessions that ask pay for it


@pytest.mark.parametrize("attention", ["isolated", "cross"])
@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "seeded"])
def test_k_answers_in_one_session_equal_one_answer_sessions(tiny_engine, attention, temperature):
    """num_return_sequences k = 3 as three output streams of ONE session: each answer's tokens
    are bitwise the one-answer session's (seed + i), and the session holds one KV slot."""
    from backend.engine.attention import FIRST_STREAM_CHANNEL
    from backend.engine.session import answer_specs, answer_stream

    prompt = list(range(600, 627))
    sampling = SamplingParams(temperature=temperature, top_k=50, seed=5, max_tokens=9, ignore_eos=True)
    slots: list[int] = []
    c, cb = collector(3)

    def on_event(ev):  # the engine thread; a final event comes after the session freed its slot
        if not ev.finished:
            slots.append(tiny_engine.stats()["kv_slots_used"])
        cb(ev)

    sid = tiny_engine.submit(prompt, answer_specs(sampling, 3), attention=attention, on_event=on_event)
    assert c.done.wait(60)
    assert set(slots) == {1}, slots  # one session, one slot, for the three answers
    assert _wait_idle(tiny_engine) and not tiny_engine.has_session(sid)
    for i in range(3):
        alone = run(tiny_engine, prompt, answer_specs(dataclasses.replace(sampling, seed=5 + i), 1))
        assert c.tokens(answer_stream(i)) == alone.tokens("output"), (i, attention)
        assert len(alone.tokens("output")) == 9
    if temperature > 0:  # seeded sampling: the answers differ
        assert c.tokens("output") != c.tokens("output/1")
    # The answers' channels: none sees another; further answers are seen by no other channel.
    from backend.engine.attention import visibility

    vis = visibility(attention, [None] * 4, ["output", "output", "output", "reasoning"])
    a, b, r = FIRST_STREAM_CHANNEL, FIRST_STREAM_CHANNEL + 1, FIRST_STREAM_CHANNEL + 3
    assert not vis[a, b] and not vis[b, a] and vis[a, a] and vis[b, b] and vis[b, PROMPT_CHANNEL]
    assert not vis[r, b] and not vis[USER_CHANNEL, b]
    assert bool(vis[b, r]) == bool(vis[r, a]) == (attention == "cross")


def test_k_answers_fit_the_context_together(tiny_engine):
    """The slot covers prompt + every answer's max_tokens: k answers that do not fit are refused
    at submission, naming the limit."""
    from backend.engine.session import answer_specs

    sampling = SamplingParams(max_tokens=80, ignore_eos=True)
    with pytest.raises(ContextLengthError, match="context limit is 256"):
        tiny_engine.submit(list(range(100)), answer_specs(sampling, 2))
