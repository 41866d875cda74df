"""Parse and validate a ``multistream`` request once, in ``preprocessing`` (CONTRACTS §3).

Why one place: the ensemble fans the request out to prefill, decode and (through BLS)
reasoning; if each re-validated, they could disagree. ``preprocessing`` turns the raw
tensors into a :class:`RequestConfig`, serialises it as ``request_json`` and every later
model trusts it. Errors name the input and the rule it breaks, because a client only sees
the message (``top_p must be in (0, 1], got 1.5``).

Inputs follow the TensorRT-LLM ``ensemble`` contract (``[batch, 1]`` each, optional ones
absent), so clients written for it work unchanged. TensorRT-LLM options this engine cannot
honour (beam search, bad words, log probs, ...) are refused with a clear error rather
than silently ignored.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from backend.engine.attention import ATTENTION_MODES, FIRST_STREAM_CHANNEL, MAX_CHANNELS
from backend.engine.layout import START_MODES
from backend.engine.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from backend.engine.session import GridRules
from backend.serving.session_ids import mint_session_id

SYNC_MODES = ("none", "revise")

#: Every client input of the ensemble (name -> Triton data type), CONTRACTS §3 plus the
#: TensorRT-LLM options we recognise in order to refuse them clearly.
INPUTS: dict[str, str] = {
    "text_input": "TYPE_STRING",
    "max_tokens": "TYPE_INT32",
    "stream": "TYPE_BOOL",
    "temperature": "TYPE_FP32",
    "top_p": "TYPE_FP32",
    "top_k": "TYPE_INT32",
    "seed": "TYPE_UINT64",
    "random_seed": "TYPE_UINT64",
    "repetition_penalty": "TYPE_FP32",
    "end_id": "TYPE_INT32",
    "pad_id": "TYPE_INT32",
    "stop_words": "TYPE_STRING",
    "bad_words": "TYPE_STRING",
    "beam_width": "TYPE_INT32",
    "num_return_sequences": "TYPE_INT32",
    "exclude_input_in_output": "TYPE_BOOL",
    "return_log_probs": "TYPE_BOOL",
    # OpenAI's top_logprobs: the k most likely tokens per answer token (needs return_log_probs).
    "top_logprobs": "TYPE_INT32",
    "return_context_logits": "TYPE_BOOL",
    "return_generation_logits": "TYPE_BOOL",
    "frequency_penalty": "TYPE_FP32",
    "presence_penalty": "TYPE_FP32",
    "min_length": "TYPE_INT32",
    "min_tokens": "TYPE_INT32",
    "ignore_eos": "TYPE_BOOL",
    "reasoning_streams": "TYPE_INT32",
    "reasoning_budget": "TYPE_INT32",
    "attention_mode": "TYPE_STRING",
    "sync": "TYPE_STRING",
    "session_id": "TYPE_STRING",
    # A chat conversation (the OpenAI front, frontend/): JSON [{"role", "content"}], rendered
    # with the model's chat template instead of text_input; raw_prompt: text_input as is.
    "messages": "TYPE_STRING",
    "raw_prompt": "TYPE_BOOL",
    # The paper's stream layout (stream-trained checkpoints; README "The paper's stream layout").
    "layout_start": "TYPE_STRING",
    "grid_rows": "TYPE_STRING",
    "skip_silence": "TYPE_BOOL",
    "ablate_channels": "TYPE_INT32",
    "silence_penalty": "TYPE_FP32",
    "think_silence_penalty": "TYPE_FP32",
    "penalty_during_user_talk": "TYPE_BOOL",
    "stop_silent_rows": "TYPE_INT32",
    "return_channel_stats": "TYPE_BOOL",
}
#: Inputs whose second dimension may hold several values (a list of stop words).
LIST_INPUTS = ("stop_words", "bad_words", "ablate_channels")
#: Inputs that only the paper's stream layout reads; a project-layout deployment refuses them.
LAYOUT_INPUTS = (
    "layout_start",
    "grid_rows",
    "skip_silence",
    "ablate_channels",
    "silence_penalty",
    "think_silence_penalty",
    "penalty_during_user_talk",
    "stop_silent_rows",
    "return_channel_stats",
)
#: Inputs of the project's layout that mean nothing on the paper's grid (refused there).
PROJECT_ONLY_INPUTS = ("reasoning_budget", "attention_mode", "sync")
#: The paper's sampling defaults (``sample_top_p``), used in its layout unless the request sets them.
PAPER_SAMPLING = {"temperature": 0.8, "top_k": 20, "top_p": 0.95}

#: Short "thinking" openers forced at the start of each reasoning stream, so that the
#: streams of one request explore different directions even when sampled alike.
REASONING_PREAMBLES = (
    "Let me think step by step.",
    "Let me look at this from a different angle.",
    "Let me check what could go wrong.",
    "Let me consider an example first.",
    "Let me list the key facts.",
    "Let me question the obvious answer.",
    "Let me break the problem into parts.",
    "Let me recall what I know about this.",
)


class RequestError(ValueError):
    """A client input breaks a rule; the message names the input and the rule."""


@dataclass
class Limits:
    """Server-side bounds, from the preprocessing model's parameters."""

    max_tokens_limit: int = 1024
    max_reasoning_streams: int = 4
    max_reasoning_budget: int = 1024
    max_context: int = 2048
    #: Channels of the deployment's paper layout; 0 = the project's layout.
    num_channels: int = 0


@dataclass
class RequestConfig:
    """The validated request, as every model after ``preprocessing`` sees it."""

    text: str
    max_tokens: int
    stream: bool = False
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    end_id: int | None = None
    pad_id: int | None = None
    stop: list[str] = field(default_factory=list)
    exclude_input_in_output: bool = True
    reasoning_streams: int = 0
    reasoning_budget: int = 256
    attention_mode: str = "isolated"
    sync: str = "none"
    session_id: str = ""
    #: ``time.time()`` when preprocessing saw the request: every process on the host
    #: shares the wall clock, so decode can report ms since arrival.
    arrival: float = 0.0
    prompt_tokens: int = 0
    #: The conversation to render with the chat template (``messages`` input); empty: ``text``.
    messages: list[dict[str, str]] = field(default_factory=list)
    #: ``text`` goes to the model as is, without the chat template (``/v1/completions``).
    raw_prompt: bool = False
    #: The answer's sampling surface of OpenAI and TensorRT-LLM (``backend.engine.sampling``).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_tokens: int = 0
    #: Generate to ``max_tokens`` whatever the model says (fixed-length benchmarks: aiperf, vLLM).
    ignore_eos: bool = False
    bad_words: list[str] = field(default_factory=list)
    #: ``bad_words`` as token sequences (preprocessing tokenizes them; ``bad_word_ids``).
    bad_words_ids: list[list[int]] = field(default_factory=list)
    return_log_probs: bool = False
    #: Per answer token, its ``top_logprobs`` most likely alternatives (``top_logprobs_*`` outputs).
    top_logprobs: int = 0
    #: Answers of the request (TensorRT-LLM ``num_return_sequences``, OpenAI ``n``): k output
    #: streams of ONE decode session sharing its prompt KV (``backend.engine.session.answer_specs``).
    num_return_sequences: int = 1
    # ---- the paper's stream layout (``layout == "paper"``); defaults are the paper's
    #: ``project`` or ``paper``: decided by the deployment, never by the client.
    layout: str = "project"
    num_channels: int = 0
    silence_id: int = -1
    layout_start: str = "seed"
    #: The caller's start grid (``grid_rows``), raw JSON; preprocessing turns it into tokens.
    grid_rows: str = ""
    #: User tokens queued for channel 0 after the start rows (the paper's tokenization).
    user_ids: list[int] = field(default_factory=list)
    skip_silence: bool = False
    ablate_channels: list[int] = field(default_factory=list)
    silence_penalty: float = 10.0
    think_silence_penalty: float = 0.0
    penalty_during_user_talk: bool = False
    #: End after this many consecutive all-silent rows; 0 = never on silence.
    stop_silent_rows: int = 1
    return_channel_stats: bool = False

    # ------------------------------------------------------------------ sampling
    def output_sampling(self) -> SamplingParams:
        """Sampling of the user-facing answer (and of a revision)."""
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            repetition_penalty=self.repetition_penalty,
            max_tokens=self.max_tokens,
            stop=list(self.stop),
            stop_token_ids=[self.end_id] if self.end_id is not None else [],
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            bad_words_ids=[list(w) for w in self.bad_words_ids],
            logprobs=self.return_log_probs,
            top_logprobs=self.top_logprobs,
        )

    def reasoning_sampling(self, index: int) -> SamplingParams:
        """Sampling of reasoning stream ``index``: seeded per stream so streams differ yet replay.

        A greedy request still gets sampled reasoning (temperature 0.7): several greedy
        streams from one prompt would differ only by their preamble.
        """
        base = self.seed if self.seed is not None else _stable_seed(self.session_id)
        return SamplingParams(
            temperature=self.temperature if self.temperature > 0 else 0.7,
            top_k=self.top_k,
            top_p=self.top_p if self.top_p < 1.0 else 0.95,
            seed=(base + 1 + index) & 0xFFFF_FFFF_FFFF_FFFF,
            repetition_penalty=self.repetition_penalty,
            max_tokens=self.reasoning_budget,
        )

    def grid_sampling(self, channel: int) -> SamplingParams:
        """Sampling of channel ``channel`` of the paper's grid: the request's parameters, a seed
        per channel (so a seeded request replays channel by channel), rows bounded by
        ``max_tokens``, and no end-of-sequence stop (this layout never emits EOS; it ends on
        silence). Stop words, ``end_id`` and ``return_log_probs`` / ``top_logprobs`` apply to
        Output only: it is the answer the client reads; the thinking channels' log probabilities
        would cost a ``log_softmax`` per row each and nobody asked for them."""
        base = self.seed if self.seed is not None else _stable_seed(self.session_id)
        output = channel == 1
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=(base + channel) & 0xFFFF_FFFF_FFFF_FFFF,
            repetition_penalty=self.repetition_penalty,
            max_tokens=self.max_tokens,
            stop=list(self.stop) if output else [],
            stop_token_ids=[self.end_id] if output and self.end_id is not None else [],
            ignore_eos=True,
            logprobs=self.return_log_probs and output,
            top_logprobs=self.top_logprobs if output else 0,
        )

    def grid_rules(self) -> GridRules:
        """The session rules of the paper's grid for this request."""
        return GridRules(
            silence_id=self.silence_id,
            num_channels=self.num_channels,
            silence_penalty=self.silence_penalty,
            think_silence_penalty=self.think_silence_penalty,
            penalty_during_user_talk=self.penalty_during_user_talk,
            stop_silent_rows=self.stop_silent_rows or None,
            max_rows=self.max_tokens,
            skip_silence=self.skip_silence,
            ablate=frozenset(self.ablate_channels),
        )

    # ------------------------------------------------------------------ (de)serialisation
    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> RequestConfig:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return cls(**json.loads(text))

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_inputs(
        cls, get: Callable[[str], np.ndarray | None], limits: Limits | None = None
    ) -> RequestConfig:
        """Builds and validates a request from ``get(name) -> array | None`` (absent = None).

        Raises :class:`RequestError`. Batch size must be 1: the decode loop streams one
        session per request, and Triton's responses of a decoupled request cannot be split
        back into per-row streams, so a batch of several rows is refused with a clear error.
        """
        limits = limits or Limits()
        reader = _Reader(get)
        paper = limits.num_channels > 0
        text = reader.string("text_input", required=True)
        if not text.strip():
            raise RequestError("text_input must not be blank")
        max_tokens = reader.int("max_tokens", None, required=True)
        if not 1 <= max_tokens <= limits.max_tokens_limit:
            raise RequestError(f"max_tokens must be in 1..{limits.max_tokens_limit}, got {max_tokens}")
        cfg = cls(text=text, max_tokens=max_tokens, arrival=time.time())
        defaults = PAPER_SAMPLING if paper else {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
        cfg.stream = reader.bool("stream", False)
        cfg.temperature = reader.float("temperature", defaults["temperature"])
        if not math.isfinite(cfg.temperature) or cfg.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {cfg.temperature}")
        cfg.top_p = reader.float("top_p", defaults["top_p"])
        if not 0.0 < cfg.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {cfg.top_p}")
        cfg.top_k = reader.int("top_k", defaults["top_k"])
        if cfg.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {cfg.top_k}")
        seed = reader.int("seed", None)
        random_seed = reader.int("random_seed", None)
        cfg.seed = seed if seed is not None else random_seed
        if cfg.seed is not None and cfg.seed < 0:
            raise RequestError(f"seed must be >= 0, got {cfg.seed}")
        cfg.repetition_penalty = reader.float("repetition_penalty", 1.0)
        if not (math.isfinite(cfg.repetition_penalty) and cfg.repetition_penalty > 0):
            raise RequestError(f"repetition_penalty must be > 0, got {cfg.repetition_penalty}")
        cfg.end_id = reader.int("end_id", None)
        cfg.pad_id = reader.int("pad_id", None)
        cfg.stop = [s for s in reader.strings("stop_words") if s]
        cfg.bad_words = [s for s in reader.strings("bad_words") if s]
        beams = reader.int("beam_width", 1)
        if beams != 1:
            raise RequestError(f"beam_width must be 1 (beam search is not supported), got {beams}")
        cfg.num_return_sequences = reader.int("num_return_sequences", 1)
        cfg.return_log_probs = reader.bool("return_log_probs", False)
        cfg.top_logprobs = reader.int("top_logprobs", 0)
        if not 0 <= cfg.top_logprobs <= MAX_TOP_LOGPROBS:
            raise RequestError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {cfg.top_logprobs}")
        if cfg.top_logprobs and not cfg.return_log_probs:
            raise RequestError(
                "top_logprobs needs return_log_probs true (OpenAI: logprobs true), "
                f"got top_logprobs {cfg.top_logprobs} without it"
            )
        for name in ("return_context_logits", "return_generation_logits"):
            if reader.bool(name, False):
                raise RequestError(f"{name} is not supported by this server; send false or leave it out")
        for name in ("frequency_penalty", "presence_penalty"):
            value = reader.float(name, 0.0)
            if not (math.isfinite(value) and -2.0 <= value <= 2.0):
                raise RequestError(f"{name} must be in [-2, 2], got {value}")
            setattr(cfg, name, value)
        min_length, min_tokens = reader.int("min_length", None), reader.int("min_tokens", None)
        if min_length is not None and min_tokens is not None and min_length != min_tokens:
            raise RequestError(f"min_tokens ({min_tokens}) and min_length ({min_length}) disagree; send one")
        cfg.min_tokens = min_tokens if min_tokens is not None else (min_length or 0)
        if not 0 <= cfg.min_tokens <= cfg.max_tokens:
            raise RequestError(
                f"min_tokens must be in 0..max_tokens ({cfg.max_tokens}), got {cfg.min_tokens}"
            )
        cfg.ignore_eos = reader.bool("ignore_eos", False)
        cfg.exclude_input_in_output = reader.bool("exclude_input_in_output", True)
        cfg.reasoning_streams = reader.int("reasoning_streams", 0)
        max_streams = limits.num_channels - 2 if paper else limits.max_reasoning_streams
        if not 0 <= cfg.reasoning_streams <= max_streams:
            what = " (the thinking channels of this deployment's stream layout)" if paper else ""
            raise RequestError(
                f"reasoning_streams must be in 0..{max_streams}{what}, got {cfg.reasoning_streams}"
            )
        cfg.reasoning_budget = reader.int("reasoning_budget", 256)
        if not 1 <= cfg.reasoning_budget <= limits.max_reasoning_budget:
            raise RequestError(
                f"reasoning_budget must be in 1..{limits.max_reasoning_budget}, got {cfg.reasoning_budget}"
            )
        cfg.attention_mode = reader.string("attention_mode", default="isolated") or "isolated"
        if cfg.attention_mode not in ATTENTION_MODES:
            raise RequestError(f"attention_mode must be one of {ATTENTION_MODES}, got {cfg.attention_mode!r}")
        cfg.sync = reader.string("sync", default="none") or "none"
        if cfg.sync not in SYNC_MODES:
            raise RequestError(f"sync must be one of {SYNC_MODES}, got {cfg.sync!r}")
        if cfg.sync == "revise" and cfg.reasoning_streams == 0:
            raise RequestError("sync 'revise' needs reasoning_streams >= 1")
        cfg._check_sequences(paper)
        cfg.session_id = reader.string("session_id", default="") or mint_session_id()
        if not _valid_session_id(cfg.session_id):
            raise RequestError(
                "session_id must be 1..128 characters of letters, digits, '-', '_' or '.', "
                f"got {cfg.session_id[:40]!r}"
            )
        cfg.messages = parse_messages(reader.string("messages", default=""))
        cfg.raw_prompt = reader.bool("raw_prompt", False)
        if cfg.raw_prompt and cfg.messages:
            raise RequestError("raw_prompt cannot be combined with messages (messages use the chat template)")
        if paper:
            cfg._read_layout(reader, limits.num_channels)
        else:
            given = [n for n in LAYOUT_INPUTS if reader.present(n)]
            if given:
                raise RequestError(
                    f"{given[0]} applies only to the paper's stream layout; this deployment serves the "
                    "project's layout (serve a stream-trained checkpoint, or set stream_layout=paper)"
                )
        return cfg

    def _check_sequences(self, paper: bool) -> None:
        """``num_return_sequences``: each answer is an output stream of the one decode session,
        so k is bounded by the streams a session can carry (with, in ``cross`` mode, the
        reasoning channels injected into it)."""
        k = self.num_return_sequences
        if paper and k != 1:
            raise RequestError(
                f"num_return_sequences must be 1 with the paper's stream layout (its grid has one "
                f"Output channel), got {k}"
            )
        if self.sync == "revise" and k != 1:
            raise RequestError(
                f"num_return_sequences must be 1 with sync 'revise' (the revision is the one answer "
                f"written after reasoning), got {k}"
            )
        injected = self.reasoning_streams if self.attention_mode == "cross" else 0
        most = MAX_CHANNELS - FIRST_STREAM_CHANNEL - injected
        if not 1 <= k <= most:
            raise RequestError(
                f"num_return_sequences must be in 1..{most} (each answer is an output stream of the one "
                f"decode session, at most {MAX_CHANNELS - FIRST_STREAM_CHANNEL} streams"
                + (f" including {injected} injected reasoning streams" if injected else "")
                + f"), got {k}"
            )

    def _read_layout(self, reader: _Reader, num_channels: int) -> None:
        """The paper-layout options; the project's options that mean nothing there are refused."""
        for name in PROJECT_ONLY_INPUTS:
            if reader.present(name):
                raise RequestError(
                    f"{name} does not apply to the paper's stream layout (one grid: every channel sees "
                    "every channel's earlier rows, and max_tokens bounds the rows); leave it out"
                )
        self.sync, self.attention_mode, self.reasoning_budget = "none", "cross", 0
        self.layout, self.num_channels = "paper", num_channels
        self.layout_start = reader.string("layout_start", default="seed") or "seed"
        if self.layout_start not in START_MODES:
            raise RequestError(f"layout_start must be one of {START_MODES}, got {self.layout_start!r}")
        self.grid_rows = reader.string("grid_rows", default="")
        if (self.layout_start == "grid") != bool(self.grid_rows.strip()):
            raise RequestError("grid_rows is needed exactly when layout_start is 'grid'")
        self.skip_silence = reader.bool("skip_silence", False)
        self.ablate_channels = sorted(set(reader.ints("ablate_channels")))
        bad = [c for c in self.ablate_channels if not 1 <= c < num_channels]
        if bad:
            raise RequestError(
                f"ablate_channels must name channels in 1..{num_channels - 1} (0 is User, never sampled), got {bad[0]}"
            )
        for name in ("silence_penalty", "think_silence_penalty"):
            value = reader.float(name, getattr(self, name))
            if not math.isfinite(value) or value < 0:
                raise RequestError(f"{name} must be >= 0, got {value}")
            setattr(self, name, value)
        self.penalty_during_user_talk = reader.bool("penalty_during_user_talk", False)
        self.stop_silent_rows = reader.int("stop_silent_rows", 1)
        if self.stop_silent_rows < 0:
            raise RequestError(
                f"stop_silent_rows must be >= 0 (0 = never stop on silence), got {self.stop_silent_rows}"
            )
        self.return_channel_stats = reader.bool("return_channel_stats", False)

    def check_grid_context(self, prefix_tokens: int, max_context: int) -> None:
        """The paper's grid needs the start rows plus C positions per generated row."""
        self.prompt_tokens = prefix_tokens
        need = prefix_tokens + self.num_channels * self.max_tokens
        if need > max_context:
            raise RequestError(
                f"max_tokens: {self.max_tokens} rows of {self.num_channels} channels after {prefix_tokens} start "
                f"tokens need {need} positions, the context limit is {max_context}; ask for at most "
                f"{max(0, (max_context - prefix_tokens) // self.num_channels)} rows"
            )

    def check_context(self, prompt_tokens: int, max_context: int, preamble_tokens: int = 16) -> None:
        """Refuses a request whose rows cannot fit the engine's context (before any work).

        The shared KV of a session holds the prompt, the answer and, in ``cross`` mode, the
        reasoning tokens injected into it; reasoning runs in its own session (prompt +
        streams x (preamble + budget)).
        """
        self.prompt_tokens = prompt_tokens
        if prompt_tokens >= max_context:
            raise RequestError(
                f"text_input is too long: {prompt_tokens} tokens (with the chat template), "
                f"the context limit is {max_context} tokens including max_tokens"
            )
        answer = prompt_tokens + self.num_return_sequences * self.max_tokens
        if self.attention_mode == "cross":
            answer += self.reasoning_streams * self.reasoning_budget
        if answer > max_context:
            raise RequestError(
                f"max_tokens: the prompt ({prompt_tokens} tokens) plus max_tokens ({self.max_tokens})"
                + (
                    f" for each of num_return_sequences ({self.num_return_sequences}) answers"
                    if self.num_return_sequences > 1
                    else ""
                )
                + (
                    " plus injected reasoning"
                    if self.attention_mode == "cross" and self.reasoning_streams
                    else ""
                )
                + f" needs {answer} positions, the context limit is {max_context}"
            )
        think = prompt_tokens + self.reasoning_streams * (preamble_tokens + self.reasoning_budget)
        if self.reasoning_streams and think > max_context:
            raise RequestError(
                f"reasoning_budget: {self.reasoning_streams} streams x {self.reasoning_budget} tokens after a "
                f"{prompt_tokens}-token prompt need {think} positions, the context limit is {max_context}"
            )


#: Roles a chat template knows; ``developer`` is OpenAI's newer name for ``system``.
MESSAGE_ROLES = ("system", "developer", "user", "assistant")


def parse_messages(raw: str) -> list[dict[str, str]]:
    """The ``messages`` input (JSON) -> ``[{"role", "content"}]``, checked; ``""`` -> ``[]``.

    Why here and strict: the chat template renders whatever it is given, so a malformed
    conversation would silently become a wrong prompt; the error names the message and rule.
    """
    if not raw.strip():
        return []
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RequestError(f"messages must be JSON (a list of {{role, content}} objects): {e.msg}") from None
    if not isinstance(value, list) or not value:
        raise RequestError("messages must be a non-empty JSON list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise RequestError(f"messages[{i}] must be an object with a string 'content'")
        role = m.get("role")
        if role not in MESSAGE_ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}")
        out.append({"role": "system" if role == "developer" else role, "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise RequestError("messages must contain a user message with non-blank content")
    return out


def _valid_session_id(sid: str) -> bool:
    return 0 < len(sid) <= 128 and all(c.isalnum() or c in "-_." for c in sid) and sid not in (".", "..")


def _stable_seed(text: str) -> int:
    return int(uuid.uuid5(uuid.NAMESPACE_OID, text or "multistream").int & 0xFFFF_FFFF)


class _Reader:
    """Reads one row of ``[batch, n]`` inputs, checking batch size and types."""

    def __init__(self, get: Callable[[str], np.ndarray | None]):
        self._get = get

    def present(self, name: str) -> bool:
        """The client sent ``name`` (an absent optional input is None)."""
        return self._get(name) is not None

    def ints(self, name: str) -> list[int]:
        """All integers of a list input (``[1, n]``), each checked."""
        arr = self._array(name, False)
        if arr is None:
            return []
        out = []
        for v in arr.tolist():
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise RequestError(f"{name} must hold integers, got {v!r}") from None
            if not math.isfinite(f) or f != int(f):
                raise RequestError(f"{name} must hold integers, got {v!r}")
            out.append(int(f))
        return out

    def _array(self, name: str, required: bool) -> np.ndarray | None:
        arr = self._get(name)
        if arr is None:
            if required:
                raise RequestError(f"{name} is required")
            return None
        arr = np.asarray(arr)
        if arr.ndim >= 2 and arr.shape[0] != 1:
            raise RequestError(
                f"{name}: batch size {arr.shape[0]} is not supported; send one request per prompt "
                "(each request streams its own session)"
            )
        return arr.reshape(-1)

    def _scalar(self, name: str, required: bool = False) -> Any:
        arr = self._array(name, required)
        if arr is None:
            return None
        if arr.size != 1:
            raise RequestError(f"{name} must hold one value per request, got {arr.size}")
        return arr[0]

    def string(self, name: str, required: bool = False, default: str | None = None) -> str:
        value = self._scalar(name, required)
        if value is None:
            return default if default is not None else ""
        return _to_text(name, value)

    def strings(self, name: str) -> list[str]:
        arr = self._array(name, False)
        if arr is None:
            return []
        out = []
        for v in arr.tolist():
            # TensorRT-LLM clients may send one comma-free string per word or a list.
            out.append(_to_text(name, v))
        return out

    def int(self, name: str, default: int | None, required: bool = False) -> int | None:
        value = self._scalar(name, required)
        if value is None:
            return default
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise RequestError(f"{name} must be an integer, got {value!r}")
        return int(value)

    def float(self, name: str, default: float) -> float:
        value = self._scalar(name)
        if value is None:
            return default
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RequestError(f"{name} must be a number, got {value!r}") from None

    def bool(self, name: str, default: bool) -> bool:
        value = self._scalar(name)
        if value is None:
            return default
        if isinstance(value, bytes | str):
            text = _to_text(name, value).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no", ""):
                return False
            raise RequestError(f"{name} must be a boolean, got {text!r}")
        return bool(value)


def _to_text(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"{name} must be UTF-8 text") from None
    return str(value)
