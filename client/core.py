"""The client's core: everything about a request that does not depend on how bytes travel.

The library has two faces: :class:`client.MultiStreamClient` (``sync.py``: tritonclient's gRPC
stream, or ``http.client`` reading server-sent events) and :class:`client.AsyncMultiStreamClient`
(``aio.py``: ``tritonclient.grpc.aio``, aiohttp). As in vLLM v1's ``core_client.py``, both
stand on one core and differ only in transport, so a rule decided here holds for both:

- names and addresses: the ``multistream`` and ``session_control`` models, default URLs;
- a request from ``generate(prompt, **options)``, whose options are the fields of
  :class:`client.request.GenerateRequest` (built and validated once, here);
- ``session_control`` calls: their inputs, the batched shape, the ``accepted`` answer;
- answers to events: a response (gRPC result, SSE event, JSON body) becomes fields
  (``parse.py``), then a ``StreamDelta`` or the final ``Done`` (``events.StreamTracker``);
- the stall check: when a silent stream asks ``session_control`` for its session's status,
  and what an answer of "was lost" means;
- the cancel-on-server policy: a generation that did not finish cancels its session through
  ``session_control``, once; with action ``cancel_pending`` while the server has answered
  nothing yet (the session may not be registered: the server then applies the cancel when
  it is), with a plain ``cancel`` after.

A transport only opens the connection, waits for responses, hands each to its
:class:`GenerationCore` and turns its own exceptions into ``MultiStreamError`` subclasses.
"""

from __future__ import annotations

import inspect
import json
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from .errors import IncompleteStreamError, MultiStreamCancelled, MultiStreamError
from .events import Done, StreamDelta, StreamStats, StreamTracker
from .parse import SSEParser, fields_from_json, fields_from_result, is_final_grpc, sse_json
from .request import OPTIONS, GenerateRequest, ensure_session_id, infer_inputs, options_doc

MODEL_NAME = "multistream"
CONTROL_MODEL = "session_control"
#: Header (gRPC metadata) naming the session a request belongs to, so that a router in front
#: of several replicas sends all of a session's requests to the replica holding it
#: (docs/kubernetes.md). A single server ignores it.
ROUTING_HEADER = "x-multistream-session"
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
#: Seconds without any response before a generation gives up.
IDLE_TIMEOUT_S = 300.0
#: After this long without a response, ask ``session_control`` whether the session still
#: has a live decode instance (tritonserver 2.51 never ends the requests of a dead stub).
STALL_CHECK_S = 5.0


def normalize_url(url: str | None, protocol: str) -> str:
    """``host:port`` as tritonclient wants it (scheme stripped, default per protocol)."""
    if protocol not in DEFAULT_URLS:
        raise ValueError(f"protocol must be 'grpc' or 'http', not {protocol!r}")
    if not url:
        return DEFAULT_URLS[protocol]
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme) :]
    return url.rstrip("/")


def make_request(prompt: str, options: Mapping[str, Any]) -> GenerateRequest:
    """``generate(prompt, **options)`` -> a validated request.

    ``None`` means "not set" for every option (the field's default applies), so a wrapper can
    pass its own optional arguments through without knowing each default. An unknown name is
    a ``TypeError`` as for any keyword argument, but one that lists the valid names.
    """
    unknown = [name for name in options if name not in OPTIONS]
    if unknown:
        raise TypeError(
            f"generate() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(OPTIONS)}"
        )
    request = GenerateRequest(prompt, **{k: v for k, v in options.items() if v is not None})
    request.validate()
    return request


F = TypeVar("F", bound=Callable[..., Any])


def documents_options(fn: F) -> F:
    """Appends the option list, generated from ``GenerateRequest``, to a ``generate`` docstring.

    ``generate`` takes ``**options`` so that the dataclass stays the one definition; this puts
    the list back where ``help()`` and editors look.
    """
    head = inspect.cleandoc(fn.__doc__ or "")
    fn.__doc__ = f"{head}\n\nOptions (the fields of ``client.request.GenerateRequest``):\n\n{options_doc()}\n"
    return fn


# -- session_control ---------------------------------------------------------------------


def control_tensors(session_id: str, action: str, text: str | None, batched: bool) -> dict[str, np.ndarray]:
    """Inputs of the ``session_control`` model (``[1, 1]`` if it batches, else ``[1]``)."""
    if not session_id:
        raise ValueError("session_id is required")
    shape = (1, 1) if batched else (1,)
    vals = {"session_id": session_id, "action": action}
    if text is not None:
        vals["text_input"] = text
    return {k: np.array([v.encode("utf-8")], dtype=np.object_).reshape(shape) for k, v in vals.items()}


def control_batched(config: Any) -> bool:
    """Whether ``session_control`` batches, from its model config (gRPC message or HTTP JSON).

    Its inputs' shape depends on ``max_batch_size``; asking once beats guessing.
    """
    mbs = config.get("max_batch_size", 0) if isinstance(config, dict) else config.config.max_batch_size
    return int(mbs) > 0


def cancel_action(pending: bool) -> str:
    """The ``session_control`` action of a cancel (``backend/serving/session_control.py``).

    ``pending`` (the caller owns an in-flight request of the id that has not answered yet):
    ``cancel_pending``, which the server remembers for a session not registered yet; else
    ``cancel``, which says "not found" for an unknown or ended session.
    """
    return "cancel_pending" if pending else "cancel"


def control_accepted(result: Any) -> bool:
    """The ``accepted`` output of a ``session_control`` result (gRPC or HTTP ``InferResult``)."""
    arr = result.as_numpy("accepted")
    return bool(arr is not None and arr.reshape(-1)[0])


def raise_if_lost(status_error: MultiStreamError) -> None:
    """Raise if ``session_control``'s answer to action "status" says the session was lost.

    Only that answer ends the wait (its decode instance died, so nothing will ever answer);
    anything else (running, already ended, an older server without "status") means "keep
    waiting": the idle timeout still bounds the wait.
    """
    if "was lost" in str(status_error):
        raise MultiStreamError(f"request lost on the server: {status_error}") from None


class ClientCore:
    """Settings and ``session_control`` call building shared by both clients."""

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        model_name: str = MODEL_NAME,
        control_model: str = CONTROL_MODEL,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
        verbose: bool = False,
    ) -> None:
        self.protocol = protocol
        self.url = normalize_url(url, protocol)
        self.model_name = model_name
        self.control_model = control_model
        self.idle_timeout_s = idle_timeout_s
        self.verbose = verbose
        self._control_batched: bool | None = None  # learnt from the model config on first use

    def _module(self) -> Any:
        """``tritonclient.grpc`` or ``tritonclient.http``: where ``InferInput`` comes from."""
        if self.protocol == "grpc":
            import tritonclient.grpc as m
        else:
            import tritonclient.http as m
        return m

    def _control_args(self, session_id: str, action: str, text: str | None) -> tuple[list, list]:
        """``infer`` inputs and requested outputs of one ``session_control`` call.

        Call once ``_control_batched`` is known (``control_batched`` of the model config).
        """
        m = self._module()
        tensors = control_tensors(session_id, action, text, bool(self._control_batched))
        return infer_inputs(tensors, m), [m.InferRequestedOutput("accepted")]

    def _http_call(self, request: GenerateRequest) -> tuple[str, bytes]:
        """Path and JSON body of HTTP ``generate_stream`` (or ``generate`` without streaming)."""
        path = f"/v2/models/{self.model_name}/{'generate_stream' if request.stream else 'generate'}"
        return path, json.dumps(request.json_body()).encode("utf-8")


def routing_headers(session_id: str | None) -> dict[str, str]:
    """The routing header for a session's requests (generation and ``session_control``)."""
    return {ROUTING_HEADER: session_id} if session_id else {}


class StallWatch:
    """When a silent stream is given up on, and when to ask whether its session was lost.

    Silence alone cannot tell "still thinking" from "gone" (tritonserver 2.51 never ends the
    requests of a decode stub that died): every ``STALL_CHECK_S`` without a response the
    transport asks ``session_control`` (``raise_if_lost``); ``idle_timeout_s`` without one
    ends the wait whatever the answers.
    """

    def __init__(self, idle_timeout_s: float, check_every_s: float = STALL_CHECK_S) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.check_every_s = check_every_s
        self.heard()

    def heard(self) -> None:
        """A response arrived: both clocks start again."""
        now = time.monotonic()
        self._deadline = now + self.idle_timeout_s
        self._next_check = now + self.check_every_s

    def wait_s(self) -> float:
        """How long to wait for a response before the next check or the deadline."""
        return max(0.0, min(self._next_check, self._deadline) - time.monotonic())

    def check_due(self) -> bool:
        """True (and the next check scheduled) when it is time to ask for the session's status."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.check_every_s
        return True

    def expired(self) -> bool:
        return time.monotonic() >= self._deadline

    def idle_error(self) -> MultiStreamError:
        return MultiStreamError(f"no response from server for {self.idle_timeout_s:.0f}s")


class GenerationCore:
    """One request's state and rules, whatever carries it (base of both ``Generation`` classes).

    It holds the request (with a session id chosen client side, so a cancel can reach the
    session before the first response), the ``StreamTracker`` that turns responses into
    events, the local-cancel flag, and the once-only server-side cancel.
    """

    def __init__(self, request: GenerateRequest) -> None:
        self.request = ensure_session_id(request)
        self.tracker = StreamTracker(session_id=self.request.session_id)
        self.done: Done | None = None
        self._cancelled = False  # set by cancel() from any thread; transports poll it
        self._started = False
        self._sse = SSEParser()
        self._lock = threading.Lock()
        self._server_cancel_claimed = False
        self._answered = False  # the server sent a response or an error for this request

    @property
    def answered(self) -> bool:
        """Whether the server has answered this request yet (a response or an error).

        Until then its session may not be registered on the server (the request is still in
        preprocessing or queued for prefill), so a cancel must be a pending one
        (``cancel_action``).
        """
        return self._answered

    def _heard(self) -> None:
        """The transport got a response or an error from the server for this request.

        Ignored once the client cancelled: what arrives then is the local cancel's own error,
        which says nothing about the session.
        """
        if not self._cancelled:
            self._answered = True

    @property
    def session_id(self) -> str | None:
        """The session's id: chosen before sending, confirmed by the server's responses."""
        return self.tracker.session_id

    def stats(self) -> dict[str, StreamStats]:
        """Live TTFT / tokens / tokens-per-second of every stream so far (for a UI)."""
        return self.tracker.live_stats()

    def _begin(self) -> None:
        if self._started:
            raise RuntimeError(f"a {type(self).__name__} can be iterated only once")
        self._started = True

    def _start_clock(self) -> None:
        """The request leaves now: TTFT and total time count from here."""
        self.tracker.t0 = time.perf_counter()

    def _feed_grpc(self, result: Any, t: float) -> tuple[StreamDelta | None, bool]:
        """One gRPC stream response -> (its delta, whether it carries the final flag)."""
        self._heard()
        return self.tracker.feed(fields_from_result(result), t), is_final_grpc(result)

    def _feed_sse_line(self, line: bytes | str) -> StreamDelta | None:
        """One line of ``generate_stream``; a delta when it completes an event."""
        data = self._sse.feed_line(line)
        if data is None:
            return None
        self._heard()
        return self.tracker.feed(fields_from_json(sse_json(data)))

    def _end_sse(self) -> StreamDelta | None:
        """The connection closed: an event not followed by a blank line still counts."""
        data = self._sse.finish()
        return None if data is None else self.tracker.feed(fields_from_json(sse_json(data)))

    def _feed_json_body(self, raw: bytes) -> StreamDelta | None:
        """The one answer of HTTP ``generate`` (no streaming)."""
        self._heard()
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MultiStreamError(f"malformed response: {raw[:200]!r}") from exc
        return self.tracker.feed(fields_from_json(obj))

    def _finish(self) -> Done:
        """After the transport's last response: every stream must have ended; the summary."""
        if self._cancelled:
            raise self._cancelled_error()
        self.tracker.check_complete()
        self.done = self.tracker.done()
        return self.done

    def _claim_server_cancel(self) -> tuple[str, bool] | None:
        """``(session id, pending)`` to cancel through ``session_control`` now, or ``None``.

        Only a generation that did not finish, and only once (the iteration's end and
        ``cancel()`` may both ask, from two threads). Why at all: Triton 2.51 does not pass a
        stream's cancellation on to the running step of an ensemble, so without it the server
        would generate on until ``max_tokens``. ``pending`` while the server has answered
        nothing (``answered``): the cancel then also reaches a session that registers later.
        """
        with self._lock:
            if self.done is not None or self._server_cancel_claimed or not self.session_id:
                return None
            self._server_cancel_claimed = True
            return self.session_id, not self._answered

    @staticmethod
    def _cancelled_error() -> MultiStreamCancelled:
        return MultiStreamCancelled("request cancelled by the client")

    @staticmethod
    def _closed_early_error() -> IncompleteStreamError:
        return IncompleteStreamError("server closed the stream without a final response")
