"""``decode``'s responses as one BF16 packet, for a model that calls ``decode`` through BLS.

Why: ``tensorrt_llm_bls`` (backend/serving/tensorrt_llm_bls.py) runs preprocessing ->
prefill -> decode through BLS, and decode is decoupled. Triton 2.51 turns the ordinary output
tensors of a decoupled BLS response into numpy arrays on a C++ thread without the GIL and
crashes the caller's stub (backend/serving/reasoning_wire.py, workaround 1); the error
response of a decoupled BLS callee does not reach the caller (workaround 3). So, exactly as
``reasoning`` does for decode, decode answers a request that asks for ``delta_packet`` alone
with that one BF16 tensor holding the response as JSON (``{output name: value}``, strings
decoded, arrays flattened), ``{"error": message}`` for a failure, and ``"final": true`` on the
response that carries the final flag (a BLS response in r24.10 has no flags or parameters the
caller could read).

Both ends are here: :class:`PacketResponder` (decode's side, chosen by :func:`responder_for`)
and :func:`backend.serving.packet.decode` (the caller's side).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from backend.serving import packet
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
    """A :class:`Responder` whose every response is one ``delta_packet``."""

    def _packet(self, obj: dict[str, Any]) -> list[Any]:
        return [packet.output(obj)]

    def send(self, tensors: list[Any]) -> bool:
        return super().send(self._packet(tensors_to_dict(tensors)))

    def finish(self, tensors: list[Any] | None = None, error: str | None = None) -> None:
        obj: dict[str, Any] = {"final": True}
        if error is not None:
            obj["error"] = error
        elif tensors is not None:
            obj.update(tensors_to_dict(tensors))
        super().finish(self._packet(obj))


def responder_for(request: Any) -> Responder:
    """The responder of a ``decode`` request: packets for a BLS caller that asks for them."""
    return PacketResponder(request) if wants_packet(request) else Responder(request)
