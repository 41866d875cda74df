"""The one seam between ``decode`` and ``reasoning``: both ends of the BLS call.

Decode's side is :class:`ReasoningCall` (starts the decoupled BLS call, yields
:class:`ReasoningDelta` s, and turns every way the call can go wrong into error deltas of
the streams still open); reasoning's side is :class:`ReasoningReply` (sends deltas in the
form the caller asked for, and fails open streams with deltas). The BLS call's mechanics
(the reply channel that carries the deltas, the iterator read to its one final response)
are ``backend/serving/reply_channel.py``, shared with ``tensorrt_llm_bls``.

Every Triton 2.51 (python backend r24.10) workaround of the project, and where it lives:

1. **BF16 packet** (``backend/serving/packet.py``; here :class:`ReasoningDelta`). Ordinary output
   tensors of a decoupled BLS response become numpy arrays on a C++ thread without the
   GIL (``ParentToStubMQMonitor`` -> ``PbTensor`` constructor / ``deserialize_bytes_tensor``)
   while decode's Python threads allocate: SIGSEGV in ``pymalloc_alloc`` under load (CI's
   load test on 2026-11-24, and the earlier unexplained soak crash). BF16 is the one CPU
   dtype for which no Python object is built ("no numpy representation"), so a BLS caller
   that asks for the single output ``delta_packet`` gets the delta as UTF-8 JSON,
   space-padded to an even length and viewed as BF16, read back through DLPack on its own
   thread. Decode now reads its deltas over the reply channel (9.) instead, and asks for
   ``delta_packet`` alone so that its one Triton response carries no tensor. A client
   calling ``reasoning`` directly still gets the tensors of CONTRACTS §4.
2. **Deferred release** (``backend/serving/reply_channel.py``: ``DeferredRelease``, used by
   every BLS call of the project).
   Once the final response is read, the stub's ``ServiceStubToParentRequests`` thread
   erases the response iterator from its map (``Stub::SendCleanupId``); if Python had
   already dropped it, that erase frees the iterator and its tensors off the GIL (caught
   by a checking allocator hook, ``tests/support/gil_check.c``). The caller keeps each
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
9. **Reply channel** (``backend/serving/reply_channel.py``; here :meth:`ReasoningCall.start`
   and ``bls_wire.ChannelResponder``). A stub whose threads read several decoupled BLS
   iterators while another call starts can deadlock (three locks in a cycle: docs/
   reliability.md, "A stub that deadlocks"). The deltas travel as datagrams to the caller's
   process; Triton carries only each call's flags-only final response.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backend.serving import packet
from backend.serving.bls_wire import PacketResponder
from backend.serving.reply_channel import CallEnded, ChannelCall, DeferredRelease
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
        return cls.from_object(packet.decode(tensor))

    @classmethod
    def from_object(cls, d: dict[str, Any]) -> ReasoningDelta:
        """The delta of a :meth:`packet_object` (from a packet or the reply channel)."""
        return cls(
            stream=str(d["s"]), text=str(d["t"]), ids=[int(i) for i in d["i"]], finish_reason=str(d["f"])
        )


class ReasoningCall:
    """Decode's side: one BLS call to ``reasoning``, read as a sequence of deltas.

    Each delta arrives over the reply channel and is posted as ``("reasoning", item)`` into
    decode's queue (the call's end as a ``CallEnded``, after the last delta); decode passes
    each item back through :meth:`receive`, which returns the deltas to forward. Every stream the client was promised gets exactly one final delta: a late
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
        """Starts the BLS call with this request's inputs; returns at once. Its deltas come
        over the reply channel (workaround 9) and are posted as they arrive."""
        inputs = [
            pb_utils.get_input_tensor_by_name(request, n)
            for n in ("input_ids", "request_json", "prompt_kv", "prompt_logits")
        ]
        ChannelCall(self._on_item).start(model_name, inputs, release, name="bls-reasoning")

    def _on_item(self, obj: Any) -> None:
        """One object from reasoning (on the inbox's thread) -> decode's queue."""
        if isinstance(obj, CallEnded):
            item: ReasoningDelta | CallEnded = obj
        elif "error" in obj:  # reasoning could not even start the streams
            item = CallEnded(str(obj["error"]))
        elif "s" in obj:
            item = ReasoningDelta.from_object(obj)
        else:
            return  # a final object without data
        self._post(("reasoning", item))

    def receive(self, item: ReasoningDelta | CallEnded) -> list[ReasoningDelta]:
        """The deltas to forward for one posted item."""
        self._seen = time.monotonic()
        if isinstance(item, CallEnded):
            if self.cancelled:
                return self.fail("cancelled", "cancelled")
            return self.fail(item.message or "reasoning ended without a final delta")
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

    def __init__(self, out: Responder):
        #: Decode's BLS call gets objects (the reply channel: workaround 9; or packets alone:
        #: workaround 1): ``out`` is then a ``bls_wire.PacketResponder``, chosen by
        #: ``responder_for``; anyone else gets tensors.
        self.out = out
        self.finished: set[str] = set()

    def send(self, delta: ReasoningDelta, timing: tuple[float, float] = (0.0, 0.0)) -> None:
        if delta.finish_reason:
            self.finished.add(delta.stream)
        if isinstance(self.out, PacketResponder):
            self.out.send_object(delta.packet_object())
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
        self.finish()

    def finish(self) -> None:
        """The final flag alone (on the reply channel: the end mark first)."""
        if isinstance(self.out, PacketResponder):
            self.out.finish_object(None)
        else:
            self.out.finish()
