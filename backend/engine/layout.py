"""The paper's stream layout: channels, silence, the seed row, the warm-start header, user rows.

Stream-trained checkpoints (Su et al., 2026; ``JonasGeiping/stream-qwen3-8b``) were trained on
one grid layout, and they only behave when served on exactly that layout. This module is that
layout as data and small pure functions; :class:`~backend.engine.session.GridRules` holds the
session-level rules (penalty, stop) and the scheduler applies them. What the checkpoints saw:

- C = ``num_channels`` columns: 0 User, 1 Output, 2..C-1 thinking, named as the paper names
  them (Analytical, Skeptical, ... for C = 10; ``Ch<i>`` past the tenth);
- every row holds exactly C tokens; a channel with nothing to say carries *silence*, the
  tokenizer's first token of " -" (BPE) or "-" (SentencePiece);
- a session starts from a seed row (User and Output silent, one role word per thinking
  channel), or from the warm-start header grid, or from a grid the caller gives;
- user text has no chat template: each whitespace-separated chunk is encoded with a leading
  space and its tokens go into the User column one per row, right after the start rows.

The word tables are the paper's (``sec7_monitorability/eval/stream_inference.py``): they are
what the released checkpoints were trained with, so they are reproduced as data, not re-invented.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from backend.engine.session import Prefix, StreamSpec
from backend.models.config import channel_embedding_rows
from backend.tokenizer import Tokenizer

#: The paper's channel names, in column order.
CHANNEL_NAMES = (
    "User",
    "Output",
    "Analytical",
    "Skeptical",
    "Intuitive",
    "Between",
    "Curious",
    "Void",
    "Instinct",
    "Synthesis",
)
USER_CHANNEL = 0
OUTPUT_CHANNEL = 1
#: The ``stream_layout`` deployment parameter: ``auto`` serves the paper's layout exactly when
#: the checkpoint was stream-trained (a channel embedding or ``num_channels`` in its config).
LAYOUT_SETTINGS = ("auto", "paper", "project")
#: Channels of the paper's released checkpoints, used when ``paper`` is forced on an ordinary one.
PAPER_NUM_CHANNELS = 10
#: How a session's grid starts (``layout_start``).
START_MODES = ("seed", "header", "grid")

#: Row 0 in ``seed`` mode: User and Output silent ("-"), one role word per thinking channel.
SEED_WORDS = (
    "-",
    "-",
    " thinking",
    " checking",
    " feeling",
    " relating",
    " asking",
    " drifting",
    " watching",
    " integrating",
)

# fmt: off
#: The warm-start header (``header`` mode): 11 rows that give each thinking column its voice
#: while User stays silent and Output slowly becomes " OK I'm ready". "-" is silence; every
#: other word contributes its first token. The paper's ``SYSTEM_PROMPT_WORDS`` ("new").
HEADER_WORDS = (
    ("-", "-",      " idle",      " quiet",    " resting", " still",   " what",      " from",    " waiting",  " settling"),
    ("-", "-",      " ready",     " clear",    " calm",    " space",   " comes",     " the",     " alert",    " into"),
    ("-", "-",      " for",       " so",       " breath",  " open",    " next",      " form",    " steady",   " readiness"),
    ("-", "-",      " anything",  " far",      " easy",    " for",     " wonder",    "less",     " patient",  " all"),
    ("-", "-",      " think",     " check",    " present", " whoever", " who",       " void",    " careful",  " voices"),
    ("-", "-",      " through",   " every",    " here",    " arrives", " needs",     " gaping",  " grounded", " finding"),
    ("-", " OK",    " each",      " angle",    " letting", " welcome", " something", " m",       " before",   " their"),
    ("-", " I",     " problem",   " first",    " it",      " them",    " fresh",     "aw",       " acting",   " rhythm"),
    ("-", "'m",     " carefully", " honestly", " happen",  " openly",  " perhaps",   " springs", " measured", " listening"),
    ("-", " ready", " consider",  " then",     " now",     " ready",   " always",    " an",      " aware",    " together"),
    ("-", "-",      " now",       " always",   " open",    "-",        " always",    " entity",  " now",      " here"),
)
# fmt: on


class LayoutError(ValueError):
    """A layout option or grid that cannot be used; the message names the option and the rule."""


def channel_names(num_channels: int) -> list[str]:
    """The paper's names for ``num_channels`` columns (``Ch<i>`` past the tenth)."""
    return [CHANNEL_NAMES[c] if c < len(CHANNEL_NAMES) else f"Ch{c}" for c in range(num_channels)]


def find_silence(tokenizer: Tokenizer, configured: int | None = None) -> int:
    """The silence token: ``configured`` if given, else the tokenizer's one token for " -".

    As the paper finds it: a SentencePiece vocabulary (its first token of "test" starts with
    "▁") spells it "-", a byte-level BPE " -". Unlike the paper this refuses a tokenizer that
    splits it, because a multi-token "silence" cannot fill one grid cell.
    """
    if configured is not None:
        if not 0 <= configured < tokenizer.vocab_size:
            raise LayoutError(f"silence_token_id must be in 0..{tokenizer.vocab_size - 1}, got {configured}")
        return configured
    first = tokenizer.token_of(tokenizer.encode("test")[0]) or ""
    text = "-" if first.startswith("\u2581") else " -"
    ids = tokenizer.encode(text)
    if len(ids) != 1:
        raise LayoutError(
            f"the tokenizer encodes the silence marker {text!r} as {len(ids)} tokens {ids}; "
            "set the silence_token_id parameter to the checkpoint's silence token"
        )
    return ids[0]


def user_tokens(tokenizer: Tokenizer, text: str) -> list[int]:
    """User text as the checkpoints read it: each whitespace chunk encoded as " " + chunk.

    Every token then has its mid-sentence BPE form, as in the training data (cells of the
    training table were tokenized one by one with a leading space).
    """
    out: list[int] = []
    for chunk in text.split():
        out += tokenizer.encode(" " + chunk)
    return out


def word_token(tokenizer: Tokenizer, word: str, silence: int) -> int:
    """One grid cell from a word: silence for "-", else the word's first token."""
    if word == "-":
        return silence
    ids = tokenizer.encode(word)
    if not ids:
        raise LayoutError(f"grid word {word!r} encodes to no token")
    return ids[0]


def seed_row(tokenizer: Tokenizer, silence: int, num_channels: int, ablate: Iterable[int] = ()) -> list[int]:
    """Row 0 of ``seed`` mode (ablated channels silent, as the paper ablates them from row 0)."""
    off = set(ablate)
    words = [SEED_WORDS[c] if c < len(SEED_WORDS) else "-" for c in range(num_channels)]
    return [silence if c in off else word_token(tokenizer, w, silence) for c, w in enumerate(words)]


def header_rows(tokenizer: Tokenizer, silence: int, num_channels: int) -> list[list[int]]:
    """The warm-start header grid, cut (or padded with silence) to ``num_channels`` columns."""
    return [
        [word_token(tokenizer, row[c], silence) if c < len(row) else silence for c in range(num_channels)]
        for row in HEADER_WORDS
    ]


def parse_grid(raw: str, tokenizer: Tokenizer, silence: int, num_channels: int) -> list[list[int]]:
    """A caller's grid (``grid_rows``): JSON rows of ``num_channels`` cells, each a token id or a
    word ("-" = silence, else the word's first token)."""
    try:
        rows = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LayoutError(f"grid_rows must be JSON (a list of rows), got an error: {exc}") from None
    if not isinstance(rows, list) or not rows:
        raise LayoutError("grid_rows must be a non-empty JSON list of rows")
    out = []
    for r, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != num_channels:
            raise LayoutError(f"grid_rows[{r}] must be a list of {num_channels} cells (one per channel)")
        cells = []
        for c, cell in enumerate(row):
            if isinstance(cell, bool) or not isinstance(cell, int | str):
                raise LayoutError(f"grid_rows[{r}][{c}] must be a token id or a word, got {cell!r}")
            if isinstance(cell, int):
                if not 0 <= cell < tokenizer.vocab_size:
                    raise LayoutError(f"grid_rows[{r}][{c}]: token id {cell} is outside the vocabulary")
                cells.append(cell)
            else:
                cells.append(word_token(tokenizer, cell, silence))
        out.append(cells)
    return out


@dataclass(frozen=True)
class StreamLayout:
    """One deployment's grid: how many channels, which token is silence, what they are called."""

    num_channels: int
    silence_id: int

    def __post_init__(self) -> None:
        if self.num_channels < 2:
            raise LayoutError(
                f"the stream layout needs at least 2 channels (User, Output), got {self.num_channels}"
            )

    @property
    def names(self) -> list[str]:
        return channel_names(self.num_channels)

    @property
    def thinking_channels(self) -> list[int]:
        return list(range(OUTPUT_CHANNEL + 1, self.num_channels))

    def stream_name(self, channel: int) -> str:
        """The client-facing ``stream_name`` of a channel: ``output`` or ``reasoning/<Name>``."""
        return "output" if channel == OUTPUT_CHANNEL else f"reasoning/{self.names[channel]}"

    def start_rows(
        self,
        tokenizer: Tokenizer,
        start: str,
        grid: Sequence[Sequence[int]] | None = None,
        ablate: Iterable[int] = (),
    ) -> list[list[int]]:
        """The rows a session starts from, before any user token."""
        if start == "seed":
            return [seed_row(tokenizer, self.silence_id, self.num_channels, ablate)]
        if start == "header":
            return header_rows(tokenizer, self.silence_id, self.num_channels)
        if start == "grid":
            if not grid:
                raise LayoutError("layout_start 'grid' needs grid_rows")
            return [list(r) for r in grid]
        raise LayoutError(f"layout_start must be one of {START_MODES}, got {start!r}")

    def prefix(self, flat: Sequence[int]) -> Prefix:
        """The :class:`Prefix` of start rows sent flattened row by row (``input_ids``)."""
        if not flat or len(flat) % self.num_channels:
            raise LayoutError(
                f"a grid prefix of {len(flat)} tokens is not whole rows of {self.num_channels} channels"
            )
        c = self.num_channels
        return Prefix.grid([list(flat[i : i + c]) for i in range(0, len(flat), c)])

    def stream_specs(self, sampling_of: object) -> list[StreamSpec]:
        """One stream per generated channel (Output and every thinking channel): all are computed,
        whichever the client sees. ``sampling_of(channel)`` gives each its parameters."""
        return [
            StreamSpec(
                self.stream_name(c),
                kind="output" if c == OUTPUT_CHANNEL else "reasoning",
                sampling=sampling_of(c),  # type: ignore[operator]
                channel=c,
            )
            for c in range(OUTPUT_CHANNEL, self.num_channels)
        ]


def resolve_layout(
    model_dir: Path | str, tokenizer: Tokenizer, params: Mapping[str, str]
) -> StreamLayout | None:
    """The deployment's layout from its model parameters and checkpoint; None = the project's.

    ``stream_layout``: ``auto`` (default) picks the paper's layout for a stream-trained
    checkpoint, ``paper`` forces it (an ordinary checkpoint then runs with a zero channel
    embedding, as the paper treats untrained ones), ``project`` never uses it.
    ``num_channels`` and ``silence_token_id`` override what the checkpoint says.
    """
    setting = (params.get("stream_layout") or "auto").strip().lower()
    if setting not in LAYOUT_SETTINGS:
        raise LayoutError(f"stream_layout must be one of {LAYOUT_SETTINGS}, got {setting!r}")
    if setting == "project":
        return None
    cfg_path = Path(model_dir) / "config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    rows = channel_embedding_rows(model_dir)
    trained = rows is not None or bool(cfg.get("num_channels"))
    if setting == "auto" and not trained:
        return None
    raw = params.get("num_channels") or cfg.get("num_channels") or rows or PAPER_NUM_CHANNELS
    try:
        num_channels = int(raw)
    except (TypeError, ValueError):
        raise LayoutError(f"num_channels must be an integer, got {raw!r}") from None
    silence = params.get("silence_token_id") or cfg.get("silence_token_id")
    try:
        configured = int(silence) if silence not in (None, "") else None
    except (TypeError, ValueError):
        raise LayoutError(f"silence_token_id must be an integer, got {silence!r}") from None
    return StreamLayout(num_channels, find_silence(tokenizer, configured))


__all__ = [
    "CHANNEL_NAMES",
    "HEADER_WORDS",
    "OUTPUT_CHANNEL",
    "SEED_WORDS",
    "START_MODES",
    "USER_CHANNEL",
    "LAYOUT_SETTINGS",
    "LayoutError",
    "StreamLayout",
    "channel_names",
    "find_silence",
    "header_rows",
    "parse_grid",
    "resolve_layout",
    "seed_row",
    "user_tokens",
]
