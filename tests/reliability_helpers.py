"""Helpers of the reliability tests: raw tritonclient calls with a hard timeout, metrics, RSS.

Why raw ``tritonclient`` and not the client library: the reliability tests send what the
client library refuses to build (wrong dtypes, shapes, invalid UTF-8, batch 2), and must
tell a clean server error from a hang, so every call here has a deadline and reports what
came back instead of raising.
"""

from __future__ import annotations

import queue
import re
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil
import tritonclient.grpc as grpcclient

MODEL = "multistream"

#: numpy dtype of each Triton data type the tests send.
NP_TYPES: dict[str, Any] = {
    "BYTES": np.object_,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT64": np.uint64,
    "FP32": np.float32,
    "FP64": np.float64,
    "BOOL": np.bool_,
}


@dataclass
class Outcome:
    """What one streaming request produced: responses, the error (if any), and whether it ended."""

    responses: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    final: bool = False
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return "".join(r.get("text_output", "") for r in self.responses if r.get("stream_name") == "output")

    def finish_reasons(self) -> dict[str, str]:
        return {r["stream_name"]: r["finish_reason"] for r in self.responses if r.get("finish_reason")}


def tensor(name: str, value: Any, datatype: str, shape: tuple[int, ...] | None = None) -> Any:
    """An ``InferInput`` holding ``value`` as ``datatype`` (shape ``[1, 1]`` unless given)."""
    if datatype == "BYTES":
        values = value if isinstance(value, list) else [value]
        flat = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in values]
        arr = np.array(flat, dtype=np.object_)
    else:
        arr = np.array(value, dtype=NP_TYPES[datatype])
    arr = arr.reshape(shape if shape is not None else (1, -1) if arr.size else (1, 0))
    inp = grpcclient.InferInput(name, list(arr.shape), datatype)
    inp.set_data_from_numpy(arr)
    return inp


def _fields(result: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("text_output", "stream_name", "reasoning_output", "finish_reason", "output_session_id"):
        arr = result.as_numpy(name)
        if arr is not None and arr.size:
            v = arr.reshape(-1)[0]
            out[name] = v.decode("utf-8") if isinstance(v, bytes) else str(v)
    return out


def stream_infer(url: str, inputs: list[Any], timeout: float = 60.0, model: str = MODEL) -> Outcome:
    """One request over a gRPC stream; waits for the final flag or the first error, never longer
    than ``timeout`` (then ``error`` starts with "TIMEOUT", which the tests treat as a hang)."""
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    out = Outcome()
    t0 = time.monotonic()
    try:
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        client.async_stream_infer(
            model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True
        )
        deadline = t0 + timeout
        while True:
            try:
                result, error = q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                out.error = f"TIMEOUT: no final response within {timeout:.0f}s"
                break
            if error is not None:
                msg = getattr(error, "message", None)
                out.error = msg() if callable(msg) else str(error)
                break
            out.responses.append(_fields(result))
            params = result.get_response().parameters
            if "triton_final_response" in params and params["triton_final_response"].bool_param:
                out.final = True
                break
    finally:
        out.seconds = time.monotonic() - t0
        try:
            client.stop_stream(cancel_requests=True)
        finally:
            client.close()
    return out


def request_inputs(
    prompt: str | bytes = "Say hi.", max_tokens: int = 4, **extra: tuple[Any, str]
) -> list[Any]:
    """A valid request (``text_input``, ``max_tokens``, ``stream``) plus ``extra`` name=(value, type)."""
    inputs = {"text_input": (prompt, "BYTES"), "max_tokens": (max_tokens, "INT32"), "stream": (True, "BOOL")}
    inputs.update(extra)
    return [tensor(n, v, t) for n, (v, t) in inputs.items()]


def assert_serves_normally(url: str, timeout: float = 60.0) -> Outcome:
    """A plain request streams a non-empty answer that ends with a finish_reason."""
    out = stream_infer(url, request_inputs("What is 2 + 2?", 6), timeout=timeout)
    assert out.error is None, f"a normal request failed afterwards: {out.error}"
    assert out.final, "a normal request did not get its final response"
    assert out.text.strip(), f"a normal request got an empty answer: {out.responses}"
    assert out.finish_reasons().get("output") in ("stop", "length"), out.responses
    return out


# -- metrics ---------------------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)$")


def scrape(metrics_url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> ``{family: [(labels, value), ...]}``."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return out


def freed_within_s() -> float:
    """How long after a cancel the gauges may still show a session, by the server's own rules.

    decode waits at most ``CANCEL_GRACE_S`` for the engine and reasoning to confirm (they stop
    within a step, checked at least every ``MAX_CHECK_S``); the stats poller then updates the
    gauges within ``stats_period`` and the metrics flusher sends them within ``FLUSH_PERIOD_S``.
    A bound derived from the code, not a guess at how loaded the machine is.
    """
    from backend.serving.decode import CANCEL_GRACE_S
    from backend.serving.engine_model import EngineModel
    from backend.serving.metrics import FLUSH_PERIOD_S
    from backend.serving.pump import MAX_CHECK_S

    return CANCEL_GRACE_S + MAX_CHECK_S + EngineModel.stats_period + FLUSH_PERIOD_S


def gauge_sum(metrics: dict, family: str, model: str | None = None) -> float:
    return sum(v for labels, v in metrics.get(family, []) if model is None or labels.get("model") == model)


def gauges_by_instance(metrics: dict, family: str) -> dict[str, float]:
    return {labels.get("instance", ""): v for labels, v in metrics.get(family, [])}


def wait_for(predicate: Any, timeout: float, period: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return bool(predicate())


# -- processes -------------------------------------------------------------------------------------


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and all its descendants (tritonserver + its Python stubs), MiB."""
    root = psutil.Process(pid)
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def stub_pids(server_pid: int, model: str) -> list[int]:
    """Pids of the Python stubs of ``model`` under this tritonserver (cmdline names the model.py)."""
    pids = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "triton_python_backend_stub" in cmd and f"/{model}/1/model.py" in cmd:
            pids.append(p.pid)
    return pids


def http_status(url: str, timeout: float = 3.0) -> int:
    """HTTP status of a GET (0 when nothing answers)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0
