"""Tests for ``backend.tokenizer`` against ``transformers`` on the real default model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.model_store import ensure_default_model
from backend.tokenizer import IncrementalDetokenizer, Tokenizer

CONVERSATIONS = {
    "system+user": [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three primes."},
    ],
    "user-only": [{"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Bonjour ! Comment puis-je vous aider ?"},
        {"role": "user", "content": "Quelle heure est-il ? 🕒 日本語も"},
    ],
    "user-assistant-user": [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  spaces\n\nand newlines  "},
    ],
}

TEXTS = [
    "Hello world",
    " leading space and trailing ",
    "In 2024 I had 35.5 apples, 1,000,000 pears.",
    "<|im_start|>user\nhi<|im_end|>\n",
    "emoji 👋🏽 and CJK 世界, naïve café, Ελληνικά, русский",
    "code:\n\tdef f(x):\n\t    return x**2  # comment",
    "",
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_default_model()


@pytest.fixture(scope="session")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="session")
def hf_tok(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# ----------------------------------------------------------------------------- basics


def test_special_tokens_and_sizes(tok: Tokenizer) -> None:
    assert tok.bos_token_id == 1 and tok.id_of("<|im_start|>") == 1
    assert tok.eos_token_ids == [2] and tok.id_of("<|im_end|>") == 2
    assert tok.pad_token_id == 2
    assert tok.vocab_size == 49152
    assert tok.id_of("definitely-not-a-token") is None


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.encode(text, add_special_tokens=True) == hf_tok.encode(text, add_special_tokens=True)
    assert tok.decode(ids) == hf_tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, hf_tok, name: str, add_generation_prompt: bool
) -> None:
    messages = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert tok.encode(ours) == hf_tok.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )


def test_chat_template_default_system_prompt(tok: Tokenizer) -> None:
    """SmolLM2's template injects its own system prompt when the first message is not one."""
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


# ----------------------------------------------------------------------------- other folders


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    shutil.copyfile(src / "tokenizer.json", dst / "tokenizer.json")
    return dst


def test_eos_ids_include_generation_config(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(model_dir, tmp_path / "m")
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.from_dir(folder).eos_token_ids == [2, 0, 7]


def test_no_chat_template_falls_back_to_plain_transcript(model_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(model_dir, tmp_path / "m")
    tok = Tokenizer.from_dir(folder)
    assert tok.chat_template is None and tok.eos_token_ids == [] and tok.bos_token_id is None
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "System: Be brief.\nUser: hi\nAssistant:"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "System: Be brief.\nUser: hi"


def test_chat_template_jinja_file_and_features(model_dir: Path, tmp_path: Path) -> None:
    """transformers-5 folders keep the template in chat_template.jinja; the template gets
    raise_exception, tojson without HTML escaping, AddedToken-dict special tokens and kwargs."""
    folder = _copy_tokenizer(model_dir, tmp_path / "m")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>", "special": True}, "eos_token": "<|im_end|>"})
    )
    (folder / "chat_template.jinja").write_text(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}"
        "{% endif %}{{ m | tojson }}{% endfor %}{% if flag %}!{% endif %}{{ eos_token }}"
    )
    tok = Tokenizer.from_dir(folder)
    assert tok.bos_token_id == 1
    out = tok.apply_chat_template([{"role": "user", "content": "<a & b>"}], flag=True)
    assert out == '<|im_start|>{"role": "user", "content": "<a & b>"}!<|im_end|>'
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="no bad roles"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer(tok.backend, chat_template="{{ messages.__class__.__mro__ }}").apply_chat_template([])


# ----------------------------------------------------------------------------- incremental detokenizer


def _stream(tok: Tokenizer, chunks: list[list[int]]) -> list[str]:
    detok = IncrementalDetokenizer(tok)
    return [detok.push(c) for c in chunks] + [detok.flush()]


def _check_stream(tok: Tokenizer, ids: list[int], pieces: list[str]) -> None:
    full = tok.decode(ids)
    assert "".join(pieces) == full
    so_far = ""
    for piece in pieces:
        so_far += piece
        # never emits text that a later token changes (e.g. a U+FFFD for a split character)
        assert full.startswith(so_far)


@pytest.mark.parametrize(
    "text",
    [
        "Hello 👋 世界! 🎉 naïve café 日本語テキスト 😀😃 👨‍👩‍👧",
        "漢字かなカナ한국어🇯🇵🇫🇷 — “quotes” … ±∞",
        "<|im_start|>assistant\n🙂🙂🙂<|im_end|>",
    ],
)
def test_detokenizer_emoji_cjk_one_id_at_a_time(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters really are split into byte tokens
    pieces = _stream(tok, [[i] for i in ids])
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[-1] == ""  # nothing held back once the text is complete
    _check_stream(tok, ids, pieces)


@pytest.mark.parametrize("text", [*TEXTS, "Hello 👋 世界! naïve 😀 <|im_start|>assistant\n🙂<|im_end|>"])
def test_token_bytes_add_up_to_the_text(tok: Tokenizer, text: str) -> None:
    """Each token's own bytes (``top_logprobs``' ``bytes``), concatenated, are the text's UTF-8:
    also the tokens that end inside a character, whose ``decode([id])`` is U+FFFD."""
    ids = tok.encode(text)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_wire_text_of_partial_tokens_round_trips(tok: Tokenizer) -> None:
    """The server's ``top_logprobs_text`` spelling and the client's reading of it agree."""
    from backend.serving import top_logprobs as server
    from client import events as client

    assert server.BYTES_PREFIX == client.BYTES_PREFIX
    ids = tok.encode("😀 日本 plain")
    raws = [tok.token_bytes(i) for i in ids]
    wires = [server.wire_text(r) for r in raws]
    assert any(w.startswith("bytes:\\x") for w in wires) and "plain" in "".join(wires)
    assert [client.token_bytes_of(w) for w in wires] == raws
    assert all(w.encode("utf-8").decode("utf-8") == w for w in wires)  # always valid UTF-8


def _byte_token_ids(tok: Tokenizer) -> list[int]:
    """Ids of the single-byte tokens (235 here: bytes that never occur in UTF-8, like 0xC0,
    have none); sampling these makes split UTF-8 sequences common."""
    import json as _json

    vocab = _json.loads(tok.backend.to_str())["model"]["vocab"]
    return sorted(i for t, i in vocab.items() if len(t) == 1)


@pytest.fixture(scope="session")
def byte_ids(tok: Tokenizer) -> list[int]:
    ids = _byte_token_ids(tok)
    assert len(ids) > 200
    return ids


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_detokenizer_random_ids(tok: Tokenizer, byte_ids: list[int], data: st.DataObject) -> None:
    any_id = st.integers(min_value=0, max_value=tok.vocab_size - 1)
    ids = data.draw(st.lists(st.one_of(any_id, st.sampled_from(byte_ids)), max_size=40), label="ids")
    one_at_a_time = _stream(tok, [[i] for i in ids])
    _check_stream(tok, ids, one_at_a_time)

    # the same ids pushed in random-size chunks (the engine may deliver several per step)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(ids)), max_size=6), label="cuts"))
    bounds = [0, *cuts, len(ids)]
    chunks = [ids[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    _check_stream(tok, ids, _stream(tok, chunks))


def test_detokenizer_context_ids_are_not_emitted(tok: Tokenizer) -> None:
    prompt = tok.encode("<|im_start|>assistant\n")
    answer = tok.encode("The capital is Paris 🗼.")
    detok = IncrementalDetokenizer(tok, context_ids=prompt)
    text = "".join(detok.push([i]) for i in answer) + detok.flush()
    assert text == "The capital is Paris 🗼."
    assert detok.flush() == "" and detok.push([]) == ""
