"""The per-stream pump of a serving loop: grouping, timing, token metrics, cancel polling.

Why one place: decode and reasoning both turn engine events into responses the same way
(hold tokens until ``response_group_tokens`` are ready, stamp each response with ms since
arrival and since the stream's last response, record TTFT / inter-token time / tokens),
and before this module each computed TTFT and token rate on its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

#: How often a loop wakes without events to poll cancellation and the mailbox (s).
POLL_S = 0.02
#: Cancel / mailbox checks of a serving loop: once per engine step, within these bounds (s).
MIN_CHECK_S = 0.02
MAX_CHECK_S = 0.25


class _Metrics(Protocol):
    def ttft(self, kind: str, ms: float) -> None: ...
    def inter_token(self, kind: str, ms: float) -> None: ...
    def tokens(self, kind: str, n: int) -> None: ...


class _Stepper(Protocol):
    @property
    def step_time_s(self) -> float: ...


@dataclass
class Group:
    """One response's worth of a stream: what is new since its last response."""

    stream: str
    text: str
    ids: list[int]
    finish_reason: str | None
    timing: tuple[float, float]
    #: The group's token log probabilities and the stream's cumulative one so far
    #: (TensorRT-LLM's ``output_log_probs`` / ``cum_log_probs``); empty unless asked for.
    logprobs: tuple[list[float], float] = ([], 0.0)
    #: The group's tokens' ``top_logprobs`` alternatives ``(ids, log probabilities)``.
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)


@dataclass
class _Stream:
    text: str = ""
    ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    pending_logprobs: list[float] = field(default_factory=list)
    top: list[tuple[list[int], list[float]]] = field(default_factory=list)
    pending_top: list[tuple[list[int], list[float]]] = field(default_factory=list)
    first_t: float | None = None
    last_t: float | None = None
    finish_reason: str | None = None


class StreamPump:
    """Accumulates the deltas of a request's streams and says when a response is due.

    ``kind`` labels the metrics ("output" / "reasoning"); ``arrival`` is the request's
    wall-clock arrival (``RequestConfig.arrival``), the origin of TTFT and of
    ``timing_ms``. Metrics are recorded for every token, also when no response goes out.
    """

    def __init__(self, kind: str, metrics: _Metrics | None, arrival: float, group_tokens: int = 1):
        self.kind = kind
        self.metrics = metrics
        self.arrival = arrival or time.time()
        self.group_tokens = max(1, group_tokens)
        self._streams: dict[str, _Stream] = {}
        self._last_sent: dict[str, float] = {}

    def open(self, stream: str) -> None:
        self._streams.setdefault(stream, _Stream())

    def push(
        self,
        stream: str,
        text: str,
        ids: list[int],
        finish_reason: str | None = None,
        logprobs: list[float] | None = None,
        top: list[tuple[list[int], list[float]]] | None = None,
        hold: bool = False,
    ) -> Group | None:
        """Adds a delta; returns the group to send when it is due (full, or the stream ended).

        ``hold``: more deltas of this stream are already waiting (the loop fell behind the
        engine), so nothing is due until :meth:`due` asks; an end is due at once."""
        st = self._streams.setdefault(stream, _Stream())
        if ids:
            now = time.time()
            if self.metrics is not None:
                if st.first_t is None:
                    self.metrics.ttft(self.kind, (now - self.arrival) * 1000.0)
                elif st.last_t is not None:
                    self.metrics.inter_token(self.kind, (now - st.last_t) * 1000.0 / len(ids))
                self.metrics.tokens(self.kind, len(ids))
            if st.first_t is None:
                st.first_t = now
            st.last_t = now
        st.text += text
        st.ids += ids
        st.pending_text += text
        st.pending_ids += ids
        if logprobs:
            st.logprobs += logprobs
            st.pending_logprobs += logprobs
        if top:
            st.top += top
            st.pending_top += top
        if finish_reason:
            st.finish_reason = finish_reason
        if not finish_reason and (hold or len(st.pending_ids) < self.group_tokens):
            return None
        return self._take(stream, st)

    def due(self, stream: str) -> Group | None:
        """The group of what ``hold`` kept back, when it is due (as :meth:`push` decides)."""
        st = self._streams.get(stream)
        if st is None or st.finish_reason is not None or len(st.pending_ids) < self.group_tokens:
            return None
        return self._take(stream, st)

    def _take(self, stream: str, st: _Stream) -> Group:
        group = Group(
            stream,
            st.pending_text,
            st.pending_ids,
            st.finish_reason,
            self.stamp(stream),
            (st.pending_logprobs, sum(st.logprobs)),
            st.pending_top,
        )
        st.pending_text, st.pending_ids, st.pending_logprobs, st.pending_top = "", [], [], []
        return group

    def stamp(self, stream: str) -> tuple[float, float]:
        """``(ms since arrival, ms since this stream's last response)``, and marks a response."""
        now = time.time()
        prev = self._last_sent.get(stream, self.arrival)
        self._last_sent[stream] = now
        return ((now - self.arrival) * 1000.0, (now - prev) * 1000.0)

    def finished(self, stream: str) -> bool:
        st = self._streams.get(stream)
        return st is not None and st.finish_reason is not None

    def live(self) -> list[str]:
        return [name for name, st in self._streams.items() if st.finish_reason is None]

    def text(self, stream: str) -> str:
        st = self._streams.get(stream)
        return st.text if st else ""

    def ids(self, stream: str) -> list[int]:
        st = self._streams.get(stream)
        return list(st.ids) if st else []

    def logprobs(self, stream: str) -> tuple[list[float], float]:
        """Every token log probability of the stream so far, and their sum."""
        st = self._streams.get(stream)
        lps = list(st.logprobs) if st else []
        return lps, sum(lps)

    def top(self, stream: str) -> list[tuple[list[int], list[float]]]:
        """Every token's ``top_logprobs`` alternatives of the stream so far."""
        st = self._streams.get(stream)
        return list(st.top) if st else []

    def finish_reason(self, stream: str) -> str | None:
        st = self._streams.get(stream)
        return st.finish_reason if st else None


class CancelPoll:
    """Says when a loop should check its cancel flags again: once per engine step, bounded.

    Why per step: a loop that checks once per step stops a session "within one step";
    checking more often only adds IPC (each ``is_cancelled`` is a round trip to the server:
    16 sessions polling every 20 ms made ~800 a second). Bounded so a slow step never
    delays a cancel by more than ``MAX_CHECK_S``.
    """

    def __init__(self, engine: _Stepper):
        self._engine = engine
        self._next = 0.0

    def interval(self) -> float:
        return min(max(MIN_CHECK_S, self._engine.step_time_s), MAX_CHECK_S)

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if now < self._next:
            return False
        self._next = now + self.interval()
        return True
