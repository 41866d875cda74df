"""Synchronous client: gRPC bi-directional stream or HTTP ``generate_stream``.

Why a ``Generation`` object instead of a bare generator: a caller showing a
live answer needs a handle to cancel it from another thread (Ctrl-C, a UI
button) and the session id for ``push_input`` while it is still running.
"""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from .errors import IncompleteStreamError, MultiStreamCancelled, MultiStreamError, from_exception
from .events import Done, Event, StreamTracker
from .parse import fields_from_json, fields_from_result, http_error_message, is_final_grpc, iter_sse_json
from .request import GenerateRequest, control_tensors, ensure_session_id, grpc_inputs

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
MODEL_NAME = "multistream"
CONTROL_MODEL = "session_control"
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


def make_request(prompt: str, **kw: Any) -> GenerateRequest:
    """Build and validate a request (shared by the sync and async clients)."""
    stop = kw.pop("stop", None)
    if isinstance(stop, str):
        stop = [stop]
    req = GenerateRequest(prompt=prompt, stop=stop, **kw)
    req.validate()
    return req


class Generation:
    """One running request. Iterate for ``StreamDelta`` events, then one ``Done``.

    ``cancel()`` (any thread) stops the stream locally: on gRPC the stream is
    closed with ``stop_stream(cancel_requests=True)``, which makes Triton
    cancel the request; iteration then raises ``MultiStreamCancelled``.
    """

    def __init__(self, client: MultiStreamClient, request: GenerateRequest) -> None:
        self._client = client
        self.request = request = ensure_session_id(request)
        self.session_id: str | None = request.session_id
        self._server_cancelled = False
        self.done: Done | None = None
        self._cancelled = threading.Event()
        self._cancel_hook: Any = None
        self._started = False

    def __iter__(self) -> Iterator[Event]:
        if self._started:
            raise RuntimeError("a Generation can be iterated only once")
        self._started = True
        if self._client.protocol == "grpc":
            it = self._iter_grpc()
        else:
            it = self._iter_http()
        try:
            for ev in it:
                if isinstance(ev, Done):
                    self.done = ev
                yield ev
        finally:
            it.close()  # caller stopped early: cancel the server request now, not at GC
            if self.done is None:
                self._cancel_on_server()

    def result(self) -> Done:
        """Consume the whole stream and return the summary."""
        for _ in self:
            pass
        assert self.done is not None
        return self.done

    def cancel(self) -> None:
        """Stop the in-flight request from any thread."""
        self._cancelled.set()
        hook = self._cancel_hook
        if hook is not None:
            try:
                hook()
            except Exception:  # noqa: BLE001 - cancelling an already-dead stream is fine
                pass
        self._cancel_on_server()

    def _cancel_on_server(self) -> None:
        """Cancels the session through ``session_control`` too (best effort, once).

        Triton 2.51 does not pass a stream's cancellation on to the running step of an
        ensemble, so without this the server would generate on until ``max_tokens``.
        """
        if self._server_cancelled or not self.session_id:
            return
        self._server_cancelled = True
        try:
            self._client.cancel(self.session_id)
        except Exception:  # noqa: BLE001 - the session may have ended already
            pass

    # -- gRPC -------------------------------------------------------------
    def _iter_grpc(self) -> Iterator[Event]:
        import tritonclient.grpc as grpcclient

        c = self._client
        tensors = self.request.tensors()
        inputs = grpc_inputs(tensors, grpcclient)
        q: queue.Queue = queue.Queue()

        def callback(result: Any, error: Any) -> None:
            q.put((result, error, time.perf_counter()))

        triton = c._take_stream_client()
        tracker = StreamTracker(session_id=self.request.session_id)
        finished = False
        try:
            try:
                triton.start_stream(callback=callback)
                self._cancel_hook = lambda: triton.stop_stream(cancel_requests=True)
                if self._cancelled.is_set():
                    raise MultiStreamCancelled("cancelled")
                tracker.t0 = time.perf_counter()
                triton.async_stream_infer(
                    c.model_name,
                    inputs,
                    request_id=uuid.uuid4().hex,
                    enable_empty_final_response=True,
                )
            except MultiStreamError:
                raise
            except Exception as exc:
                # If the stream died before the request was queued (server down), tritonclient
                # raises a generic "stream is no longer in valid state"; the real cause is
                # the error it delivered to our callback.
                try:
                    _, cb_error, _ = q.get(timeout=1.0)
                except queue.Empty:
                    cb_error = None
                raise from_exception(cb_error or exc, c.url) from exc
            deadline = time.monotonic() + c.idle_timeout_s
            next_check = time.monotonic() + STALL_CHECK_S
            while True:
                try:
                    result, error, t = q.get(timeout=0.25)
                except queue.Empty:
                    if self._cancelled.is_set():
                        raise MultiStreamCancelled("stream cancelled by the client") from None
                    if tracker.session_id and time.monotonic() >= next_check:
                        next_check = time.monotonic() + STALL_CHECK_S
                        c._check_session_alive(tracker.session_id)
                    handler = getattr(getattr(triton, "_stream", None), "_handler", None)
                    if handler is not None and not handler.is_alive() and q.empty():
                        raise IncompleteStreamError(
                            "server closed the stream without a final response"
                        ) from None
                    if time.monotonic() > deadline:
                        raise MultiStreamError(
                            f"no response from server for {c.idle_timeout_s:.0f}s"
                        ) from None
                    continue
                deadline = time.monotonic() + c.idle_timeout_s
                next_check = time.monotonic() + STALL_CHECK_S
                if error is not None:
                    if self._cancelled.is_set():
                        raise MultiStreamCancelled("stream cancelled by the client")
                    raise from_exception(error, c.url)
                delta = tracker.feed(fields_from_result(result), t)
                if tracker.session_id:
                    self.session_id = tracker.session_id
                if delta is not None:
                    yield delta
                if is_final_grpc(result):
                    break
            tracker.check_complete()
            finished = True
            yield tracker.done()
        finally:
            self._cancel_hook = None
            reusable = finished
            try:
                triton.stop_stream(cancel_requests=not finished)
            except Exception:  # noqa: BLE001 - teardown must not mask the real error
                reusable = False
            c._give_back_stream_client(triton, reusable)

    # -- HTTP -------------------------------------------------------------
    def _iter_http(self) -> Iterator[Event]:
        c = self._client
        req = self.request
        body = json.dumps(req.json_body()).encode("utf-8")
        path = f"/v2/models/{c.model_name}/{'generate_stream' if req.stream else 'generate'}"
        host, _, port = c.url.partition(":")
        conn = http.client.HTTPConnection(host, int(port or 80), timeout=c.idle_timeout_s)
        self._cancel_hook = conn.close
        tracker = StreamTracker(session_id=req.session_id)
        try:
            try:
                conn.request(
                    "POST",
                    path,
                    body=body,
                    headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
                )
                resp = conn.getresponse()
            except http.client.BadStatusLine as exc:
                raise MultiStreamError(
                    f"{c.url} did not answer HTTP/1.1 (is it the gRPC port? use --protocol grpc)"
                ) from exc
            except Exception as exc:
                if self._cancelled.is_set():
                    raise MultiStreamCancelled("request cancelled by the client") from exc
                raise from_exception(exc, c.url) from exc
            if resp.status != 200:
                raise MultiStreamError(http_error_message(resp.status, resp.read()), status=str(resp.status))
            try:
                if req.stream:
                    for obj in iter_sse_json(iter(resp.readline, b"")):
                        delta = tracker.feed(fields_from_json(obj))
                        if tracker.session_id:
                            self.session_id = tracker.session_id
                        if delta is not None:
                            yield delta
                else:
                    raw = resp.read()
                    try:
                        obj = json.loads(raw)
                    except json.JSONDecodeError as exc:
                        raise MultiStreamError(f"malformed response: {raw[:200]!r}") from exc
                    delta = tracker.feed(fields_from_json(obj))
                    self.session_id = tracker.session_id or self.session_id
                    if delta is not None:
                        yield delta
            except MultiStreamError:
                raise
            except Exception as exc:
                if self._cancelled.is_set():
                    raise MultiStreamCancelled("request cancelled by the client") from exc
                raise from_exception(exc, c.url) from exc
            if self._cancelled.is_set():
                raise MultiStreamCancelled("request cancelled by the client")
            tracker.check_complete()
            yield tracker.done()
        finally:
            self._cancel_hook = None
            conn.close()


class MultiStreamClient:
    """Synchronous client of the ``multistream`` ensemble and ``session_control`` model.

    Each ``generate`` opens its own gRPC stream (tritonclient allows one
    stream per client object), so one ``MultiStreamClient`` may run several
    generations from several threads.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "grpc",
        *,
        model_name: str = MODEL_NAME,
        control_model: str = CONTROL_MODEL,
        idle_timeout_s: float = 300.0,
        verbose: bool = False,
    ) -> None:
        self.protocol = protocol
        self.url = normalize_url(url, protocol)
        self.model_name = model_name
        self.control_model = control_model
        self.idle_timeout_s = idle_timeout_s
        self.verbose = verbose
        self._unary: Any = None
        self._control_batched: bool | None = None
        self._lock = threading.Lock()
        # Idle gRPC clients (channels) kept for the next generate: tritonclient allows one
        # stream per client at a time, and a fresh channel per request would add a TCP +
        # HTTP/2 handshake to every TTFT (visible in load tests).
        self._idle_stream_clients: list[Any] = []

    # -- generation ---------------------------------------------------------
    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 64,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        reasoning_streams: int | None = None,
        reasoning_budget: int | None = None,
        attention_mode: str | None = None,
        session_id: str | None = None,
        repetition_penalty: float | None = None,
        sync: str | None = None,
        stream: bool = True,
    ) -> Generation:
        """Start a request; iterate the result for ``StreamDelta`` events and a final ``Done``.

        Only arguments that are not ``None`` are sent (server defaults apply).
        Raises ``ValueError`` at once for bad arguments; transport and server
        errors are raised as ``MultiStreamError`` during iteration.
        """
        req = make_request(
            prompt,
            max_tokens=max_tokens,
            stream=stream,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            reasoning_streams=reasoning_streams,
            reasoning_budget=reasoning_budget,
            attention_mode=attention_mode,
            session_id=session_id,
            repetition_penalty=repetition_penalty,
            sync=sync,
        )
        return Generation(self, req)

    # -- session control ------------------------------------------------------
    def push_input(self, session_id: str, text: str) -> bool:
        """Inject user text into a running session (the User channel)."""
        return self._control(session_id, "input", text)

    def cancel(self, session_id: str) -> bool:
        """Ask the server to cancel a session (works from any connection)."""
        return self._control(session_id, "cancel", None)

    def _check_session_alive(self, session_id: str) -> None:
        """Raises if the server says the session was lost (its decode instance died).

        Any other answer (running, already ended, an older server without ``status``) means
        "keep waiting": the idle timeout still bounds the wait.
        """
        try:
            self._control(session_id, "status", None)
        except MultiStreamError as exc:
            if "was lost" in str(exc):
                raise MultiStreamError(f"request lost on the server: {exc}") from None

    def is_ready(self) -> bool:
        """True when the server is live and the ensemble is ready."""
        try:
            c = self._unary_client()
            return bool(c.is_server_live() and c.is_model_ready(self.model_name))
        except Exception:  # noqa: BLE001 - "not ready" is the answer
            return False

    def _take_stream_client(self) -> Any:
        with self._lock:
            if self._idle_stream_clients:
                return self._idle_stream_clients.pop()
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url, verbose=self.verbose)

    def _give_back_stream_client(self, triton: Any, reusable: bool) -> None:
        if reusable:
            with self._lock:
                if len(self._idle_stream_clients) < 4:
                    self._idle_stream_clients.append(triton)
                    return
        try:
            triton.close()
        except Exception:  # noqa: BLE001 - a broken channel is being dropped anyway
            pass

    def close(self) -> None:
        """Release the unary connection and the idle stream channels."""
        with self._lock:
            idle, self._idle_stream_clients = self._idle_stream_clients, []
        for t in idle:
            try:
                t.close()
            except Exception:  # noqa: BLE001
                pass
        with self._lock:
            if self._unary is not None:
                try:
                    self._unary.close()
                finally:
                    self._unary = None

    def __enter__(self) -> MultiStreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------
    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as m
        else:
            import tritonclient.http as m
        return m

    def _unary_client(self) -> Any:
        with self._lock:
            if self._unary is None:
                m = self._module()
                if self.protocol == "grpc":
                    self._unary = m.InferenceServerClient(self.url, verbose=self.verbose)
                else:
                    self._unary = m.InferenceServerClient(
                        self.url,
                        verbose=self.verbose,
                        connection_timeout=10.0,
                        network_timeout=self.idle_timeout_s,
                    )
            return self._unary

    def _control(self, session_id: str, action: str, text: str | None) -> bool:
        m = self._module()
        try:
            c = self._unary_client()
            if self._control_batched is None:
                # Shape depends on the model's max_batch_size; ask once instead of guessing.
                cfg = c.get_model_config(self.control_model)
                if self.protocol == "grpc":
                    cfg = cfg.config
                    mbs = cfg.max_batch_size
                else:
                    mbs = cfg.get("max_batch_size", 0)
                self._control_batched = int(mbs) > 0
            tensors = control_tensors(session_id, action, text, self._control_batched)
            inputs = grpc_inputs(tensors, m)
            result = c.infer(self.control_model, inputs, outputs=[m.InferRequestedOutput("accepted")])
            arr = result.as_numpy("accepted")
        except Exception as exc:
            raise from_exception(exc, self.url) from exc
        return bool(arr is not None and arr.reshape(-1)[0])
