"""Typed events yielded by ``generate`` and the bookkeeping that builds ``Done``.

Both transports (gRPC stream, HTTP server-sent events) reduce each server
response to a plain ``dict`` of fields first; :class:`StreamTracker` then turns
those into :class:`StreamDelta` events and the final :class:`Done` summary, so
timing and completeness rules are identical whatever the protocol.
"""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from .errors import IncompleteStreamError, MultiStreamError

StreamKind = Literal["output", "reasoning", "input"]
OUTPUT_STREAM = "output"
# Echo of the User channel (the tokens of pushed input, on the row that read them): the
# server sends it without a finish_reason, since the model never generates on that channel.
ECHO_STREAMS = frozenset({"user"})


def kind_of(stream: str) -> StreamKind:
    """``reasoning/*`` streams are background thinking; the ``user`` echo is ``"input"``
    (pushed input as the model read it, not generated text); anything else (``output``,
    a ``revision`` of the answer) is user-facing text carried in ``text_output``."""
    if stream in ECHO_STREAMS:
        return "input"
    return "reasoning" if stream.startswith("reasoning") else "output"


#: How the server spells a token whose bytes are not text on their own (OpenAI's legacy form,
#: ``bytes:\xf0\x9f``); ``backend/serving/top_logprobs.py`` writes it, tests keep the two equal.
BYTES_PREFIX = "bytes:"
_BYTE_ESCAPES = re.compile(r"(?:\\x[0-9a-f]{2})+")


@dataclass(frozen=True)
class TopLogprob:
    """One alternative of a token (``top_logprobs``): its id, text, exact bytes, log probability.

    ``token`` is the text as the server sent it (``bytes:\\xNN...`` for a token that ends
    inside a multi-byte character, as OpenAI shows it); ``bytes`` are always the exact bytes.
    """

    id: int
    token: str
    bytes: bytes
    logprob: float


def token_bytes_of(text: str) -> bytes:
    """The exact bytes of a token as ``top_logprobs_text`` spells it."""
    rest = text[len(BYTES_PREFIX) :]
    if text.startswith(BYTES_PREFIX) and _BYTE_ESCAPES.fullmatch(rest):
        return bytes(int(rest[i + 2 : i + 4], 16) for i in range(0, len(rest), 4))
    return text.encode("utf-8")


def top_logprobs_of(fields: dict, tokens: int) -> list[list[TopLogprob]]:
    """The ``top_logprobs_*`` outputs (flat, ``tokens`` x k) -> per token its alternatives."""
    ids = [int(x) for x in fields.get("top_logprobs_ids") or []]
    if not ids or not tokens:
        return []
    values = [float(x) for x in fields.get("top_logprobs_values") or []]
    texts = list(fields.get("top_logprobs_text") or [])
    if not len(ids) == len(values) == len(texts) or len(ids) % tokens:
        raise MultiStreamError(
            f"server sent {len(ids)} top_logprobs ids, {len(values)} values and {len(texts)} texts "
            f"for {tokens} tokens"
        )
    k = len(ids) // tokens
    alts = [TopLogprob(i, t, token_bytes_of(t), v) for i, v, t in zip(ids, values, texts, strict=True)]
    return [alts[j * k : (j + 1) * k] for j in range(tokens)]


@dataclass(frozen=True)
class StreamDelta:
    """One server response: a text/token delta of one stream.

    ``timing_ms`` is the server's ``[ms since request arrival, ms since this
    stream's previous delta]``; ``t_received`` is the client's
    ``time.perf_counter()`` at arrival, so client-side TTFT and inter-token
    gaps can be computed without trusting server clocks.
    """

    stream: str
    kind: StreamKind
    text: str
    token_ids: list[int]
    finish_reason: str | None
    timing_ms: list[float]
    t_received: float
    #: Each token's log probability (``return_log_probs``), else empty.
    logprobs: list[float] = field(default_factory=list)
    #: Per token, its ``top_logprobs`` most likely tokens, most likely first, else empty.
    top_logprobs: list[list[TopLogprob]] = field(default_factory=list)
    #: The sequence the delta belongs to (``num_return_sequences`` > 1: ``sequence_index``).
    sequence: int = 0


@dataclass(frozen=True)
class Done:
    """Summary emitted once, after the server's final response.

    ``tokens_per_s`` is the decode rate of each stream after its first token
    ((tokens - 1) / (last - first)); that is the number comparable across
    streams, because TTFT (reported separately) is dominated by prefill.
    """

    session_id: str | None
    output_text: str
    reasoning_texts: dict[str, str]
    ttft_s: dict[str, float]
    tokens: dict[str, int]
    tokens_per_s: dict[str, float]
    total_s: float
    finish_reasons: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)  # every stream, e.g. a "revision" of the answer
    prompt_tokens: int | None = None  # the prompt's length in tokens (server output num_input_tokens)
    #: ``num_return_sequences`` > 1: one summary per sequence, by index (this one is sequence 0's).
    sequences: list[Done] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready form (used by ``--json``)."""
        return asdict(self)


Event = StreamDelta | Done


@dataclass(frozen=True)
class StreamStats:
    """One stream's numbers so far: the live view a UI shows while the request runs.

    ``tokens_per_s`` is the decode rate after the first token, ``None`` until a second token
    arrived later than the first (one token has no rate yet); ``Done`` uses the same numbers.
    """

    tokens: int
    ttft_s: float | None
    tokens_per_s: float | None
    finish_reason: str | None


@dataclass
class _StreamState:
    parts: list[str] = field(default_factory=list)
    tokens: int = 0
    first_t: float | None = None
    last_t: float | None = None
    finish_reason: str | None = None


class StreamTracker:
    """Accumulates deltas of one request: live per-stream stats, completeness, ``Done``."""

    def __init__(self, t0: float | None = None, session_id: str | None = None) -> None:
        self.t0 = time.perf_counter() if t0 is None else t0
        self.session_id = session_id
        self.streams: dict[str, _StreamState] = {}
        self.prompt_tokens: int | None = None
        #: Sequences 1.. of a ``num_return_sequences`` request, each tracked on its own.
        self.others: dict[int, StreamTracker] = {}

    def feed(self, fields: dict, t: float | None = None) -> StreamDelta | None:
        """Turn one response's fields into a delta; ``None`` for an empty (flags-only) response."""
        t = time.perf_counter() if t is None else t
        seq = int(fields.get("sequence_index") or 0)
        if seq:
            sub = self.others.setdefault(seq, StreamTracker(self.t0, self.session_id))
            delta = sub.feed({k: v for k, v in fields.items() if k != "sequence_index"}, t)
            if self.prompt_tokens is None:
                self.prompt_tokens = sub.prompt_tokens
            return None if delta is None else dataclasses.replace(delta, sequence=seq)
        if fields.get("session_id"):
            self.session_id = fields["session_id"]
        if fields.get("num_input_tokens") is not None:
            self.prompt_tokens = fields["num_input_tokens"]
        has_payload = any(
            fields.get(k) not in (None, "", [])
            for k in ("stream_name", "text_output", "reasoning_output", "output_ids", "finish_reason")
        )
        if not has_payload:
            return None
        stream = fields.get("stream_name") or OUTPUT_STREAM
        kind = kind_of(stream)
        if kind != "reasoning":
            text = fields.get("text_output") or fields.get("reasoning_output") or ""
        else:
            text = fields.get("reasoning_output") or fields.get("text_output") or ""
        ids = [int(i) for i in fields.get("output_ids") or []]
        finish = fields.get("finish_reason") or None
        st = self.streams.setdefault(stream, _StreamState())
        if finish is None and st.finish_reason is not None:
            raise MultiStreamError(f"server sent a delta for stream {stream!r} after it finished")
        if text or ids:
            if st.first_t is None:
                st.first_t = t
            st.last_t = t
        st.parts.append(text)
        st.tokens += len(ids) if ids else (1 if text else 0)
        if finish is not None:
            st.finish_reason = finish
        logprobs = [float(x) for x in fields.get("output_log_probs") or []]
        return StreamDelta(
            stream=stream,
            kind=kind,
            text=text,
            token_ids=ids,
            finish_reason=finish,
            timing_ms=[float(x) for x in fields.get("timing_ms") or []],
            t_received=t,
            logprobs=logprobs,
            top_logprobs=top_logprobs_of(fields, len(logprobs)),
        )

    def check_complete(self) -> None:
        """Raise unless every stream seen ended with a finish_reason (the contract's last delta).

        A transport that closes cleanly but early (server crash, proxy timeout)
        would otherwise look like a short answer.
        """
        for sub in self.others.values():
            sub.check_complete()
        if not self.streams:
            raise IncompleteStreamError("server ended the request without any response")
        open_streams = [
            s for s, st in self.streams.items() if st.finish_reason is None and s not in ECHO_STREAMS
        ]
        if open_streams:
            raise IncompleteStreamError(
                f"stream(s) {', '.join(open_streams)} ended without a finish_reason (final delta missing)"
            )
        # A failed reasoning stream is background work lost, not a failed request: the server
        # ends it with finish_reason "error" (its last delta says why) and the answer goes on,
        # so it shows in Done.finish_reasons. Only a user-facing stream's error fails the call.
        errored = [
            s for s, st in self.streams.items() if st.finish_reason == "error" and kind_of(s) == "output"
        ]
        if errored:
            raise MultiStreamError(f"server reported finish_reason 'error' on stream(s) {', '.join(errored)}")

    def stats(self, stream: str) -> StreamStats:
        """Live numbers of one stream (``KeyError`` for a stream not seen yet)."""
        st = self.streams[stream]
        rate = None
        if st.first_t is not None and st.last_t is not None and st.tokens > 1 and st.last_t > st.first_t:
            rate = (st.tokens - 1) / (st.last_t - st.first_t)
        return StreamStats(
            tokens=st.tokens,
            ttft_s=None if st.first_t is None else st.first_t - self.t0,
            tokens_per_s=rate,
            finish_reason=st.finish_reason,
        )

    def live_stats(self) -> dict[str, StreamStats]:
        """Live numbers of every stream seen so far (usable mid-request, or after a cut one)."""
        return {name: self.stats(name) for name in self.streams}

    def done(self, t_end: float | None = None) -> Done:
        """Build the summary; call after the final response."""
        t_end = time.perf_counter() if t_end is None else t_end
        ttft: dict[str, float] = {}
        rate: dict[str, float] = {}
        for name, st in self.streams.items():
            stats = self.stats(name)
            if stats.ttft_s is None or name in ECHO_STREAMS:  # echo: not generated, no TTFT/rate
                continue
            ttft[name] = stats.ttft_s
            # A single token (or all in one response) has no decode rate: tokens over the
            # time to the last one stands in, so every generated stream has a number.
            if stats.tokens_per_s is not None:
                rate[name] = stats.tokens_per_s
            else:
                rate[name] = st.tokens / max((st.last_t or self.t0) - self.t0, 1e-9)
        out = self.streams.get(OUTPUT_STREAM)
        first = Done(
            session_id=self.session_id,
            output_text="".join(out.parts) if out else "",
            reasoning_texts={
                n: "".join(st.parts) for n, st in self.streams.items() if kind_of(n) == "reasoning"
            },
            ttft_s=ttft,
            tokens={n: st.tokens for n, st in self.streams.items()},
            tokens_per_s=rate,
            total_s=t_end - self.t0,
            finish_reasons={n: st.finish_reason or "" for n, st in self.streams.items()},
            texts={n: "".join(st.parts) for n, st in self.streams.items()},
            prompt_tokens=self.prompt_tokens,
        )
        if not self.others:
            return first
        rest = [self.others[i].done(t_end) for i in sorted(self.others)]
        return dataclasses.replace(first, sequences=[first, *rest])
