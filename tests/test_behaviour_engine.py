"""The project's own multi-stream machinery at engine level, against transformers.

What is checked here, on a tiny random-weight Llama saved by ``transformers`` (the same
checkpoint is the reference): the User channel's visibility and per-stream attention
overrides, ``cross`` injection of externally produced channels row by row, the channel
embedding (its key names and the row each stream gets), and silence (idle channels filled,
a sampled silence never emitted). The paper's own layout (``GridRules``, seed and header
grids, Qwen3) has its tests in ``tests/test_paper_*.py``.

The reference never calls the engine's policy code: each test writes down the grid it
expects (token, row, channel, embedding row, which channels the token may see) and
:func:`hf_grid_logits` turns that into one transformers forward with a 4D mask.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from backend.engine import Engine, EngineConfig, SamplingParams, StreamSpec
from backend.engine.attention import MAX_CHANNELS, PROMPT_CHANNEL, USER_CHANNEL
from backend.models import LlamaModel
from backend.models.config import CHANNEL_EMBEDDING_KEYS
from backend.tokenizer import Tokenizer
from tests.engine_helpers import LogitRecorder, collector, run

transformers = pytest.importorskip("transformers")

#: Channels of the project's layout as the README states them (the engine's constants are
#: imported only to name them): prompt 0, User 1, then the streams in request order.
FIRST_STREAM = 2
#: Channel-embedding rows as the paper's checkpoints use them: User (and the prompt) 0,
#: Output 1, thinking stream i at 2 + i.
EMBED_USER, EMBED_OUTPUT, EMBED_THINKING = 0, 1, 2
ATOL = 1e-4


@dataclass(frozen=True)
class Cell:
    """One token of a session's grid, as the reference sees it."""

    tok: int
    row: int
    chan: int
    embed: int = EMBED_USER
    #: Channels whose earlier rows this token attends to; None: every channel (``cross``).
    sees: frozenset[int] | None = None


def prompt_cells(prompt: list[int]) -> list[Cell]:
    return [Cell(t, r, PROMPT_CHANNEL, EMBED_USER, frozenset({PROMPT_CHANNEL})) for r, t in enumerate(prompt)]


def isolated(chan: int) -> frozenset[int]:
    """What an isolated stream sees: the prompt, the User channel and its own past."""
    return frozenset({PROMPT_CHANNEL, USER_CHANNEL, chan})


def hf_grid_logits(hf, cells: list[Cell], table: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of every cell from one transformers forward over the flattened grid.

    A token sees itself and the tokens of strictly earlier rows on the channels it may see
    (block-causal per channel set); every token's position is its row; with ``table`` the
    row ``cell.embed`` of it is added to the token's embedding before the first layer.
    """
    n = len(cells)
    see = torch.zeros((n, n), dtype=torch.bool)
    for q, cq in enumerate(cells):
        for k, ck in enumerate(cells):
            see[q, k] = k == q or (ck.row < cq.row and (cq.sees is None or ck.chan in cq.sees))
    tokens = torch.tensor([[c.tok for c in cells]])
    rows = torch.tensor([[c.row for c in cells]])
    with torch.inference_mode():
        embeds = hf.get_input_embeddings()(tokens)
        if table is not None:
            embeds = embeds + table[torch.tensor([c.embed for c in cells])][None]
        return hf(inputs_embeds=embeds, attention_mask=see[None, None], position_ids=rows).logits[0]


def compare(recorded: dict, where: dict, ref: torch.Tensor) -> int:
    """Asserts every recorded ``(stream, row)`` logits equal the reference's; returns how many."""
    for key, logits in recorded.items():
        assert key in where, f"the engine sampled {key}, which the expected grid does not have"
        torch.testing.assert_close(
            logits, ref[where[key]], atol=ATOL, rtol=ATOL, msg=lambda m, k=key: f"{k}: {m}"
        )
    return len(recorded)


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    path = tmp_path_factory.mktemp("tiny")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_hf(tiny_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def table(tiny_hf) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    return torch.randn(6, tiny_hf.config.hidden_size, generator=g) * 0.5


def with_channel_embedding(src: Path, dst: Path, key: str, table: torch.Tensor) -> Path:
    """A copy of checkpoint ``src`` that also carries ``table`` under ``key``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    weights[key] = table
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def tiny_channels_dir(tiny_dir, table, tmp_path_factory) -> Path:
    return with_channel_embedding(
        tiny_dir, tmp_path_factory.mktemp("ch") / "ckpt", "model.channel_embedding.weight", table
    )


def engine_for(path: Path, tokenizer: Tokenizer, **config) -> Engine:
    config = {"max_sessions": 4, "max_context": 256, "prefill_chunk": 8, **config}
    return Engine(LlamaModel.from_dir(path, dtype=torch.float32), tokenizer, EngineConfig(**config))


@pytest.fixture(scope="module")
def tiny_engine(tiny_dir, tokenizer):
    eng = engine_for(tiny_dir, tokenizer)
    yield eng
    eng.shutdown()


def greedy(name: str, kind: str = "output", n: int = 6, **kw) -> StreamSpec:
    return StreamSpec(name, kind=kind, sampling=SamplingParams(max_tokens=n, ignore_eos=True), **kw)


def stream_cells(
    prompt: list[int], inputs: list[int], chan: int, embed: int, sees: frozenset[int] | None
) -> list[Cell]:
    """A stream's input tokens (preamble, then its samples but the last), fed into rows P, P+1, ..."""
    p = len(prompt)
    return [Cell(t, p + j, chan, embed, sees) for j, t in enumerate(inputs)]


def flatten(prompt: list[int], streams: dict[str, list[Cell]], extra: list[Cell]) -> tuple[list[Cell], dict]:
    """Prompt, then every stream's cells and the extra (user, injected) cells; and the index of
    each stream's ``(name, row)`` logits, the prompt's last token standing for row P - 1."""
    cells = prompt_cells(prompt)
    where = {}
    for name, mine in streams.items():
        where[(name, len(prompt) - 1)] = len(prompt) - 1
        for c in mine:
            where[(name, c.row)] = len(cells)
            cells.append(c)
    return cells + extra, where


# --------------------------------------------------------------------------------- visibility
@pytest.mark.parametrize(
    ("mode", "overrides"),
    [("isolated", {}), ("cross", {}), ("isolated", {"r0": "cross"}), ("cross", {"r1": "isolated"})],
)
def test_user_channel_and_per_stream_overrides_match_the_dense_reference(
    tiny_engine, tiny_hf, mode, overrides
):
    """Pushed User tokens are visible to the answer and to reasoning streams in both modes;
    a stream's own ``attention`` overrides the session's policy for that stream only."""
    prompt = list(range(100, 116))
    user = [41, 42, 43, 44]
    pre = {"out": [5, 6], "r0": [7], "r1": [8, 9, 10]}
    kinds = {"out": "output", "r0": "reasoning", "r1": "reasoning"}
    specs = [greedy(n, kinds[n], preamble_ids=pre[n], attention=overrides.get(n)) for n in pre]
    rec = LogitRecorder(tiny_engine)
    out = run(tiny_engine, prompt, specs, attention=mode, user_ids=user)
    p = len(prompt)
    echoed = [(e.row, e.token_ids) for e in out.events if e.stream == "user"]
    assert echoed == [(p + i, [t]) for i, t in enumerate(user)], (
        "one pushed token per row from the first row on"
    )

    chans = {n: FIRST_STREAM + i for i, n in enumerate(pre)}
    policy = {n: overrides.get(n, mode) for n in pre}

    def grid(user_visible: bool) -> tuple[list[Cell], dict]:
        streams = {}
        for n in pre:
            sees = None if policy[n] == "cross" else isolated(chans[n])
            if not user_visible and sees is None:
                sees = frozenset(set(range(MAX_CHANNELS)) - {USER_CHANNEL})
            elif not user_visible:
                sees = sees - {USER_CHANNEL}
            inputs = pre[n] + out.tokens(n)[:-1]
            streams[n] = stream_cells(prompt, inputs, chans[n], EMBED_USER, sees)
        # The User channel itself: in cross mode it reads every channel, else prompt and User.
        user_sees = None if mode == "cross" else frozenset({PROMPT_CHANNEL, USER_CHANNEL})
        users = [Cell(t, p + i, USER_CHANNEL, EMBED_USER, user_sees) for i, t in enumerate(user)]
        return flatten(prompt, streams, users)

    cells, where = grid(user_visible=True)
    assert compare(rec.logits, where, hf_grid_logits(tiny_hf, cells)) == 3 * 6
    # The User channel mattered: without it every stream's later rows would differ.
    blind, _ = grid(user_visible=False)
    blind_ref = hf_grid_logits(tiny_hf, blind)
    for n in pre:
        later = [(n, r) for (s, r) in rec.logits if s == n and r > p]
        assert later and all(
            not torch.allclose(rec.logits[k], blind_ref[where[k]], atol=1e-3) for k in later
        ), n


# --------------------------------------------------------------------------------- cross injection
def test_cross_mode_injects_external_channels_row_by_row(tiny_channels_dir, tiny_hf, tokenizer, table):
    """``cross`` serving: reasoning tokens made elsewhere enter the answer's session as their own
    channels (embedding rows 2 + i), one per row from the row after the injection; the answer's
    logits equal the dense reference, equal an ``isolated`` run up to that row, and differ after."""
    eng = engine_for(tiny_channels_dir, tokenizer)
    try:
        prompt = list(range(300, 318))
        user = [61]  # one User token in the first row: User and answer are then alike in both modes
        injected = {"reasoning/0": [71, 72, 73], "reasoning/1": [81, 82]}
        rec = LogitRecorder(eng)
        c, cb = collector(1)
        state: dict = {}

        def on_event(ev):
            # On the engine thread, after the answer's 3rd token: the next row is ev.row.
            if ev.stream == "output" and "row" not in state and len(c.tokens("output")) == 2:
                state["row"] = ev.row
                for name, ids in injected.items():
                    eng.inject(ev.session_id, ids, name)
            cb(ev)

        specs = [greedy("output", n=10)] + [StreamSpec(n, kind="reasoning", external=True) for n in injected]
        before = eng.stats()["tokens_processed"]
        eng.submit(prompt, specs, attention="cross", on_event=on_event, user_ids=user)
        assert c.done.wait(60)
        cross_logits = dict(rec.logits)
        p, r = len(prompt), state["row"]
        # 10 tokens: the first from the prompt, 9 rows fed; plus the User token and the injections.
        assert eng.stats()["tokens_processed"] - before == p + 9 + 1 + 5

        answer = stream_cells(prompt, c.tokens("output")[:-1], FIRST_STREAM, EMBED_OUTPUT, None)
        extra = [Cell(user[0], p, USER_CHANNEL, EMBED_USER, None)]
        for i, ids in enumerate(injected.values()):
            extra += [
                Cell(t, r + j, FIRST_STREAM + 1 + i, EMBED_THINKING + i, None) for j, t in enumerate(ids)
            ]
        cells, where = flatten(prompt, {"output": answer}, extra)
        assert compare(cross_logits, where, hf_grid_logits(tiny_hf, cells, table)) == 10

        rec.logits.clear()
        alone = run(eng, prompt, [greedy("output", n=10)], attention="isolated", user_ids=user)
        assert alone.tokens("output")[:3] == c.tokens("output")[:3]
        for (name, row), logits in cross_logits.items():
            same = torch.allclose(logits, rec.logits[(name, row)], atol=1e-5)
            # A row's tokens do not see each other: injected row r first shows in row r + 1.
            assert same == (row <= r), f"row {row} (first injected row {r}): same as isolated = {same}"
    finally:
        eng.shutdown()


# --------------------------------------------------------------------------------- channel embedding
@pytest.mark.parametrize("key", CHANNEL_EMBEDDING_KEYS)
def test_channel_embedding_is_read_from_every_known_key(tiny_dir, tiny_hf, tokenizer, table, tmp_path, key):
    """Each name a stream-trained checkpoint may use loads the same table, and the prompt's
    tokens get its row 0 (User), exactly as a transformers forward that adds it."""
    ckpt = with_channel_embedding(tiny_dir, tmp_path / "ckpt", key, table)
    model = LlamaModel.from_dir(ckpt, dtype=torch.float32)
    assert model.channel_embedding is not None and torch.equal(model.channel_embedding, table)
    assert LlamaModel.from_dir(tiny_dir, dtype=torch.float32).channel_embedding is None
    if key != CHANNEL_EMBEDDING_KEYS[0]:
        return  # the forward does not depend on the key: checked once
    prompt = list(range(200, 212))
    eng = Engine(model, tokenizer, EngineConfig(max_sessions=1, max_context=64))
    try:
        got = eng.prefill_export(prompt, timeout=60).logits[-1]
    finally:
        eng.shutdown()
    ref = hf_grid_logits(tiny_hf, prompt_cells(prompt), table)[-1]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(got, hf_grid_logits(tiny_hf, prompt_cells(prompt))[-1], atol=1e-3)


# --------------------------------------------------------------------------------- silence
def test_idle_channels_are_filled_with_silence_in_cross_mode(tiny_dir, tiny_hf, tokenizer):
    """With ``silence_token_id`` a ``cross`` session writes silence into every idle channel
    (the User channel once its tokens ran out, an external channel until its tokens come), as
    the paper's grid does; ``isolated`` leaves idle channels out of the row."""
    silence = tokenizer.encode(" -")[0]
    eng = engine_for(tiny_dir, tokenizer, silence_token_id=silence)
    try:
        prompt = list(range(400, 414))
        user = [51, 52]
        rec = LogitRecorder(eng)
        c, cb = collector(1)
        state: dict = {}

        def on_event(ev):
            if ev.stream == "output" and "row" not in state and len(c.tokens("output")) == 3:
                state["row"] = ev.row
                eng.inject(ev.session_id, [91, 92], "reasoning/0")
            cb(ev)

        before = eng.stats()["tokens_processed"]
        eng.submit(
            prompt,
            [greedy("output", n=8), StreamSpec("reasoning/0", kind="reasoning", external=True)],
            attention="cross",
            on_event=on_event,
            user_ids=user,
        )
        assert c.done.wait(60)
        p, r = len(prompt), state["row"]
        rows = 7  # 8 tokens: the first from the prompt, 7 rows fed
        assert eng.stats()["tokens_processed"] - before == p + 3 * rows, (
            "every row: answer, User, reasoning/0"
        )
        answer = stream_cells(prompt, c.tokens("output")[:-1], FIRST_STREAM, EMBED_OUTPUT, None)
        extra = []
        for j in range(rows):
            row = p + j
            extra.append(Cell(user[j] if j < len(user) else silence, row, USER_CHANNEL, EMBED_USER, None))
            pushed = {r: 91, r + 1: 92}
            extra.append(Cell(pushed.get(row, silence), row, FIRST_STREAM + 1, EMBED_THINKING, None))
        cells, where = flatten(prompt, {"output": answer}, extra)
        assert compare(rec.logits, where, hf_grid_logits(tiny_hf, cells)) == 8

        before = eng.stats()["tokens_processed"]
        run(eng, prompt, [greedy("output", n=8)], attention="isolated", user_ids=user)
        assert eng.stats()["tokens_processed"] - before == p + rows + len(user), "isolated: no silence fill"
    finally:
        eng.shutdown()


def test_a_sampled_silence_moves_the_grid_on_but_is_never_emitted(tiny_dir, tokenizer):
    """A stream that samples the silence token feeds it into its next row like any token, but
    the client never sees it: not in the ids, not in the text; it still counts to max_tokens."""
    prompt = list(range(500, 520))
    spec = lambda: [  # noqa: E731
        StreamSpec("output", sampling=SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))
    ]
    plain_engine = engine_for(tiny_dir, tokenizer)
    try:
        rec = LogitRecorder(plain_engine)
        plain = run(plain_engine, prompt, spec())
        plain_logits = dict(rec.logits)
    finally:
        plain_engine.shutdown()
    ids = plain.tokens("output")
    assert len(ids) == 12
    silence = ids[4]
    eng = engine_for(tiny_dir, tokenizer, silence_token_id=silence)
    try:
        rec = LogitRecorder(eng)
        out = run(eng, prompt, spec())  # isolated: nothing is filled, so the grid is the same
        assert rec.logits.keys() == plain_logits.keys(), "the silent rows must still be fed"
        for key, value in plain_logits.items():
            torch.testing.assert_close(rec.logits[key], value, atol=1e-6, rtol=1e-6)
    finally:
        eng.shutdown()
    visible = [t for t in ids if t != silence]
    assert out.tokens("output") == visible
    assert all(silence not in e.token_ids for e in out.events)
    assert out.text("output") == tokenizer.decode(visible)
    assert out.finish_reason("output") == "length"


# --------------------------------------------------------------------------------- hand-off batching
def test_prefills_submitted_together_share_steps(tiny_engine):
    """prefill's ``execute`` exports several prompts at once: they are prefilled in the same
    steps (chunk 8: 3 + 2 + 4 chunks take 4 steps together, 9 one after the other)."""
    prompts = [list(range(500, 517)), list(range(600, 611)), list(range(700, 730))]
    gate, entered = threading.Event(), threading.Event()

    def hold(ev):  # blocks the engine thread inside its first step's delivery
        entered.set()
        gate.wait(30)

    tiny_engine.submit([1, 2, 3], [greedy("hold", n=2)], on_event=hold)
    assert entered.wait(30)
    results: list = [None] * 3
    threads = [
        threading.Thread(
            target=lambda i=i: results.__setitem__(i, tiny_engine.prefill_export(prompts[i], 60))
        )
        for i in range(3)
    ]
    for t in threads:
        t.start()
    pause = threading.Event()
    for _ in range(3000):  # until the three exports wait in the engine's command queue
        with tiny_engine._lock:
            if len(tiny_engine._commands) == 3:
                break
        pause.wait(0.01)
    steps = tiny_engine.stats()["steps"]
    gate.set()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    assert tiny_engine.stats()["steps"] - steps <= 5, "the three prefills did not share steps"
    for prompt, got in zip(prompts, results, strict=True):
        alone = tiny_engine.prefill_export(prompt, timeout=60)
        torch.testing.assert_close(got.kv, alone.kv, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.logits, alone.logits, rtol=1e-5, atol=1e-5)
