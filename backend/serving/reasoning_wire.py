"""The one seam between ``decode`` and ``reasoning``: both ends of the BLS call.

Decode's side is :class:`ReasoningCall` (starts the decoupled BLS call, yields
:class:`ReasoningDelta` s, and turns every way the call can go wrong into error deltas of
the streams still open); reasoning's side is :class:`ReasoningReply` (sends deltas in the
form the caller asked for, and fails open streams with deltas). Nothing else in the
project touches the BLS call, its packet, or its response iterator.

Every Triton 2.51 (python backend r24.10) workaround of the project, and where it lives:

1. **BF16 packet** (``backend/serving/packet.py``; here :class:`ReasoningDelta`). Ordinary output
   tensors of a decoupled BLS response become numpy arrays on a C++ thread without the
   GIL (``ParentToStubMQMonitor`` -> ``PbTensor`` constructor / ``deserialize_bytes_tensor``)
   while decode's Python threads allocate: SIGSEGV in ``pymalloc_alloc`` under load (CI's
   load test on 2026-11-24, and the earlier unexplained soak crash). BF16 is the one CPU
   dtype for which no Python object is built ("no numpy representation"), so decode asks
   for the single output ``delta_packet``: the delta as UTF-8 JSON, space-padded to an
   even length and viewed as BF16, read back through DLPack on decode's own thread. (A
   BLS response in r24.10 has no ``parameters()``, the natural carrier.) A client calling
   ``reasoning`` directly still gets the tensors of CONTRACTS §4.
2. **Deferred release** (here: :class:`DeferredRelease`, used by :class:`ReasoningCall`).
   Once the final response is read, the stub's ``ServiceStubToParentRequests`` thread
   erases the response iterator from its map (``Stub::SendCleanupId``); if Python had
   already dropped it, that erase frees the iterator and its tensors off the GIL (caught
   by a checking allocator hook, ``tests/support/gil_check.c``). Decode keeps each
   finished iterator for 30 s so that Python's reference is the last one.
3. **Error deltas, not error responses** (here: :meth:`ReasoningReply.fail`). The error
   response of a decoupled model called through BLS did not reach the caller's iterator;
   data deltas with ``finish_reason: error`` always do.
4. **Watchdog** (here: :meth:`ReasoningCall.check`). A reasoning stub that dies never
   completes its requests, so a BLS call that sends nothing for ``reasoning_timeout_s``
   is given up: its open streams end with ``finish_reason: error``.
5. **Cancel by flag** (``backend/serving/session_control.py``, ``Mailbox.cancel_reasoning``).
   The BLS caller cannot cancel a decoupled BLS request, and a gRPC stream cancel is
   dropped at the ensemble: cancels go through the session mailbox.
6. **Dead stubs** (``Mailbox``'s owner pid -> ``SessionLost``; ``launcher/serve.py``
   ``dead_stubs``). A dead stub is neither restarted nor reported unready, and its
   requests never complete: ``session_control`` tells clients, the launcher exits.
7. **Metrics from one thread** (``backend/serving/metrics.py``). Metric calls from several
   threads crash the server even under a lock: one flusher thread per process.
8. **NumPy < 2** (``launcher/triton_env.py``, ``check_numpy``): the stub misreads tensors
   with NumPy 2.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backend.serving import packet
from backend.serving.packet import PACKET, wants_packet
from backend.serving.tensors import REASONING_OUTPUTS, Responder, delta_tensors

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


@dataclass(frozen=True)
class ReasoningDelta:
    """One reasoning response: a stream's new text and ids, and its finish reason if it ended."""

    stream: str
    text: str
    ids: list[int]
    finish_reason: str

    def packet_object(self) -> dict[str, Any]:
        """What the packet carries (short keys: a packet is sent per token)."""
        return {"s": self.stream, "t": self.text, "i": list(self.ids), "f": self.finish_reason}

    @classmethod
    def from_packet(cls, tensor: Any) -> ReasoningDelta:
        """The delta a packet of :meth:`packet_object` carries; ``tensor`` is anything
        :func:`packet.decode` reads."""
        d = packet.decode(tensor)
        return cls(
            stream=str(d["s"]), text=str(d["t"]), ids=[int(i) for i in d["i"]], finish_reason=str(d["f"])
        )


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


@dataclass(frozen=True)
class CallEnded:
    """What the BLS thread posts when the call fails or its iterator ends."""

    message: str


class ReasoningCall:
    """Decode's side: one BLS call to ``reasoning``, read as a sequence of deltas.

    The call runs on a daemon thread that posts ``("reasoning", item)`` into decode's
    queue; decode passes each item back through :meth:`receive`, which returns the deltas
    to forward. Every stream the client was promised gets exactly one final delta: a late
    delta of a stream already ended here is dropped, and an error response, an iterator
    that ends early, silence past ``timeout_s`` (:meth:`check`) or a cancel that is never
    confirmed (:meth:`fail` with ``"cancelled"``) all end the open streams with deltas.
    Why not fail the request instead: reasoning is background work, and the answer must
    outlive a reasoning instance that crashed, timed out or was busy.
    """

    def __init__(
        self,
        streams: Sequence[str],
        post: Callable[[tuple[str, Any]], None],
        give_up: Callable[[], None],
        timeout_s: float,
    ):
        self.open: list[str] = list(streams)
        self.cancelled = False
        self.ended = not self.open
        self.timeout_s = timeout_s
        self._post = post
        self._give_up = give_up
        self._seen = time.monotonic()

    @property
    def live(self) -> bool:
        """Whether the call may still send something decode must wait for."""
        return not self.ended

    def start(self, request: Any, model_name: str, release: DeferredRelease) -> None:
        """Starts the BLS call with this request's inputs; returns at once."""
        inputs = [
            pb_utils.get_input_tensor_by_name(request, n)
            for n in ("input_ids", "request_json", "prompt_kv", "prompt_logits")
        ]

        def consume() -> None:
            responses = None
            try:
                bls = pb_utils.InferenceRequest(
                    model_name=model_name, requested_output_names=[PACKET], inputs=inputs
                )
                responses = bls.exec(decoupled=True)
                for resp in responses:
                    if resp.has_error():
                        self._post(("reasoning", CallEnded(resp.error().message())))
                        continue
                    packet_tensor = pb_utils.get_output_tensor_by_name(resp, PACKET)
                    if packet_tensor is not None:  # None: the flags-only final response
                        self._post(("reasoning", ReasoningDelta.from_packet(packet_tensor)))
            except Exception as e:  # noqa: BLE001 - reported to the client, never a hang
                self._post(("reasoning", CallEnded(f"reasoning failed: {e}")))
            finally:
                if responses is not None:
                    release.keep(responses)  # workaround 2: Python drops it last, with the GIL
                    responses = None
                self._post(("reasoning", CallEnded("reasoning ended without a final delta")))

        threading.Thread(target=consume, name="bls-reasoning", daemon=True).start()

    def receive(self, item: ReasoningDelta | CallEnded) -> list[ReasoningDelta]:
        """The deltas to forward for one posted item."""
        self._seen = time.monotonic()
        if isinstance(item, CallEnded):
            return self.fail("cancelled", "cancelled") if self.cancelled else self.fail(item.message)
        if item.stream not in self.open:
            return []  # already ended here (failed, timed out): a late delta is dropped
        if item.finish_reason:
            self.open.remove(item.stream)
        return [item]

    def cancel(self) -> None:
        """Asks reasoning to stop (by flag: workaround 5); its final deltas still come back."""
        if not self.cancelled and not self.ended:
            self.cancelled = True
            self._give_up()

    def check(self, now: float | None = None) -> list[ReasoningDelta]:
        """Error deltas if the call has been silent longer than ``timeout_s`` (workaround 4)."""
        now = time.monotonic() if now is None else now
        if self.ended or now - self._seen <= self.timeout_s:
            return []
        return self.fail(f"reasoning timed out: no response for {self.timeout_s:g}s")

    def fail(self, message: str, reason: str = "error") -> list[ReasoningDelta]:
        """Ends the call here: a final delta for every open stream, ``reason`` as its finish.

        An error delta carries ``[message]`` as its text so the client sees why.
        """
        if self.ended:
            return []
        self.ended = True
        if self.open:
            self._give_up()  # stops a reasoning session that may still be running
        text = f"[{message}]" if reason == "error" else ""
        deltas = [ReasoningDelta(name, text, [], reason) for name in self.open]
        self.open.clear()
        return deltas


class ReasoningReply:
    """Reasoning's side: sends deltas to its caller, in the form the caller asked for."""

    def __init__(self, request: Any, out: Responder):
        self.out = out
        #: Decode's BLS call asks for the packet alone (workaround 1); anyone else gets tensors.
        self.as_packet = wants_packet(request)
        self.finished: set[str] = set()

    def send(self, delta: ReasoningDelta, timing: tuple[float, float] = (0.0, 0.0)) -> None:
        if delta.finish_reason:
            self.finished.add(delta.stream)
        if self.as_packet:
            self.out.send([packet.output(delta.packet_object())])
            return
        self.out.send(
            delta_tensors(
                stream=delta.stream,
                reasoning=delta.text,
                ids=delta.ids,
                finish_reason=delta.finish_reason or None,
                timing=timing,
                names=REASONING_OUTPUTS,
            )
        )

    def fail(self, streams: Sequence[str], message: str) -> None:
        """Ends every open stream with a ``finish_reason: error`` delta, then the call.

        Data deltas and not an error response: workaround 3. With no streams at all the
        plain error response is all there is to send.
        """
        if not streams:
            self.out.finish(error=message)
            return
        for name in streams:
            if name not in self.finished:
                self.send(ReasoningDelta(name, f"[{message}]", [], "error"))
        self.out.finish()

    def finish(self) -> None:
        self.out.finish()
