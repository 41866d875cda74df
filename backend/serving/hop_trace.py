"""Per-token timestamps of decode's hops, for ``bench.hops`` (off unless ``MULTISTREAM_HOP_TRACE``).

Why: a token the engine makes passes engine event -> decode's request thread -> the Python
backend's IPC (``response_sender.send``) -> tritonserver (the ensemble) -> gRPC -> client,
and the issue asks what each hop costs. With ``MULTISTREAM_HOP_TRACE=<folder>`` a decode
instance writes, per request, one JSON line per response it sent: when the engine made the
event (``t_event``, the engine thread's ``time.monotonic``), when the request thread took it
off its queue, and when ``send`` started and returned; ``bench.hops`` joins them with the
client's receive times (CLOCK_MONOTONIC is one clock for every process of a Linux machine).
Disabled, a trace is a few attribute reads per response.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

ENV = "MULTISTREAM_HOP_TRACE"


class HopTrace:
    """The hop timestamps of one request (a no-op without ``MULTISTREAM_HOP_TRACE``)."""

    def __init__(self, session_id: str) -> None:
        folder = os.environ.get(ENV)
        self.enabled = bool(folder)
        self._path = Path(folder) / f"{session_id}.jsonl" if folder else None
        self._rows: list[dict[str, Any]] = []
        self._event: tuple[float, float] | None = None

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

    def close(self) -> None:
        if self.enabled and self._path is not None:
            self._path.write_text("".join(json.dumps(r) + "\n" for r in self._rows))
