"""Shared helpers for the engine tests: run a session to completion and collect its events."""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from backend.engine import Engine, StreamEvent
from backend.models.inputs import PackedBatch, PackedSplit


@dataclass
class Collected:
    events: list[StreamEvent] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    live: int = 0

    def tokens(self, stream: str) -> list[int]:
        return [t for e in self.events if e.stream == stream for t in e.token_ids]

    def text(self, stream: str) -> str:
        return "".join(e.text for e in self.events if e.stream == stream)

    def finish_reason(self, stream: str) -> str | None:
        ends = [e for e in self.events if e.stream == stream and e.finished]
        assert len(ends) == 1, f"stream {stream} ended {len(ends)} times"
        return ends[0].finish_reason


def collector(streams: int) -> tuple[Collected, callable]:
    c = Collected(live=streams)
    lock = threading.Lock()

    def on_event(ev: StreamEvent) -> None:
        with lock:
            c.events.append(ev)
            if ev.finished and ev.kind != "user":
                c.live -= 1
                if c.live == 0:
                    c.done.set()

    return c, on_event


def run(engine: Engine, prompt: list[int], streams, timeout: float = 120, **kw) -> Collected:
    c, cb = collector(len([s for s in streams if not s.external]))
    engine.submit(prompt, streams, on_event=cb, **kw)
    assert c.done.wait(timeout), "session did not finish in time"
    return c


class LogitRecorder:
    """Collects ``(stream, row) -> logits`` through the engine's debug hook."""

    def __init__(self, engine: Engine):
        self.logits: dict[tuple[str, int], torch.Tensor] = {}
        self.by_session: dict[str, dict] = defaultdict(dict)
        self.q: queue.Queue = queue.Queue()
        engine.logits_hook = self

    def __call__(self, sid: str, stream: str, row: int, logits: torch.Tensor) -> None:
        self.logits[(stream, row)] = logits.clone()


def prompt_batch(ids: list[int], decode_rows: bool) -> PackedBatch:
    """A whole prompt as one step of slot 0 (causal): every token int4 (``decode_rows``) or dense."""
    n = len(ids)
    return PackedBatch(
        tokens=torch.tensor(ids),
        positions=torch.arange(n),
        channel_embed_ids=None,
        slot=torch.zeros(n, dtype=torch.long),
        cache_index=torch.arange(n),
        slot_list=[0],
        slots_tensor=torch.tensor([0]),
        pad_index=torch.arange(n),
        max_q=n,
        key_len=n,
        mask=torch.ones(n, n, dtype=torch.bool).tril()[None, None],
        logit_index=torch.arange(n),
        split=PackedSplit.from_flags([not decode_rows] * n),
    )
