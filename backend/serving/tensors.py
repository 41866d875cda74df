"""Small helpers between Triton tensors and Python values, shared by the models.

Why: every model strips the ensemble's batch dimension the same way and every decode /
reasoning response carries the same outputs; one place keeps the shapes consistent with
the config.pbtxt files (``max_batch_size: 8``, so every tensor has a leading batch of 1).
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from backend.serving.top_logprobs import OUTPUTS as TOP_OUTPUTS

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

#: Outputs of a ``decode`` response (CONTRACTS §3), always all present.
CLIENT_OUTPUTS = (
    "text_output",
    "stream_name",
    "reasoning_output",
    "output_ids",
    "finish_reason",
    "session_id",
    "timing_ms",
)
#: Text outputs shaped ``[1]``, not ``[1, 1]``: TensorRT-LLM's ensemble returns ``text_output``
#: one-dimensional (one entry per sequence), and its clients read ``as_numpy("text_output")[0]``
#: as bytes; the reasoning text follows the answer's shape.
ONE_D_OUTPUTS = ("text_output", "reasoning_output")
#: Outputs of a ``reasoning`` response (CONTRACTS §4).
REASONING_OUTPUTS = ("stream_name", "reasoning_output", "output_ids", "finish_reason", "timing_ms")


def input_array(request: Any, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    return None if t is None else t.as_numpy()


def input_ids(request: Any) -> list[int]:
    arr = input_array(request, "input_ids")
    if arr is None:
        raise ValueError("input_ids is missing")
    return [int(x) for x in arr.reshape(-1)]


def request_json(request: Any) -> bytes:
    arr = input_array(request, "request_json")
    if arr is None:
        raise ValueError("request_json is missing")
    return arr.reshape(-1)[0]


def text_tensor(name: str, text: str) -> Any:
    return pb_utils.Tensor(name, np.array([[text.encode("utf-8")]], dtype=np.object_))


def delta_tensors(
    *,
    stream: str,
    text: str = "",
    reasoning: str = "",
    ids: list[int] | tuple[int, ...] = (),
    finish_reason: str | None = None,
    session_id: str | None = None,
    timing: tuple[float, float] = (0.0, 0.0),
    names: tuple[str, ...] = CLIENT_OUTPUTS,
    prompt_tokens: int | None = None,
    logprobs: tuple[list[float], float] | None = None,
    stats: list[tuple[float, float]] | None = None,
    top: tuple[np.ndarray, ...] | None = None,
    sequence: int | None = None,
) -> list[Any]:
    """The tensors of one response. ``stats`` (the paper layout's ``return_channel_stats``)
    adds ``channel_stats``: ``[entropy, top-1 probability]`` per token, flattened; ``top``
    (``top_logprobs``) the three ``top_logprobs_*`` arrays of ``backend.serving.top_logprobs``;
    ``sequence`` (``num_return_sequences`` > 1) ``sequence_index`` ``[1, 1]`` INT32, as
    TensorRT-LLM's backend tags the sequence a response belongs to."""
    values = {
        "text_output": text,
        "stream_name": stream,
        "reasoning_output": reasoning,
        "finish_reason": finish_reason or "",
        "session_id": session_id or "",
    }
    out = []
    for name in names:
        if name == "output_ids":
            out.append(pb_utils.Tensor(name, np.array([list(ids)], dtype=np.int32).reshape(1, -1)))
        elif name == "timing_ms":
            out.append(pb_utils.Tensor(name, np.array([list(timing)], dtype=np.float32)))
        elif name in ONE_D_OUTPUTS:
            out.append(pb_utils.Tensor(name, np.array([values[name].encode("utf-8")], dtype=np.object_)))
        else:
            out.append(text_tensor(name, values[name]))
    if logprobs is not None:  # TensorRT-LLM's shapes: [batch, beam, tokens] and [batch, beam]
        new, cum = logprobs
        out.append(pb_utils.Tensor("output_log_probs", np.array(new, dtype=np.float32).reshape(1, 1, -1)))
        out.append(pb_utils.Tensor("cum_log_probs", np.array([[cum]], dtype=np.float32)))
    if top is not None:
        out += [pb_utils.Tensor(name, arr) for name, arr in zip(TOP_OUTPUTS, top, strict=True)]
    if prompt_tokens is not None:  # TensorRT-LLM's num_input_tokens: the prompt's length
        out.append(pb_utils.Tensor("num_input_tokens", np.array([[prompt_tokens]], dtype=np.int32)))
    if stats is not None:
        flat = [x for pair in stats for x in pair]
        out.append(pb_utils.Tensor("channel_stats", np.array([flat], dtype=np.float32).reshape(1, -1)))
    if sequence is not None:
        out.append(pb_utils.Tensor("sequence_index", np.array([[sequence]], dtype=np.int32)))
    return out


class Responder:
    """Wrapper of a decoupled response sender: the final flag goes out exactly once.

    A request is ended either by its session loop or by the serving skeleton's error path
    (``backend.serving.engine_model``), possibly after the other has already ended it; a
    send after the final flag is an error in Triton, hence the lock and ``closed``.
    """

    def __init__(self, request: Any):
        self.sender = request.get_response_sender()
        self.lock = threading.Lock()
        self.closed = False

    def cancelled(self) -> bool:
        """The client went away. Never asked once the final flag is out: on 2.51 that reaches
        a deleted response factory and kills tritonserver (SIGSEGV in
        ``TRITONBACKEND_ResponseFactoryIsCancelled``); the lock keeps a watcher thread's
        question from racing the final response another thread sends."""
        with self.lock:
            if self.closed:
                return False
            try:
                return bool(self.sender.is_cancelled())
            except Exception:  # noqa: BLE001 - older stubs: treat as not cancelled
                return False

    def send(self, tensors: list[Any]) -> bool:
        with self.lock:
            if self.closed:
                return False
            try:
                self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
                return True
            except Exception:  # noqa: BLE001 - the client went away; the loop will notice
                return False

    def finish(self, tensors: list[Any] | None = None, error: str | None = None) -> None:
        """Sends the last response (data, error or flags only) with the final flag."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            try:
                if error is not None:
                    self.sender.send(
                        pb_utils.InferenceResponse(error=pb_utils.TritonError(error)), flags=flags
                    )
                elif tensors is not None:
                    self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=flags)
                else:
                    self.sender.send(flags=flags)
            except Exception:  # noqa: BLE001 - nothing more we can tell a gone client
                pass
