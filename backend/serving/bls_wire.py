"""A BLS callee's responses as objects: one BF16 packet each, or the reply channel.

Why: ``tensorrt_llm_bls`` (backend/serving/tensorrt_llm_bls.py) runs preprocessing ->
prefill -> decode through BLS, and decode calls ``reasoning`` through BLS; both callees are
decoupled. Triton 2.51 turns the ordinary output tensors of a decoupled BLS response into
numpy arrays on a C++ thread without the GIL and crashes the caller's stub
(backend/serving/reasoning_wire.py, workaround 1); the error response of a decoupled BLS
callee does not reach the caller (workaround 3); and a caller that reads many responses of
several calls through Triton's iterators can deadlock (backend/serving/reply_channel.py).
So a callee answers a BLS caller with objects (``{output name: value}``, strings decoded,
arrays flattened; ``{"error": message}`` for a failure; ``"final": true`` on the last):

- over the reply channel, when the caller opened one (:class:`ChannelResponder`; what the
  project's own callers do): then Triton carries only the flags-only final response;
- else as the one BF16 ``delta_packet`` output of each response (:class:`PacketResponder`),
  read back with :func:`backend.serving.packet.decode`.

:func:`responder_for` picks; a direct client (no packet asked for) gets ordinary tensors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backend.serving import packet, reply_channel
from backend.serving.packet import wants_packet
from backend.serving.tensors import Responder

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


def _value(arr: np.ndarray) -> Any:
    flat = arr.reshape(-1).tolist()
    flat = [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else x for x in flat]
    return flat


def tensors_to_dict(tensors: list[Any]) -> dict[str, Any]:
    """``pb_utils.Tensor`` s -> ``{name: flat list}``."""
    return {t.name(): _value(t.as_numpy()) for t in tensors}


class PacketResponder(Responder):
    """A :class:`Responder` whose every response is one object, sent as a ``delta_packet``.

    :meth:`send_object` and :meth:`finish_object` are the two ways out; :class:`ChannelResponder`
    sends the same objects over the reply channel instead.
    """

    def send_object(self, obj: dict[str, Any]) -> bool:
        return super().send([packet.output(obj)])

    def finish_object(self, obj: dict[str, Any] | None) -> None:
        super().finish(None if obj is None else [packet.output(obj)])

    def send(self, tensors: list[Any]) -> bool:
        return self.send_object(tensors_to_dict(tensors))

    def finish(self, tensors: list[Any] | None = None, error: str | None = None) -> None:
        obj: dict[str, Any] = {"final": True}
        if error is not None:
            obj["error"] = error
        elif tensors is not None:
            obj.update(tensors_to_dict(tensors))
        self.finish_object(obj)


class ChannelResponder(PacketResponder):
    """Objects over the reply channel (``reply_channel``), then a flags-only final response.

    Why: a BLS caller that reads many responses through Triton's iterator can deadlock its
    stub (``backend/serving/reply_channel.py``). A send that fails (the caller's process is
    gone, or its queue stayed full for ``SEND_TIMEOUT_S``) makes :meth:`cancelled` true, so
    the session stops as it would for a client that hung up.
    """

    def __init__(self, request: Any, target: tuple[str, str]):
        super().__init__(request)
        self.target = target
        self.lost = False
        self.ending = False

    def cancelled(self) -> bool:
        return self.lost or super().cancelled()

    def send_object(self, obj: dict[str, Any]) -> bool:
        with self.lock:
            if self.closed or self.ending or self.lost:
                return False  # nothing after the end mark: the caller has closed the call
            self.lost = not reply_channel.deliver(self.target, obj)
            return not self.lost

    def finish_object(self, obj: dict[str, Any] | None) -> None:
        with self.lock:
            if self.closed or self.ending:
                return
            self.ending = True
            if not self.lost and (obj is None or reply_channel.deliver(self.target, obj)):
                reply_channel.deliver(self.target, None)  # the end mark, after every object
        Responder.finish(self)  # flags only: the one response the caller reads from Triton


def responder_for(request: Any) -> Responder:
    """The responder of a BLS callee's request: the reply channel when the caller opened one,
    packets when it asks for them alone, ordinary tensors otherwise (a direct client)."""
    target = reply_channel.reply_target(request)
    if target is not None:
        return ChannelResponder(request, target)
    return PacketResponder(request) if wants_packet(request) else Responder(request)
