"""Request parameters and their encoding as Triton inputs.

The ``multistream`` ensemble follows the TensorRT-LLM ``ensemble`` contract:
every input is shaped ``[batch, 1]`` and optional inputs are simply absent
when unset, so the server applies its own defaults. We therefore send only
what the caller set (plus the always-present ``text_input``, ``max_tokens``,
``stream``); sending defaults would hide server-side default changes.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

# name -> (Triton datatype, numpy dtype). Names are the contract's (docs/CONTRACTS.md §3).
INPUT_TYPES: dict[str, tuple[str, Any]] = {
    "text_input": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32),
    "stream": ("BOOL", np.bool_),
    "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "seed": ("UINT64", np.uint64),
    "repetition_penalty": ("FP32", np.float32),
    "stop_words": ("BYTES", np.object_),
    "reasoning_streams": ("INT32", np.int32),
    "reasoning_budget": ("INT32", np.int32),
    "attention_mode": ("BYTES", np.object_),
    "sync": ("BYTES", np.object_),
    "session_id": ("BYTES", np.object_),
}

ATTENTION_MODES = ("isolated", "cross")


@dataclass(frozen=True)
class GenerateRequest:
    """What ``generate`` was asked for; ``None`` means "not sent, server default"."""

    prompt: str
    max_tokens: int = 64
    stream: bool = True
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    stop: Sequence[str] | None = None
    reasoning_streams: int | None = None
    reasoning_budget: int | None = None
    attention_mode: str | None = None
    session_id: str | None = None
    sync: str | None = None  # "none" | "revise": revise the answer once reasoning is done

    def validate(self) -> None:
        """Catch caller mistakes locally; the server re-checks everything."""
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError("prompt must be a non-blank string")
        if int(self.max_tokens) < 1:
            raise ValueError("max_tokens must be >= 1")
        if self.attention_mode is not None and self.attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}")
        if self.seed is not None and int(self.seed) < 0:
            raise ValueError("seed must be >= 0 (UINT64)")

    def tensors(self) -> dict[str, np.ndarray]:
        """The inputs to send, each shaped ``[1, n]`` (n = 1 except for several stop words)."""
        self.validate()
        values: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            name = {"prompt": "text_input", "stop": "stop_words"}.get(f.name, f.name)
            values[name] = v
        out: dict[str, np.ndarray] = {}
        for name, v in values.items():
            _, np_dtype = INPUT_TYPES[name]
            if name == "stop_words":
                items = [v] if isinstance(v, str) else list(v)
                if not items:
                    continue
                arr = np.array([[s.encode("utf-8") for s in items]], dtype=np.object_)
            elif np_dtype is np.object_:
                arr = np.array([[str(v).encode("utf-8")]], dtype=np.object_)
            else:
                arr = np.array([[v]], dtype=np_dtype)
            out[name] = arr
        return out

    def json_body(self) -> dict[str, Any]:
        """Body for HTTP ``generate``/``generate_stream``: inputs as JSON scalars."""
        body: dict[str, Any] = {}
        for name, arr in self.tensors().items():
            flat = arr.reshape(-1).tolist()
            flat = [x.decode("utf-8") if isinstance(x, bytes) else x for x in flat]
            body[name] = flat[0] if len(flat) == 1 else flat
        return body


def grpc_inputs(tensors: dict[str, np.ndarray], module: Any) -> list:
    """``InferInput`` objects for ``tritonclient.grpc`` or ``tritonclient.http`` (``module``)."""
    inputs = []
    for name, arr in tensors.items():
        dtype = INPUT_TYPES.get(name, ("BYTES", np.object_))[0]
        inp = module.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


def control_tensors(session_id: str, action: str, text: str | None, batched: bool) -> dict[str, np.ndarray]:
    """Inputs of the ``session_control`` model (``[1, 1]`` if it batches, else ``[1]``)."""
    if not session_id:
        raise ValueError("session_id is required")
    shape = (1, 1) if batched else (1,)
    vals = {"session_id": session_id, "action": action}
    if text is not None:
        vals["text_input"] = text
    return {k: np.array([v.encode("utf-8")], dtype=np.object_).reshape(shape) for k, v in vals.items()}


def ensure_session_id(request: GenerateRequest) -> GenerateRequest:
    """The request, with a client-chosen session id when it has none.

    With the id known before the first response, a cancel can reach the session through
    ``session_control`` at any time (Triton 2.51 drops a stream cancel at the ensemble).
    """
    if request.session_id:
        return request
    return dataclasses.replace(request, session_id=f"client-{uuid.uuid4().hex}")
