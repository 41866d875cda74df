"""Reduce one server response (gRPC ``InferResult`` or HTTP JSON event) to plain fields.

Responses carry only the outputs they set (a reasoning delta may lack
``text_output``), so every output is optional here.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import MultiStreamError

STRING_OUTPUTS = ("text_output", "reasoning_output", "stream_name", "finish_reason", "session_id")
LIST_OUTPUTS = ("output_ids", "timing_ms", "output_log_probs", "top_logprobs_ids", "top_logprobs_values")
#: String outputs with one entry per item (``[1, 1, tokens, k]`` alternatives' texts), kept apart.
STRING_LIST_OUTPUTS = ("top_logprobs_text",)
#: Integer outputs (TensorRT-LLM's names): the prompt's token count, on every response; the
#: sequence a response belongs to (``num_return_sequences`` > 1).
INT_OUTPUTS = ("num_input_tokens", "sequence_index")
# The ensemble cannot have an output named like one of its inputs (Triton treats them as one
# tensor and rejects the ensemble), so the server's session id output is `output_session_id`;
# a bare `session_id` output (e.g. a decoupled model served directly) is accepted too.
SESSION_ID_OUTPUTS = ("output_session_id", "session_id")


def _session_alias(out: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    for name in SESSION_ID_OUTPUTS:
        if raw.get(name):
            out["session_id"] = raw[name]
            break
    return out


def _to_str(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    return "" if x is None else str(x)


def _flatten(x: Any) -> list:
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return x.reshape(-1).tolist()
    if isinstance(x, list | tuple):
        out: list = []
        for item in x:
            out.extend(_flatten(item))
        return out
    return [x]


def fields_from_arrays(get: Any) -> dict[str, Any]:
    """``get(name) -> np.ndarray | None`` (e.g. ``InferResult.as_numpy``) to fields."""
    out: dict[str, Any] = {}
    for name in STRING_OUTPUTS + ("output_session_id",):
        arr = get(name)
        if arr is not None:
            flat = _flatten(arr)
            out[name] = "".join(_to_str(v) for v in flat)
    for name in LIST_OUTPUTS:
        arr = get(name)
        if arr is not None:
            out[name] = _flatten(arr)
    for name in STRING_LIST_OUTPUTS:
        arr = get(name)
        if arr is not None:
            out[name] = [_to_str(v) for v in _flatten(arr)]
    for name in INT_OUTPUTS:
        arr = get(name)
        if arr is not None and _flatten(arr):
            out[name] = int(_flatten(arr)[0])
    out = _session_alias(out, dict(out))
    out.pop("output_session_id", None)
    return out


def fields_from_result(result: Any) -> dict[str, Any]:
    """Fields of a ``tritonclient.grpc.InferResult``: each output the response carries is
    read once. (``as_numpy`` per known name searched the response's outputs every time, for
    some 15 names per token: a tenth of the OpenAI front's CPU.)"""
    present = {out.name: result.as_numpy(out.name) for out in result.get_response().outputs}
    return fields_from_arrays(present.get)


def is_final_grpc(result: Any) -> bool:
    """``triton_final_response`` parameter of a gRPC stream response."""
    params = result.get_response().parameters
    return "triton_final_response" in params and bool(params["triton_final_response"].bool_param)


def fields_from_json(obj: dict[str, Any]) -> dict[str, Any]:
    """Fields of one HTTP ``generate``/``generate_stream`` JSON object.

    Triton renders single-element tensors as scalars and larger ones as
    (possibly nested) arrays; both are accepted.
    """
    if "error" in obj:
        raise MultiStreamError(_to_str(obj["error"]))
    out: dict[str, Any] = {}
    for name in STRING_OUTPUTS + ("output_session_id",):
        if name in obj:
            out[name] = "".join(_to_str(v) for v in _flatten(obj[name]))
    for name in LIST_OUTPUTS:
        if name in obj:
            out[name] = _flatten(obj[name])
    for name in STRING_LIST_OUTPUTS:
        if name in obj:
            out[name] = [_to_str(v) for v in _flatten(obj[name])]
    for name in INT_OUTPUTS:
        if name in obj and _flatten(obj[name]):
            out[name] = int(_flatten(obj[name])[0])
    out = _session_alias(out, dict(out))
    out.pop("output_session_id", None)
    return out


class SSEParser:
    """Incremental server-sent-events parser (WHATWG rules, the subset Triton uses).

    Feed it lines (with or without their newline); it returns the ``data`` of
    each completed event. Comments (``:``) and ``event``/``id``/``retry``
    fields are ignored; several ``data:`` lines join with ``\\n``.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str | bytes) -> str | None:
        if isinstance(line, bytes):
            line = line.decode("utf-8")
        line = line.rstrip("\r\n")
        if line == "":
            if not self._data:
                return None
            data = "\n".join(self._data)
            self._data = []
            return data
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        return None

    def finish(self) -> str | None:
        """Flush an event not followed by a blank line (connection closed)."""
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def sse_json(data: str) -> dict[str, Any]:
    """The JSON object of one SSE event's data (Triton sends one object per event)."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise MultiStreamError(f"server sent a malformed event: {data[:200]!r}") from exc
    if not isinstance(obj, dict):
        raise MultiStreamError(f"server sent a non-object event: {data[:200]!r}")
    return obj


def http_error_message(status: int, body: bytes) -> str:
    """The server's ``{"error": ...}`` message of a failed HTTP call, else the raw body."""
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("data:"):  # generate_stream answers errors as one SSE event
        text = text[len("data:") :].strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and "error" in obj:
            return _to_str(obj["error"])
    except json.JSONDecodeError:
        pass
    if any(not ch.isprintable() and ch not in "\r\n\t" for ch in text):
        return f"HTTP {status}: binary, non-HTTP/JSON answer (is this the server's HTTP port?)"
    return f"HTTP {status}: {text[:500]}" if text else f"HTTP {status}"
