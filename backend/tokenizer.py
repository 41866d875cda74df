"""Tokenizer and streaming detokenizer for the engine, without ``transformers``.

``transformers`` costs seconds of import time and is not needed to serve: a fast
``tokenizer.json`` (the ``tokenizers`` library) plus the checkpoint's
``tokenizer_config.json`` hold everything. What ``transformers`` adds on top, and what we
therefore re-implement here, is

* the chat template: the checkpoint's own Jinja template, rendered in the same sandboxed
  environment transformers uses (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``,
  ``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape, and the
  special tokens as variables), so prompts are byte-identical to what the model was
  trained/evaluated with (tested against ``AutoTokenizer.apply_chat_template``);
* the set of end-of-sequence ids: ``tokenizer_config.json``'s ``eos_token`` *and* every id in
  ``generation_config.json`` / ``config.json`` ``eos_token_id`` (Llama-3 and Qwen2 instruct
  models stop on several tokens, only one of which is "the" eos token);
* ``IncrementalDetokenizer``: per-stream text deltas that never cut a multi-byte character;
* ``Tokenizer.token_bytes``: the exact bytes of one token on its own (OpenAI's
  ``top_logprobs[].bytes``), which a ``decode([id])`` cannot give for a token that ends
  inside a multi-byte character.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import tokenizers

#: Special-token attributes of ``tokenizer_config.json`` exposed to chat templates.
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
#: How many ``context_ids`` the detokenizer re-decodes before the first streamed token (as
#: vLLM does with the prompt): enough for decoders whose output for a token depends on its
#: neighbours (SentencePiece's leading-space rule), small enough to keep pushes cheap.
_DETOK_CONTEXT = 5
_REPLACEMENT = "\ufffd"
#: SentencePiece's byte-fallback pieces (``<0xE2>``) and its word-start marker.
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SP_SPACE = "\u2581"


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte is written as -> the byte
    (``bytes_to_unicode`` of GPT-2 / the ``tokenizers`` ``ByteLevel`` pre-tokenizer)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1)]
    printable += range(ord("\xae"), ord("\xff") + 1)
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_OF_CHAR = _byte_level_table()


def _token_content(value: Any) -> str | None:
    """``"<s>"`` or an AddedToken dict ``{"content": "<s>", ...}`` -> ``"<s>"``."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when the file is absent (all of these are optional)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def _find_chat_template(path: Path, tok_cfg: dict[str, Any]) -> str | None:
    """The folder's default chat template, wherever this transformers version put it.

    transformers 4 writes it into ``tokenizer_config.json`` (a string, or a list of named
    templates of which ``default`` is the one ``apply_chat_template`` uses), transformers 5
    into ``chat_template.jinja``; some processors use ``chat_template.json``.
    """
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        return template
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(path / "chat_template.json").get("chat_template")
    return template if isinstance(template, str) and template else None


def _compile_chat_template(source: str) -> Any:
    """Compile ``source`` the way transformers does (see module docstring for why)."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant spans for training
        masks in transformers; when rendering a prompt it just emits its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus what ``tokenizer_config.json`` says about it.

    Build with ``Tokenizer.from_dir(model_folder)``. Decoding never applies transformers'
    ``clean_up_tokenization_spaces`` (it rewrites ``" ."`` to ``"."`` across token
    boundaries, so streamed deltas would not add up to the final text); for the default
    model that flag is off anyway.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        tokenizer_config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        model_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._tok = tokenizer
        self.config: dict[str, Any] = dict(tokenizer_config or {})
        gen = generation_config or {}
        model = model_config or {}

        self.special_tokens: dict[str, str] = {}
        for key in _SPECIAL_TOKEN_KEYS:
            content = _token_content(self.config.get(key))
            if content is not None:
                self.special_tokens[key] = content
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")

        bos_id = self.id_of(self.bos_token) if self.bos_token else None
        if bos_id is None:
            bos_ids = _as_id_list(gen.get("bos_token_id")) or _as_id_list(model.get("bos_token_id"))
            bos_id = bos_ids[0] if bos_ids else None
        self.bos_token_id: int | None = bos_id

        eos: list[int] = []
        eos_id = self.id_of(self.eos_token) if self.eos_token else None
        for candidate in (
            [eos_id] if eos_id is not None else [],
            _as_id_list(gen.get("eos_token_id")),
            _as_id_list(model.get("eos_token_id")),
        ):
            for i in candidate:
                if i not in eos:
                    eos.append(i)
        self.eos_token_ids: list[int] = eos
        pad = self.special_tokens.get("pad_token")
        pad_id = self.id_of(pad) if pad else None
        self.pad_token_id: int | None = pad_id if pad_id is not None else (eos[0] if eos else None)

        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.chat_template: str | None = chat_template
        self._compiled_template: Any = None
        self._byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
        self._added = set(tokenizer.get_added_tokens_decoder())
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_dir(cls, path: Path | str) -> Tokenizer:
        """Load ``tokenizer.json`` (required) and the optional ``tokenizer_config.json``,
        ``generation_config.json``, ``config.json`` and chat template files of a model folder."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file}: tokenizer.json is missing")
        tok_cfg = _read_json(path / "tokenizer_config.json")
        return cls(
            tokenizers.Tokenizer.from_file(str(tok_file)),
            tokenizer_config=tok_cfg,
            generation_config=_read_json(path / "generation_config.json"),
            model_config=_read_json(path / "config.json"),
            chat_template=_find_chat_template(path, tok_cfg),
        )

    # ------------------------------------------------------------------ ids <-> text

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``. Special-token strings in ``text`` (``<|im_start|>``) map to
        their ids, as in transformers. ``add_special_tokens`` applies the tokenizer's
        post-processor (e.g. a Llama-3 BOS); off by default because chat templates already
        spell out their special tokens."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (special tokens included unless ``skip_special_tokens``)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes ``token_id`` stands for on its own (cached per id).

        Byte-level vocabularies (GPT-2, Llama-3, Qwen2, SmolLM2) write each byte as one
        character of GPT-2's alphabet, so the raw entry maps back byte by byte; a token of an
        emoji's first bytes is then ``b"\\xf0\\x9f"``, where ``decode([id])`` says ``"\\ufffd"``.
        SentencePiece pieces: ``<0xNN>`` is that byte and the word-start marker a space.
        Added / special tokens are their own text.
        """
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            out = b""
        elif token_id in self._added:
            out = piece.encode("utf-8")
        elif self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            out = bytes(_BYTE_OF_CHAR[c] for c in piece)
        elif (m := _BYTE_PIECE.fullmatch(piece)) is not None:
            out = bytes([int(m.group(1), 16)])
        elif _SP_SPACE in piece:
            out = piece.replace(_SP_SPACE, " ").encode("utf-8")
        else:
            out = self.decode([token_id]).encode("utf-8")
        self._bytes_cache[token_id] = out
        return out

    def id_of(self, token: str) -> int | None:
        """Id of a single vocabulary entry (``"<|im_end|>"``), or ``None`` if absent."""
        return self._tok.token_to_id(token)

    def token_of(self, token_id: int) -> str | None:
        """The raw vocabulary entry of ``token_id`` (byte-level form, e.g. ``"Ġthe"``)."""
        return self._tok.id_to_token(token_id)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for batch encode and the like)."""
        return self._tok

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render ``messages`` with the checkpoint's own chat template.

        Variables available to the template: ``messages``, ``add_generation_prompt``,
        ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``, ``tools``/``documents``
        (``None`` unless passed) and any extra ``kwargs`` (e.g. ``enable_thinking``).

        Without a template (base checkpoints) this falls back to a plain transcript,
        ``"System: ...\\nUser: ...\\nAssistant:"``, which base models continue reasonably;
        it is *not* what any instruct model was trained on, so instruct folders should ship
        their template.
        """
        if self.chat_template is None:
            return self._plain_transcript(messages, add_generation_prompt)
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        variables: dict[str, Any] = {"tools": None, "documents": None}
        variables.update(self.special_tokens)
        variables.update(kwargs)
        return self._compiled_template.render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )

    @staticmethod
    def _plain_transcript(messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        lines = [f"{str(m.get('role', 'user')).capitalize()}: {m.get('content', '')}" for m in messages]
        text = "\n".join(lines)
        if add_generation_prompt:
            text = f"{text}\nAssistant:" if text else "Assistant:"
        return text


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas; one instance per stream.

    Works like vLLM's ``detokenize_incrementally``: keep two offsets into the ids,
    ``prefix_offset`` (start of a few tokens of already-emitted context) and ``read_offset``
    (end of what has been emitted). On each push, decode ``ids[prefix:]`` and ``ids[prefix:read]``;
    the difference is the new text. If the new text ends in U+FFFD, the last token(s) end
    inside a multi-byte UTF-8 character (byte-level BPE splits emoji/CJK into byte tokens),
    so nothing is emitted until the character completes. Re-decoding a short window instead
    of the whole sequence keeps each push O(1), and the context tokens let decoders whose
    output for a token depends on its neighbours (SentencePiece's leading space) agree with
    a full decode.

    Guarantee (tested): the concatenation of every ``push`` plus ``flush`` equals
    ``tokenizer.decode(all ids)``, and every intermediate concatenation is a prefix of it.

    ``context_ids`` (optional, not emitted) are tokens that precede the stream, e.g. the
    prompt, for tokenizers whose first-token text depends on what came before.
    """

    def __init__(self, tokenizer: Tokenizer, context_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = list(context_ids or [])
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - _DETOK_CONTEXT, 0)

    def push(self, ids: Iterable[int]) -> str:
        """Append ``ids``; return the text that became complete (may be ``""``)."""
        ids = list(ids)
        if not ids:
            return ""
        self.ids.extend(ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return whatever is still held back (an unfinished character decodes as U+FFFD,
        exactly as a full decode would show it)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.ids[self.prefix_offset :])
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT)):
            # an unfinished character, or a token that decodes to nothing yet: wait
            return ""
        if not new_text.startswith(prefix_text):
            # the window's decoding changed retroactively (should not happen for byte-level
            # or SentencePiece decoders); fall back to the safe, slower full comparison
            delta = self._slow_delta()
        else:
            delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return delta

    def _slow_delta(self) -> str:
        emitted = self.tokenizer.decode(self.ids[: self.read_offset])
        return self.tokenizer.decode(self.ids)[len(emitted) :]
