"""Per-token timestamps of decode's hops, for ``bench.hops`` (off unless ``MULTISTREAM_HOP_TRACE``).

Why: a token the engine makes passes engine event -> decode's request thread -> the Python
backend's IPC (``response_sender.send``) -> tritonserver (the ensemble) -> gRPC -> client,
and the issue asks what each hop costs. With ``MULTISTREAM_HOP_TRACE=<folder>`` a decode
instance writes, per request, one JSON line per response it sent: when the engine made the
event (``t_event``, the engine thread's ``time.monotonic``), when the request thread took it
off its queue, and when ``send`` started and returned; ``bench.hops`` joins them with the
client's receive times (CLOCK_MONOTONIC is one clock for every process of a Linux machine).
Disabled, a trace is a few attribute reads per response.

The same folder also gets the hops of a cancel (:func:`cancel_hop`, for ``bench.cancel_probe
--trace``): when the client-facing side saw the hang-up, when the mailbox had the cancel,
when decode had handed it to the engine, when the engine ended the session and when decode
unregistered it; and when the engine made the session's last answer tokens (``token``), so a
reader can count the engine steps a session still ran after its client went away (one
answer token per step) instead of comparing wall-clock times on a loaded machine.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

ENV = "MULTISTREAM_HOP_TRACE"
#: The file of :func:`cancel_hop` inside the trace folder (one JSON line per hop, any process).
CANCEL_FILE = "cancel_hops.jsonl"
#: How many of a session's latest answer-token times a cancel's trace carries.
TOKENS_KEPT = 16


def cancel_hop(session_id: str, hop: str, t: float | None = None) -> None:
    """Stamps one hop of a session's cancel (``time.monotonic``, or ``t`` when given).

    One ``O_APPEND`` write of one short line, so the processes of a server (the BLS model,
    decode, the front) can share the file without a lock. A no-op without the variable.
    """
    folder = os.environ.get(ENV)
    if not folder:
        return
    line = json.dumps({"sid": session_id, "hop": hop, "t": time.monotonic() if t is None else t}) + "\n"
    fd = os.open(Path(folder) / CANCEL_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


class HopTrace:
    """The hop timestamps of one request (a no-op without ``MULTISTREAM_HOP_TRACE``)."""

    def __init__(self, session_id: str) -> None:
        folder = os.environ.get(ENV)
        self.enabled = bool(folder)
        self._path = Path(folder) / f"{session_id}.jsonl" if folder else None
        self._rows: list[dict[str, Any]] = []
        self._event: tuple[float, float] | None = None
        self._sid = session_id
        #: Engine times of the latest answer tokens, written with a cancel's hops.
        self._tokens: deque[float] = deque(maxlen=TOKENS_KEPT)

    def dequeued(self, event_t: float) -> None:
        """The request thread took an engine event (made at ``event_t``) off its queue."""
        if self.enabled:
            self._event = (event_t, time.monotonic())

    def sent(self, stream: str, tokens: int, t0: float, t1: float) -> None:
        if self.enabled:
            ev = self._event or (None, None)
            self._rows.append(
                {
                    "stream": stream,
                    "tokens": tokens,
                    "t_event": ev[0],
                    "t_dequeue": ev[1],
                    "t_send0": t0,
                    "t_send1": t1,
                }
            )
            self._event = None

    def token(self, event_t: float) -> None:
        """The engine made an answer token at ``event_t`` (kept for a cancel's trace)."""
        if self.enabled:
            self._tokens.append(event_t)

    def cancel(self, hop: str, t: float | None = None) -> None:
        """A hop of this session's cancel; ``engine_ended`` also writes the latest tokens."""
        if self.enabled:
            if hop == "engine_ended":
                for event_t in self._tokens:
                    cancel_hop(self._sid, "token", event_t)
            cancel_hop(self._sid, hop, t)

    def close(self) -> None:
        if self.enabled and self._path is not None:
            self._path.write_text("".join(json.dumps(r) + "\n" for r in self._rows))
