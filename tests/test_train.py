"""``python -m train`` without a server: the data, the layouts, training, resuming, the merge.

A tiny random Llama (two layers, the real tokenizer) keeps every training test to seconds.
The references are code nobody here wrote: ``peft`` merges the adapter itself, and the
engine (``backend.engine``) must compute the very logits that the transformers decoder
computed in training on the same grid.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from backend.adapter import AdapterError, merge_adapter
from backend.tokenizer import Tokenizer
from train import tasks
from train.render import ANSWER_DELAY, IGNORE, OUTPUT_CHANNEL, THINK_CHANNEL, Renderer

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tokenizer(default_model_dir) -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir)


@pytest.fixture(scope="module")
def renderer(tokenizer) -> Renderer:
    return Renderer(tokenizer)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, default_model_dir) -> Path:
    """A random two-layer Llama with SmolLM2's tokenizer (and so its vocabulary)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        initializer_range=0.3,  # logits with some range: a 0.02 init caps what a tied head can learn
    )
    out = tmp_path_factory.mktemp("tiny-base")
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(Path(default_model_dir) / name, out / name)
    return out


# ----------------------------------------------------------------------------- data


def _replay(ex: tasks.Example) -> list[str | None]:
    """The states of an example recomputed from its words, independently of tasks.py's makers."""
    states: list[str | None] = [None]
    if ex.family == "compass":
        heading = tasks.HEADINGS.index(ex.words[1])
        states.append(ex.words[1])
        for w in ex.words[2:]:
            heading = (heading + {"left": 3, "right": 1, "back": 2}[w]) % 4
            states.append(tasks.HEADINGS[heading])
    elif ex.family == "count":
        target, n = ex.words[1], 0
        states.append("zero")
        for w in ex.words[2:]:
            n += w == target
            states.append(tasks.NUMBERS[n])
    elif ex.family == "max":
        for i in range(1, len(ex.words)):
            states.append(tasks.NUMBERS[max(tasks.NUMBERS.index(w) for w in ex.words[1 : i + 1])])
    else:
        last = "none"
        for w in ex.words[1:]:
            last = w if w in tasks.COLORS else last
            states.append(last)
    return states


def test_every_family_tracks_its_state_and_answers_with_the_last_one() -> None:
    rng = random.Random(7)
    for family in tasks.FAMILIES:
        for _ in range(50):
            ex = tasks.make_example(family, rng)
            assert list(ex.states) == _replay(ex), ex
            assert ex.answer == ex.states[-1]
            assert (
                tasks.MIN_ITEMS
                <= len(ex.words) - (2 if family in ("compass", "count") else 1)
                <= tasks.MAX_ITEMS
            )


def test_held_out_is_fixed_balanced_and_never_trained_on() -> None:
    held = tasks.held_out(40)
    assert held == tasks.held_out(40)
    assert [e.family for e in held[:4]] == list(tasks.FAMILIES)
    texts = {e.text for e in held}
    # Training examples are drawn from the same generator but skip every held-out text.
    train = [tasks.training_example(0, i, texts) for i in range(2000)]
    assert not texts & {e.text for e in train}
    assert tasks.training_example(0, 17, texts) == train[17]  # a pure function of (seed, index)
    # The filter is what keeps them apart: excluding an example's own text draws another one.
    own = tasks.training_example(0, 5, set())
    assert tasks.training_example(0, 5, {own.text}).text != own.text
    answers = {e.answer for e in train if e.family == "count"}
    assert len(answers) >= 8  # counts are spread, not one constant


def test_score_wants_exactly_the_answer() -> None:
    ex = tasks.Example("max", ("max", "two", "five"), (None, "two", "five"), "five")
    assert tasks.score(ex, " five")
    assert not tasks.score(ex, " five six")
    assert not tasks.score(ex, "")


# ----------------------------------------------------------------------------- layouts


def test_grid_puts_each_state_two_rows_after_its_word_and_the_answer_after_the_stop(renderer) -> None:
    ex = tasks.held_out(4)[0]
    rows = renderer.grid_rows(ex)
    n, sil = len(ex.words), renderer.silence
    assert len(rows) == n + ANSWER_DELAY + 2  # seed row, n user rows, the wait, the answer, the stop row
    assert rows[0][0] == rows[0][OUTPUT_CHANNEL] == sil and rows[0][THINK_CHANNEL] != sil  # seed row
    for u, (word, state) in enumerate(zip(ex.words, ex.states, strict=True), start=1):
        assert rows[u][0] == renderer.word(word)
        assert rows[u + 2][THINK_CHANNEL] == (renderer.word(state) if state else sil)
    answer_row = [r for r, row in enumerate(rows) if row[OUTPUT_CHANNEL] != sil]
    assert answer_row == [n + ANSWER_DELAY] and rows[n + ANSWER_DELAY][OUTPUT_CHANNEL] == renderer.word(
        ex.answer
    )
    assert rows[-1] == [sil] * renderer.num_channels  # the engine stops on this row
    # ... and on the first all-silent row: none may come before the answer.
    assert all(set(row) != {sil} for row in rows[:-1])

    flat = renderer.grid(ex)
    c = renderer.num_channels
    for i, (chan, pos, label) in enumerate(zip(flat.chans, flat.positions, flat.labels, strict=True)):
        assert pos == i // c and chan == i % c
        if chan == 0 or pos == len(rows) - 1:
            assert label == IGNORE  # User is never a target; the last row has no next row
        else:
            assert label == rows[pos + 1][chan]  # next row, same channel


def test_one_stream_is_prompt_then_items_and_states_then_answer(renderer, tokenizer) -> None:
    ex = tasks.held_out(4)[1]
    seq = renderer.sequential(ex)
    prompt = renderer.sequential_prompt(ex)
    assert seq.ids[: len(prompt)] == prompt
    text = tokenizer.decode(seq.ids[len(prompt) :])
    # Each item again and the state after it (items without a state yet are skipped).
    steps = " ".join(f"{w} {st}" for w, st in zip(ex.words, ex.states, strict=True) if st is not None)
    eos = tokenizer.decode(tokenizer.eos_token_ids)
    assert text == " " + steps + " so " + ex.answer + eos
    # Next-token labels from the prompt's last token on; channel rows 0 (prompt) and 1 (output).
    assert seq.labels[len(prompt) - 1 : -1] == seq.ids[len(prompt) :]
    assert set(seq.labels[: len(prompt) - 1]) == {IGNORE} and seq.labels[-1] == IGNORE
    assert seq.chans == [0] * len(prompt) + [1] * (len(seq.ids) - len(prompt))


def test_a_word_of_two_tokens_is_refused(renderer) -> None:
    with pytest.raises(ValueError, match="one token"):
        renderer.word("antidisestablishment")


# ----------------------------------------------------------------------------- training


def _train(base: Path, out: Path, steps: int):
    from train.loop import TrainConfig, train

    cfg = TrainConfig(
        base=str(base),
        out=str(out),
        steps=steps,
        batch=4,
        lr=3e-2,
        warmup=2,
        bf16=False,
        save_every=2,
        held_out=20,
    )
    return train(cfg, progress=False), cfg


def _held_out_loss(model, renderer: Renderer, rendering: str) -> float:
    """The training loss of ``model`` on a fixed batch of held-out examples."""
    from train.render import collate

    items = [renderer.grid(e) if rendering == "grid" else renderer.sequential(e) for e in tasks.held_out(8)]
    with torch.no_grad():
        return model.loss(collate(items, renderer.eos))[0].item()


def test_a_few_steps_lower_the_held_out_loss(tiny_base, tmp_path) -> None:
    from train.model import LoraSettings, StreamModel

    renderer = Renderer(Tokenizer.from_dir(tiny_base))
    before = StreamModel.from_dir(tiny_base, 3, LoraSettings()).eval()  # LoRA B = 0: the base model
    after, _ = _train(tiny_base, tmp_path / "run", 10)
    after.eval()
    for rendering in ("grid", "sequential"):
        start, end = _held_out_loss(before, renderer, rendering), _held_out_loss(after, renderer, rendering)
        # Measured: grid 13.5 -> 3.8, one stream 13.8 -> 9.3 (its targets are words, not silence).
        assert end < (0.5 * start if rendering == "grid" else start - 2.5), (rendering, start, end)


def test_a_killed_run_resumes_where_it_stopped(tiny_base, tmp_path) -> None:
    """``python -m train`` killed (SIGKILL) mid-run, then the same command again: the same
    losses, step for step, as a run that was never interrupted."""
    import os
    import subprocess
    import sys
    import time

    _, full = _train(tiny_base, tmp_path / "full", 8)
    cmd = [sys.executable, "-m", "train", "--base", str(tiny_base), "--out", str(tmp_path / "cut")]
    cmd += ["--steps", "8", "--batch", "4", "--lr", "3e-2", "--warmup", "2", "--fp32", "--save-every", "2"]
    cmd += ["--held-out", "20", "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "cut" / "checkpoint.pt"
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    done = torch.load(ckpt, weights_only=False)["step"]
    assert 2 <= done < 8, f"the run was not interrupted mid-way (checkpoint at step {done})"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    resumed = json.loads((tmp_path / "cut" / "log.json").read_text())
    assert [x["step"] for x in resumed] == list(range(1, 9))
    for rendering in ("grid", "sequential"):
        want = [x[rendering] for x in full.log]
        assert [x[rendering] for x in resumed] == pytest.approx(want, rel=1e-4), rendering


def test_resume_refuses_other_settings(tiny_base, tmp_path) -> None:
    from train.loop import TrainConfig, train

    _train(tiny_base, tmp_path / "run", 2)
    other = TrainConfig(
        base=str(tiny_base), out=str(tmp_path / "run"), steps=4, batch=4, lr=5e-3, bf16=False, held_out=20
    )
    with pytest.raises(ValueError, match="other settings"):
        train(other, progress=False)


@pytest.fixture(scope="module")
def tiny_trained(tiny_base, tmp_path_factory):
    """A tiny model after two steps, its LoRA B made non-zero so the merge has work to do."""
    from train.export import export_adapter

    out = tmp_path_factory.mktemp("tiny-run")
    model, _ = _train(tiny_base, out, 2)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or name == "channel_embedding":
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    adapter = export_adapter(model, out / "adapter", silence_token_id=731, info={"test": True})
    merged = tmp_path_factory.mktemp("tiny-merged")
    merge_adapter(tiny_base, adapter, merged)
    return model.eval(), adapter, merged


def test_merge_equals_peft_merge_and_unload(tiny_base, tiny_trained) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    _, adapter, merged = tiny_trained
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().state_dict()
    ours = load_file(str(merged / "model.safetensors"))
    compared = 0
    for name, tensor in reference.items():
        if name in ours:
            torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared >= 2 * 7 + 3  # every adapted projection of both layers, norms, embedding
    cfg = json.loads((merged / "config.json").read_text())
    assert cfg["num_channels"] == 3 and cfg["silence_token_id"] == 731
    assert ours["model.channel_embedding.weight"].shape == (3, 64)


def test_the_engine_computes_the_training_logits_on_the_same_grid(tiny_trained, renderer) -> None:
    """Positions per row, block-causal mask, channel embedding, LoRA: the trained layout is the
    served layout. The engine's last-row logits of a grid prefix are the training forward's."""
    from backend.engine import Engine, EngineConfig, GridRules, Prefix
    from train.render import collate

    model, _, merged = tiny_trained
    ex = tasks.held_out(4)[2]
    rows = renderer.grid_rows(ex)[:9]  # seed row, user words, states: a grid cut mid-example
    flat = [t for r in rows for t in r]
    c = renderer.num_channels
    item = renderer.grid(ex)
    item = type(item)(flat, item.chans[: len(flat)], item.positions[: len(flat)], [IGNORE] * len(flat), c)
    with torch.no_grad():
        want = model.logits(collate([item], renderer.eos))[0, -c:]
    engine = Engine.from_model_dir(merged, EngineConfig(dtype="float32", threads=1, quantization="none"))
    try:
        rules = GridRules(silence_id=renderer.silence, num_channels=c)
        got = engine.prefill_export(Prefix.grid(rows), rules=rules).logits
    finally:
        engine.shutdown()
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-4)


def test_merge_names_a_broken_adapter(tiny_base, tiny_trained, tmp_path) -> None:
    _, adapter, _ = tiny_trained
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    (broken / "stream_config.json").write_text(json.dumps({"num_channels": 5, "silence_token_id": 731}))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(AdapterError, match="channel_embedding.safetensors: 3 rows, stream_config says 5"):
        merge_adapter(tiny_base, broken, out)
    (broken / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        merge_adapter(tiny_base, broken, out)


def test_the_shipped_adapter_is_small_and_complete() -> None:
    from backend.model_store import SHIPPED_ADAPTERS

    folder = SHIPPED_ADAPTERS["streams-demo"]
    names = {f.name for f in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "channel_embedding.safetensors"} <= names
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 25 * 2**20
    cfg = json.loads((folder / "stream_config.json").read_text())
    assert cfg["num_channels"] == 3 and cfg["silence_token_id"] == 731
