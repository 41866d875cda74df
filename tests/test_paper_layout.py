"""The paper's stream layout in the engine: Qwen3, the checkpoint format, and the grid rules,
each checked against code that is not the engine's (transformers, and the independent
reference of ``tests/paper_reference.py``), token for token."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import transformers

from backend.engine import Engine, EngineConfig, GridRules, Prefix, SamplingParams, StreamEvent, StreamSpec
from backend.engine.engine import distribution_stats
from backend.engine.layout import (
    CHANNEL_NAMES,
    LayoutError,
    StreamLayout,
    find_silence,
    header_rows,
    parse_grid,
    resolve_layout,
    seed_row,
    user_tokens,
)
from backend.models import CheckpointError, LlamaModel
from backend.tokenizer import Tokenizer
from tests.engine_helpers import run
from tests.paper_reference import (
    PaperOptions,
    generate,
    grid_logits,
    save_stream_checkpoint,
    silence_biased_checkpoint,
)

SILENCE = 731  # SmolLM2's " -"
VOCAB = 49152


def tiny_config(arch: str, **kw):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    common.update(kw)
    if arch == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))


@pytest.fixture(scope="module")
def tok(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


class Grid:
    """A tiny stream checkpoint (HF model + channel embedding), loaded into an fp32 engine."""

    def __init__(self, arch: str, c: int, root: Path, tokenizer_dir: Path, quiet: bool = False):
        torch.manual_seed({"llama": 3, "qwen3": 5}[arch] + c)
        self.hf = tiny_config(arch).eval()
        # Thinking channels talk (their silence boost is mostly cancelled) unless ``quiet``:
        # then every channel is silent unless the penalty makes it speak.
        offs = (
            [0.0] * c
            if quiet
            else [0.0, 0.0] + [-0.95, -0.85, -0.9, -0.92][: max(0, c - 2)] + [-0.9] * max(0, c - 6)
        )
        self.chan = silence_biased_checkpoint(self.hf, c, SILENCE, 1.0, offs[:c])
        self.dir = save_stream_checkpoint(
            self.hf, self.chan, root / f"{arch}{c}{'q' if quiet else ''}", tokenizer_dir
        )
        self.c = c
        model = LlamaModel.from_dir(self.dir, dtype=torch.float32)
        self.engine = Engine(
            model, Tokenizer.from_dir(self.dir), EngineConfig(max_sessions=4, max_context=1024)
        )
        self.layout = StreamLayout(c, SILENCE)

    def run(self, start_rows, user, opts: PaperOptions, pushes=None, stats=False, wait=True):
        """Runs one session; returns ``(cells, finish, events)``: the visible grid cells
        ``{(row, channel): token}``, each channel stream's finish reason, all events."""
        events: list[StreamEvent] = []
        done = threading.Event()
        live = [self.c - 1]
        lock = threading.Lock()
        engine = self.engine
        sid_box: list[str] = []

        def on_event(ev: StreamEvent) -> None:
            with lock:
                events.append(ev)
                if ev.kind == "user":
                    return
                if pushes and ev.token_ids is not None:
                    for row in sorted(pushes):
                        if ev.row == row and not ev.finished and sid_box:
                            engine.inject(sid_box[0], pushes.pop(row), "user")
                if ev.finished:
                    live[0] -= 1
                    if live[0] == 0:
                        done.set()

        def sampling(ch: int) -> SamplingParams:
            return SamplingParams(
                temperature=opts.temperature,
                top_k=opts.top_k,
                top_p=opts.top_p,
                seed=opts.seeds.get(ch),
                max_tokens=opts.max_rows,
                ignore_eos=True,
            )

        rules = GridRules(
            silence_id=SILENCE,
            num_channels=self.c,
            silence_penalty=opts.silence_penalty,
            think_silence_penalty=opts.think_silence_penalty,
            penalty_during_user_talk=opts.during_talk,
            stop_silent_rows=opts.stop_silent_rows,
            max_rows=opts.max_rows,
            skip_silence=opts.skip_silence,
            ablate=frozenset(opts.ablate),
        )
        with lock:
            sid = engine.submit(
                Prefix.grid(start_rows),
                self.layout.stream_specs(sampling),
                on_event=on_event,
                rules=rules,
                user_ids=user,
                channel_stats=stats,
            )
            sid_box.append(sid)
        if not wait:
            return done, events
        assert done.wait(120), "the grid session did not finish"
        return self.collect(events)

    def collect(self, events):
        chan_of = {self.layout.stream_name(c): c for c in range(1, self.c)}
        cells: dict[tuple[int, int], int] = {}
        finish = {}
        for ev in events:
            c = 0 if ev.kind == "user" else chan_of[ev.stream]
            for t in ev.token_ids:
                assert (ev.row, c) not in cells, f"two tokens at row {ev.row} channel {c}"
                cells[(ev.row, c)] = t
            if ev.finished and ev.kind != "user":
                assert ev.stream not in finish, f"{ev.stream} finished twice"
                finish[ev.stream] = ev.finish_reason
        assert len(finish) == self.c - 1, f"every channel ends exactly once: {finish}"
        return cells, finish, events

    def reference(self, start_rows, user, opts: PaperOptions):
        rows = generate(self.hf, self.chan, start_rows, user, opts)
        n = len(start_rows)
        cells = {(n + i, c): t for i, row in enumerate(rows) for c, t in enumerate(row) if t != SILENCE}
        return cells, rows


@pytest.fixture(scope="module")
def grids(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("paper")
    made: dict[str, Grid] = {}

    def get(arch: str, c: int = 4, quiet: bool = False) -> Grid:
        key = f"{arch}{c}{quiet}"
        if key not in made:
            made[key] = Grid(arch, c, root, default_model_dir, quiet)
        return made[key]

    yield get
    for g in made.values():
        g.engine.shutdown()


def expect_same(grid: Grid, start, user, opts, **kw):
    got, finish, events = grid.run(start, user, opts, **kw)
    ref, rows = grid.reference(start, user, opts)
    assert got == ref, _diff(got, ref)
    assert any(c > 0 for (_, c) in got), "no channel said anything: the case tests nothing"
    reason = "length" if len(rows) == opts.max_rows else "stop"
    assert set(finish.values()) == {reason}, finish
    return got, rows, events


def _diff(got, ref):
    keys = sorted(set(got) | set(ref))
    bad = [(k, got.get(k), ref.get(k)) for k in keys if got.get(k) != ref.get(k)]
    return f"{len(bad)} cells differ, first: {bad[:6]}"


# ---------------------------------------------------------------------------- Qwen3, loading
@pytest.mark.parametrize("tie", [False, True])
def test_qwen3_logits_and_greedy_tokens_match_transformers(tmp_path, default_model_dir, tie):
    torch.manual_seed(11)
    hf = tiny_config("qwen3", tie_word_embeddings=tie, vocab_size=512).eval()
    hf.save_pretrained(tmp_path)
    model = LlamaModel.from_dir(tmp_path, dtype=torch.float32)
    assert model.cfg.qk_norm and model.layers[0].q_norm is not None
    assert (model.lm_head is model.embed) == tie
    eng = Engine(model, Tokenizer.from_dir(default_model_dir), EngineConfig(max_sessions=1, max_context=256))
    ids = torch.randint(3, 512, (40,)).tolist()
    try:
        last = eng.prefill_export(ids, timeout=60).logits[-1]
        got = run(
            eng, ids, [StreamSpec("o", sampling=SamplingParams(max_tokens=12, ignore_eos=True))]
        ).tokens("o")
    finally:
        eng.shutdown()
    with torch.inference_mode():
        ref_logits = hf(torch.tensor([ids])).logits[0, -1]
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    assert torch.allclose(last, ref_logits, atol=1e-4), (last - ref_logits).abs().max()
    assert got == ref[0, len(ids) :].tolist()


def test_paper_checkpoint_is_recognised_and_unused_weights_are_ignored(tmp_path, default_model_dir, tok):
    torch.manual_seed(2)
    hf = tiny_config("qwen3").eval()
    chan = torch.randn(10, 64)
    extra = {f"model.layers.{i}.self_attn.gate_in_norm.weight": torch.ones(64) for i in range(2)}
    d = save_stream_checkpoint(
        hf,
        chan,
        tmp_path / "stream",
        default_model_dir,
        architectures=["StreamQwen3ForCausalLM"],
        extra=extra,
    )
    model = LlamaModel.from_dir(d, dtype=torch.float32)
    assert model.cfg.num_channels == 10 and model.cfg.qk_norm
    assert torch.equal(model.channel_embedding, chan)
    layout = resolve_layout(d, tok, {})
    assert layout == StreamLayout(10, SILENCE)
    assert layout.names == list(CHANNEL_NAMES)
    assert layout.stream_name(1) == "output" and layout.stream_name(9) == "reasoning/Synthesis"
    # An ordinary checkpoint stays on the project's layout unless forced.
    assert resolve_layout(default_model_dir, tok, {}) is None
    assert resolve_layout(
        default_model_dir, tok, {"stream_layout": "paper", "num_channels": "4"}
    ) == StreamLayout(4, SILENCE)
    assert resolve_layout(d, tok, {"stream_layout": "project"}) is None
    with pytest.raises(LayoutError, match="stream_layout must be one of"):
        resolve_layout(d, tok, {"stream_layout": "grid"})


@pytest.mark.parametrize(
    "patch, words",
    [
        ({"role_gating_enabled": True}, "role_gating_enabled"),
        ({"num_experts": 8, "model_type": "qwen3_moe"}, "mixture-of-experts"),
        ({"layer_types": ["linear_attention", "full_attention"], "model_type": "qwen3_5_text"}, "DeltaNet"),
    ],
)
def test_configs_the_engine_cannot_run_are_refused_by_name(tmp_path, patch, words):
    torch.manual_seed(0)
    tiny_config("qwen3", vocab_size=256).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(patch)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=words):
        LlamaModel.from_dir(tmp_path, dtype=torch.float32)


# ---------------------------------------------------------------------------- layout pieces
def test_silence_user_tokens_seed_and_header(tok):
    assert find_silence(tok) == SILENCE == tok.encode(" -")[0]
    assert find_silence(tok, 5) == 5
    with pytest.raises(LayoutError, match="silence_token_id"):
        find_silence(tok, VOCAB + 1)
    # The paper's tokenization: each whitespace chunk with a leading space.
    assert user_tokens(tok, "Hello,  world\nagain") == tok.encode(" Hello,") + tok.encode(
        " world"
    ) + tok.encode(" again")
    row = seed_row(tok, SILENCE, 10)
    assert (
        row[:2] == [SILENCE, SILENCE]
        and row[2] == tok.encode(" thinking")[0]
        and row[9] == tok.encode(" integrating")[0]
    )
    assert seed_row(tok, SILENCE, 4, ablate=[3])[3] == SILENCE
    header = header_rows(tok, SILENCE, 10)
    assert len(header) == 11 and all(len(r) == 10 for r in header)
    assert all(r[0] == SILENCE for r in header), "User is silent through the header"
    assert [r[1] for r in header][6:10] == [tok.encode(w)[0] for w in (" OK", " I", "'m", " ready")]
    assert parse_grid('[[ "-", "-", " hi", 42 ]]', tok, SILENCE, 4) == [
        [SILENCE, SILENCE, tok.encode(" hi")[0], 42]
    ]
    for bad, words in [
        ("[[1, 2]]", "4 cells"),
        ("{}", "non-empty"),
        ("[[1, 2, 3, true]]", "token id or a word"),
    ]:
        with pytest.raises(LayoutError, match=words):
            parse_grid(bad, tok, SILENCE, 4)


def test_a_tokenizer_that_splits_the_silence_marker_is_refused():
    import tokenizers

    vocab = {ch: i for i, ch in enumerate(["Ġ", "-", "t", "e", "s"])}
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(LayoutError, match="2 tokens"):
        find_silence(Tokenizer(bpe))


# ---------------------------------------------------------------------------- engine == reference
TEXT = "what is three plus four minus two"


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_greedy_grid_from_the_seed_row_equals_the_reference(grids, tok, arch):
    g = grids(arch)
    opts = PaperOptions(num_channels=4, silence=SILENCE, max_rows=22)
    cells, rows, events = expect_same(g, [seed_row(tok, SILENCE, 4)], user_tokens(tok, TEXT), opts)
    user = user_tokens(tok, TEXT)
    assert [cells[(1 + i, 0)] for i in range(len(user))] == user, (
        "user tokens fill channel 0 one per row from row 1"
    )
    # Output is silent while the user talks and speaks once the penalty ramps in.
    spoke = sorted(r for (r, c) in cells if c == 1)
    assert spoke and spoke[0] > len(user), spoke


def test_seeded_sampling_equals_the_reference_and_replays(grids, tok):
    g = grids("qwen3")
    opts = PaperOptions(
        num_channels=4, silence=SILENCE, max_rows=20, temperature=0.8, seeds={1: 7, 2: 8, 3: 9}
    )
    first, _, _ = expect_same(g, [seed_row(tok, SILENCE, 4)], user_tokens(tok, TEXT), opts)
    again, _, _ = g.run([seed_row(tok, SILENCE, 4)], user_tokens(tok, TEXT), opts)
    assert again == first
    other = PaperOptions(
        num_channels=4, silence=SILENCE, max_rows=20, temperature=0.8, seeds={1: 7, 2: 8, 3: 10}
    )
    changed, _, _ = g.run([seed_row(tok, SILENCE, 4)], user_tokens(tok, TEXT), other)
    assert changed != first


def test_warm_start_header_with_ten_channels_equals_the_reference(grids, tok):
    g = grids("qwen3", 10)
    opts = PaperOptions(num_channels=10, silence=SILENCE, max_rows=14, think_silence_penalty=3.0)
    cells, _, _ = expect_same(g, header_rows(tok, SILENCE, 10), user_tokens(tok, "hi there"), opts)
    assert cells[(11, 0)] == tok.encode(" hi")[0], "user tokens start right after the 11 header rows"


def test_input_pushed_mid_generation_equals_the_reference(grids, tok):
    g = grids("llama")
    push = user_tokens(tok, "and then double it")
    # The reference takes the push before row 12 is fed; the engine injects it from the
    # event of row 12's samples, i.e. before that row is fed: the same moment.
    opts = PaperOptions(
        num_channels=4, silence=SILENCE, max_rows=26, pushes={12: push}, stop_silent_rows=None
    )
    cells, _, _ = expect_same(
        g, [seed_row(tok, SILENCE, 4)], user_tokens(tok, "add two"), opts, pushes={12: list(push)}
    )
    assert [cells[(12 + i, 0)] for i in range(len(push))] == push


def test_skip_silence_and_ablation_equal_the_reference(grids, tok):
    g = grids("qwen3")
    base = dict(num_channels=4, silence=SILENCE, max_rows=18)
    seed = [seed_row(tok, SILENCE, 4)]
    skip, _, _ = expect_same(g, seed, user_tokens(tok, TEXT), PaperOptions(skip_silence=True, **base))
    plain, _, _ = g.run(seed, user_tokens(tok, TEXT), PaperOptions(**base))
    assert skip != plain, "masking silence keys changed nothing: the option is not reaching the mask"
    ablated = PaperOptions(ablate=frozenset({2}), **base)
    cells, _, _ = expect_same(g, [seed_row(tok, SILENCE, 4, ablate=[2])], user_tokens(tok, TEXT), ablated)
    assert not any(c == 2 for (_, c) in cells)


def test_stop_on_an_all_silent_row_and_the_penalty_variants(grids, tok):
    g = grids("llama", quiet=True)  # every channel silent unless a penalty makes it speak
    seed = [seed_row(tok, SILENCE, 4)]
    user = user_tokens(tok, "one two three four")
    # No penalty: nothing but the user ever speaks, so the first row after the user's last
    # token is all silent and ends the session ("stop"), never earlier.
    got, finish, _ = g.run(
        seed, user, PaperOptions(num_channels=4, silence=SILENCE, max_rows=30, silence_penalty=0.0)
    )
    assert got == {(1 + i, 0): t for i, t in enumerate(user)} and set(finish.values()) == {"stop"}
    ref, rows = g.reference(
        seed, user, PaperOptions(num_channels=4, silence=SILENCE, max_rows=30, silence_penalty=0.0)
    )
    assert got == ref and len(rows) == len(user)
    # The paper's penalty makes Output speak once the user stops; the during-talk variant and
    # a thinking penalty make channels speak earlier.
    cells, _, _ = expect_same(g, seed, user, PaperOptions(num_channels=4, silence=SILENCE, max_rows=16))
    assert min(r for (r, c) in cells if c == 1) > len(user)
    # The row where Output first speaks moves with the penalty's size and ramp: several
    # sizes, so that a ramp of another length cannot agree with all of them.
    # Output's silence margin after the user's last row; a penalty p makes it speak k rows
    # later where p * k / 5 first exceeds it: these sizes put that at k = 5, 4, 3, 2, 1.
    logits = grid_logits(g.hf, g.chan, seed + rows, PaperOptions(num_channels=4, silence=SILENCE))[1]
    others = logits.clone()
    others[SILENCE] = float("-inf")
    margin = float(logits[SILENCE] - others.max())
    assert margin > 0
    firsts = set()
    for penalty in (5 * margin / x for x in (4.5, 3.5, 2.5, 1.5, 0.5)):
        opts = PaperOptions(
            num_channels=4, silence=SILENCE, max_rows=12, silence_penalty=penalty, stop_silent_rows=None
        )
        cells, _, _ = expect_same(g, seed, user, opts)
        firsts.add(min(r for (r, c) in cells if c == 1))
    assert len(firsts) >= 3, f"Output's first row barely moves with the penalty: {firsts}"
    talk = PaperOptions(
        num_channels=4, silence=SILENCE, max_rows=16, during_talk=True, think_silence_penalty=12.0
    )
    cells, _, _ = expect_same(g, seed, user, talk)
    assert any(c >= 2 for (_, c) in cells) and min(r for (r, c) in cells if c == 1) <= len(user)


def test_sessions_batched_together_each_equal_their_reference(grids, tok):
    g = grids("qwen3")
    cases = [
        (
            [seed_row(tok, SILENCE, 4)],
            user_tokens(tok, TEXT),
            PaperOptions(num_channels=4, silence=SILENCE, max_rows=18),
        ),
        (
            [seed_row(tok, SILENCE, 4)],
            user_tokens(tok, "hello"),
            PaperOptions(
                num_channels=4, silence=SILENCE, max_rows=12, temperature=0.8, seeds={1: 1, 2: 2, 3: 3}
            ),
        ),
        (
            [seed_row(tok, SILENCE, 4)],
            user_tokens(tok, "a b c d e f"),
            PaperOptions(num_channels=4, silence=SILENCE, max_rows=15, skip_silence=True),
        ),
    ]
    started = [g.run(s, u, o, wait=False) for s, u, o in cases]
    for (done, events), (start, user, opts) in zip(started, cases, strict=True):
        assert done.wait(120)
        got, _, _ = g.collect(events)
        ref, _ = g.reference(start, user, opts)
        assert got == ref, _diff(got, ref)


def test_channel_stats_are_the_distribution_of_each_sampled_token(grids, tok):
    g = grids("qwen3")
    opts = PaperOptions(num_channels=4, silence=SILENCE, max_rows=10, think_silence_penalty=2.0)
    seed = [seed_row(tok, SILENCE, 4)]
    user = user_tokens(tok, "hi")
    cells, _, events = g.run(seed, user, opts, stats=True)
    _, rows = g.reference(seed, user, opts)
    grid = seed + rows
    checked = 0
    chan_of = {g.layout.stream_name(c): c for c in range(1, 4)}
    for ev in events:
        if ev.kind == "user" or not ev.token_ids:
            continue
        assert len(ev.stats) == len(ev.token_ids)
        c = chan_of[ev.stream]
        logits = grid_logits(g.hf, g.chan, grid[: ev.row], opts)[c]
        k = ev.row - (1 + len(user) - 1) if ev.row >= 1 + len(user) else 0
        base = 10.0 if c == 1 else 2.0
        bias = ((SILENCE, -base * min(1.0, k / 5)),) if k > 0 else ()
        ent, top1 = distribution_stats(logits, bias)
        assert ev.stats[0] == pytest.approx((ent, top1), abs=1e-4)
        checked += 1
    assert checked >= 5


def test_the_launcher_knows_which_layout_a_deployment_serves(tmp_path, default_model_dir):
    """``--stream-layout`` reaches every model's parameters, and the demo picks its options by it."""
    from launcher.serve import build_config, render_repository, serves_paper_layout

    assert not serves_paper_layout(build_config(model_dir="default"))
    cfg = build_config(model_dir="default", parameters={"*": {"stream_layout": "paper"}})
    assert serves_paper_layout(cfg)
    cfg.model_dir = str(default_model_dir)
    render_repository(
        Path(__file__).resolve().parent.parent / "model_repository", tmp_path / "repo", cfg, "KIND_CPU"
    )
    for model in ("preprocessing", "prefill", "decode"):
        text = (tmp_path / "repo" / model / "config.pbtxt").read_text()
        assert 'key: "stream_layout"' in text and 'string_value: "paper"' in text, model
