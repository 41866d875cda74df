"""How ``decode`` reads ``reasoning`` over BLS without crashing its stub (Triton 2.51).

Two bugs of the python backend r24.10, both C++ threads touching Python objects without
the GIL, each found in a core dump of a crashed decode stub (SIGSEGV in ``pymalloc_alloc``
under load), are worked around here:

1. Unpacking: ordinary output tensors of a decoupled BLS response become numpy arrays on
   the wrong thread. Hence the BF16 packet below.
2. Cleanup: once the final response is read, the stub's ``ServiceStubToParentRequests``
   thread erases the response iterator from its map (``Stub::SendCleanupId``). If Python
   has already dropped the iterator, that erase is the last reference, and the iterator,
   its responses and their tensors are freed there, off the GIL (caught by a checking
   allocator hook: ``PbTensor::~PbTensor`` <- ``ResponseIterator::~ResponseIterator`` <-
   ``SendCleanupId``). Hence :class:`DeferredRelease`: decode keeps each finished iterator
   for a while, so that Python's reference is the last one and is dropped with the GIL.

Bug 1 is what failed CI's load test on 2026-11-24 (reproduced in the first 30-second run
of 6 users) and, before that, the unexplained soak crash: ``ParentToStubMQMonitor`` builds
the numpy array of every CPU output tensor (``PbTensor`` constructor;
``deserialize_bytes_tensor`` for strings) without the GIL, while the decode stub's other
Python threads (sessions, the engine, metrics) allocate.

The packet. The one CPU dtype for which that constructor builds no Python object is BF16 ("no numpy
representation"), and a response without tensors builds none at all. So the BLS call asks
for the single output ``delta_packet``: the delta as UTF-8 JSON, space-padded to an even
length and viewed as BF16. Decode reads it back through DLPack on its own thread, holding
the GIL. (Response parameters would have been the natural carrier, but a BLS response in
r24.10 has no ``parameters()``.) A client calling ``reasoning`` directly asks for the
tensors of CONTRACTS §4 and still gets them.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: The output decode requests from ``reasoning`` (config.pbtxt: TYPE_BF16, dims [-1]).
PACKET = "delta_packet"


@dataclass(frozen=True)
class ReasoningDelta:
    """One reasoning response: a stream's new text and ids, and its finish reason if it ended."""

    stream: str
    text: str
    ids: list[int]
    finish_reason: str

    def to_packet(self) -> torch.Tensor:
        """``[1, n]`` BF16 tensor holding the JSON bytes (the leading 1 is the batch dim)."""
        raw = json.dumps(
            {"s": self.stream, "t": self.text, "i": list(self.ids), "f": self.finish_reason},
            ensure_ascii=False,
        ).encode("utf-8")
        if len(raw) % 2:
            raw += b" "  # JSON ignores trailing whitespace
        data = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy())
        return data.view(torch.bfloat16).reshape(1, -1)

    @classmethod
    def from_packet(cls, packet: torch.Tensor) -> ReasoningDelta:
        """Inverse of :meth:`to_packet`."""
        raw = packet.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        d = json.loads(raw.decode("utf-8"))
        return cls(stream=str(d["s"]), text=str(d["t"]), ids=[int(i) for i in d["i"]], finish_reason=str(d["f"]))


def wants_packet(request: Any) -> bool:
    """Whether this ``reasoning`` request is decode's BLS call: it asks for the packet alone.

    Exactly alone: a client that names no output is given every output of the config by
    Triton, the packet included, and must get the tensors of CONTRACTS §4.
    """
    try:
        return set(request.requested_output_names()) == {PACKET}
    except AttributeError:  # pragma: no cover - a request object without the method
        return False


class DeferredRelease:
    """Holds objects for ``delay_s`` seconds, then drops them on a thread that has the GIL.

    Why: see the module docstring (2.). The stub's cleanup thread drops its reference to a
    finished BLS response iterator within milliseconds of the final response; holding ours
    for ``delay_s`` (default 30 s, far beyond that) makes ours the last, released here by
    whichever Python thread calls :meth:`keep` or :meth:`sweep` next. Memory is bounded
    by what finishes in ``delay_s``: an iterator holds its own small packets.
    """

    def __init__(self, delay_s: float = 30.0):
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._held: collections.deque[tuple[float, Any]] = collections.deque()

    def keep(self, obj: Any) -> None:
        with self._lock:
            self._held.append((time.monotonic() + self.delay_s, obj))
        self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Drops what is due; returns how many objects are still held."""
        now = time.monotonic() if now is None else now
        due = []
        with self._lock:
            while self._held and self._held[0][0] <= now:
                due.append(self._held.popleft())
            left = len(self._held)
        due.clear()  # the references go here, in a Python thread, outside the lock
        return left

    def clear(self) -> None:
        """Drops everything (model finalize: the stub's threads are done by then)."""
        with self._lock:
            held, self._held = self._held, collections.deque()
        held.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
