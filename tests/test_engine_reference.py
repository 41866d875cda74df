"""The engine against ``transformers`` on the real default weights (fp32).

- one stream, greedy: token-for-token equal to ``generate`` and prefill logits within 1e-3;
- C streams in ``cross`` mode: the logits of every row equal an HF forward over the
  flattened grid with the paper's 4D block-causal mask and per-row ``position_ids``.
"""

from __future__ import annotations

import pytest
import torch

from backend.engine import Engine, EngineConfig, SamplingParams, StreamSpec
from tests.engine_helpers import LogitRecorder, run

transformers = pytest.importorskip("transformers")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
]
NEW_TOKENS = 48


@pytest.fixture(scope="module")
def hf_model(default_model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.eval()
    return model


@pytest.fixture(scope="module")
def engine(default_model_dir):
    eng = Engine.from_model_dir(
        default_model_dir, EngineConfig(dtype="float32", max_sessions=4, max_context=1024)
    )
    yield eng
    eng.shutdown()


def chat_ids(engine: Engine, text: str) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_single_stream_greedy_matches_hf_generate(engine, hf_model, prompt):
    ids = chat_ids(engine, prompt)
    with torch.inference_mode():
        ref = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            attention_mask=torch.ones(1, len(ids)),
        )[0, len(ids) :].tolist()
    out = run(engine, ids, [StreamSpec("output", sampling=SamplingParams(max_tokens=NEW_TOKENS))])
    got = out.tokens("output")
    assert got == ref, f"engine {got}\n   hf {ref}"
    assert len(got) == NEW_TOKENS or got[-1] in engine.tokenizer.eos_token_ids


def test_prefill_logits_match_hf(engine, hf_model):
    for prompt in PROMPTS:
        ids = chat_ids(engine, prompt)
        last = engine.prefill_export(ids, timeout=60).logits[-1]
        with torch.inference_mode():
            ref = hf_model(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(last, ref, atol=1e-3, rtol=0), (last - ref).abs().max()


def test_cross_mode_rows_match_hf_block_causal_forward(engine, hf_model):
    """Three streams whose preambles differ, decoded together in ``cross`` mode."""
    tok = engine.tokenizer
    ids = chat_ids(engine, "Name three colours.")
    preambles = [tok.encode("Sure"), tok.encode("Let me think"), tok.encode("Colours are")]
    streams = [
        StreamSpec(
            f"s{i}",
            kind="output" if i == 0 else "reasoning",
            preamble_ids=p,
            sampling=SamplingParams(max_tokens=12, ignore_eos=True),
        )
        for i, p in enumerate(preambles)
    ]
    rec = LogitRecorder(engine)
    try:
        out = run(engine, ids, streams, attention="cross")
    finally:
        engine.logits_hook = None
    # Rebuild the grid: row P+j holds stream i's j-th input token (preamble, then samples).
    p = len(ids)
    inputs = {f"s{i}": preambles[i] + out.tokens(f"s{i}")[:-1] for i in range(3)}
    rows = max(len(v) for v in inputs.values())
    flat, pos, row_of = list(ids), list(range(p)), list(range(p))
    where: dict[tuple[str, int], int] = {}
    for r in range(rows):
        for i in range(3):
            seq = inputs[f"s{i}"]
            if r < len(seq):
                where[(f"s{i}", p + r)] = len(flat)
                flat.append(seq[r])
                pos.append(p + r)
                row_of.append(p + r)
    n = len(flat)
    row_t = torch.tensor(row_of)
    mask = (row_t[None, :] < row_t[:, None]) | torch.eye(n, dtype=torch.bool)
    with torch.inference_mode():
        ref = hf_model(
            torch.tensor([flat]), attention_mask=mask[None, None], position_ids=torch.tensor([pos])
        ).logits[0]
    checked = 0
    for (stream, row), logits in rec.logits.items():
        if (stream, row) in where:
            diff = (logits - ref[where[(stream, row)]]).abs().max().item()
            assert diff < 1e-3, f"{stream} row {row}: max |diff| {diff}"
            checked += 1
    assert checked >= 3 * 12 - 3, f"only {checked} rows compared"


def test_batching_does_not_change_greedy_tokens(engine):
    """A session decoded alone equals the same session decoded beside three others."""
    spec = lambda n: [StreamSpec("output", sampling=SamplingParams(max_tokens=n, ignore_eos=True))]  # noqa: E731
    target = chat_ids(engine, "Tell me about the moon.")
    alone = run(engine, target, spec(32)).tokens("output")
    others = [chat_ids(engine, p) for p in PROMPTS]
    from tests.engine_helpers import collector

    cols = []
    for ids in others:  # different prompt lengths, longer generations: they outlive the target
        c, cb = collector(1)
        engine.submit(ids, spec(40), on_event=cb)
        cols.append(c)
    together = run(engine, target, spec(32)).tokens("output")
    for c in cols:
        assert c.done.wait(120)
    assert together == alone


def test_injected_user_tokens_enter_the_next_rows_and_steer_the_answer(engine):
    tok = engine.tokenizer
    ids = chat_ids(engine, "Count from one to twenty, separated by commas.")
    plain = run(engine, ids, [StreamSpec("output", sampling=SamplingParams(max_tokens=24, ignore_eos=True))])
    pushed = tok.encode(" Stop counting. Answer only in French: bonjour bonjour bonjour")
    from tests.engine_helpers import collector

    c, cb = collector(1)
    state = {"row": None}

    def on_event(ev):
        # Inject from the engine thread right after the 4th answer token: the next step
        # (the row that token is fed into) must carry the first pushed token.
        if ev.stream == "output" and state["row"] is None and len(c.tokens("output")) == 3:
            state["row"] = ev.row
            engine.inject(ev.session_id, pushed)
        cb(ev)

    engine.submit(
        ids,
        [StreamSpec("output", sampling=SamplingParams(max_tokens=24, ignore_eos=True))],
        on_event=on_event,
    )
    assert c.done.wait(120)
    user_rows = [e.row for e in c.events if e.stream == "user"]
    assert [t for e in c.events if e.stream == "user" for t in e.token_ids] == pushed
    assert user_rows == list(range(state["row"], state["row"] + len(pushed)))
    steered = c.tokens("output")
    assert steered[:4] == plain.tokens("output")[:4]
    assert steered != plain.tokens("output")


def test_repetition_penalty_matches_hf(engine, hf_model):
    ids = chat_ids(engine, "List the days of the week, again and again.")
    with torch.inference_mode():
        ref = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            do_sample=False,
            repetition_penalty=1.3,
            attention_mask=torch.ones(1, len(ids)),
        )[0, len(ids) :].tolist()
    out = run(
        engine, ids, [StreamSpec("output", sampling=SamplingParams(max_tokens=32, repetition_penalty=1.3))]
    )
    assert out.tokens("output") == ref


def test_top_k_1_and_tiny_top_p_are_greedy(engine):
    ids = chat_ids(engine, PROMPTS[1])
    greedy = run(engine, ids, [StreamSpec("o", sampling=SamplingParams(max_tokens=16))]).tokens("o")
    for params in (
        SamplingParams(temperature=1.5, top_k=1, seed=7, max_tokens=16),
        SamplingParams(temperature=1.5, top_p=1e-6, seed=7, max_tokens=16),
    ):
        assert run(engine, ids, [StreamSpec("o", sampling=params)]).tokens("o") == greedy


def test_stop_string_cuts_the_text(engine):
    ids = chat_ids(engine, PROMPTS[1])
    full = run(engine, ids, [StreamSpec("o", sampling=SamplingParams(max_tokens=40))]).text("o")
    words = full.split()
    assert len(words) > 6, full
    stop = words[len(words) // 2]  # a word from the middle of the greedy answer
    first = full.index(stop)
    cut = run(engine, ids, [StreamSpec("o", sampling=SamplingParams(max_tokens=40, stop=[stop]))])
    assert cut.finish_reason("o") == "stop"
    assert cut.text("o") == full[:first]


def test_streams_share_the_prompt_kv(engine):
    """C streams cost the prompt once: the engine processes P + rows x C tokens, not C x P."""
    ids = chat_ids(engine, PROMPTS[2])
    before = engine.stats()
    streams = [StreamSpec(f"s{i}", sampling=SamplingParams(max_tokens=5, ignore_eos=True)) for i in range(4)]
    run(engine, ids, streams)
    after = engine.stats()
    # 4 streams x 5 sampled tokens: the first comes from the prompt's logits, 4 more rows are fed;
    # prompt tokens an earlier test left in the prefix cache are not processed again.
    reused = after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
    assert after["tokens_processed"] - before["tokens_processed"] == len(ids) - reused + 4 * 4
