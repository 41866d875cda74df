"""Synchronous transport: tritonclient's gRPC bi-directional stream, or HTTP ``generate_stream``.

What a request is and what its answers mean lives in ``core.py``; this module only moves
bytes (threads, blocking sockets) and turns transport exceptions into ``MultiStreamError``.

Why a ``Generation`` object instead of a bare generator: a caller showing a live answer needs
a handle to cancel it from another thread (Ctrl-C, a UI button) and the session id for
``push_input`` while it is still running.
"""

from __future__ import annotations

import http.client
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .core import (
    CONTROL_MODEL,
    IDLE_TIMEOUT_S,
    MODEL_NAME,
    ClientCore,
    GenerationCore,
    StallWatch,
    cancel_action,
    control_accepted,
    control_batched,
    documents_options,
    make_request,
    raise_if_lost,
    routing_headers,
)
from .errors import MultiStreamError, from_exception
from .events import Done, Event
from .parse import http_error_message
from .request import GenerateRequest, infer_inputs

#: Idle gRPC clients kept per ``MultiStreamClient`` for the next ``generate``.
MAX_IDLE_STREAM_CLIENTS = 4


class Generation(GenerationCore):
    """One running request. Iterate for ``StreamDelta`` events, then one ``Done``.

    ``cancel()`` (any thread) stops the stream locally: on gRPC the stream is closed with
    ``stop_stream(cancel_requests=True)``, which makes Triton cancel the request, and the
    session is cancelled through ``session_control`` too; iteration then raises
    ``MultiStreamCancelled``.
    """

    def __init__(self, client: MultiStreamClient, request: GenerateRequest) -> None:
        super().__init__(request)
        self._client = client
        self._cancel_hook: Callable[[], None] | None = None
        #: Held while the ``session_control`` cancel is sent: an iteration that ends (and a
        #: caller that then closes the client) waits for a ``cancel()`` still sending it on
        #: another thread, or that cancel would fail on the closed client and the session
        #: would generate on until ``max_tokens``.
        self._server_cancel_lock = threading.Lock()

    def __iter__(self) -> Iterator[Event]:
        self._begin()
        try:
            # ``yield from`` closes the transport's generator when the caller stops early, so
            # its connection is released now, not at garbage collection.
            yield from (self._iter_grpc() if self._client.protocol == "grpc" else self._iter_http())
        finally:
            self._cancel_on_server()

    def result(self) -> Done:
        """Consume the whole stream and return the summary."""
        for _ in self:
            pass
        assert self.done is not None
        return self.done

    def cancel(self) -> None:
        """Stop the in-flight request from any thread."""
        self._cancelled = True
        hook = self._cancel_hook
        if hook is not None:
            try:
                hook()
            except Exception:  # noqa: BLE001 - cancelling an already-dead stream is fine
                pass
        self._cancel_on_server()

    def _cancel_on_server(self) -> None:
        """``session_control`` cancel when the core's policy says so (best effort)."""
        with self._server_cancel_lock:
            claim = self._claim_server_cancel()
            if claim is None:
                return
            session_id, pending = claim
            try:
                self._client.cancel(session_id, pending=pending)
            except MultiStreamError:  # the session may have ended already
                pass

    # -- gRPC -------------------------------------------------------------
    def _iter_grpc(self) -> Iterator[Event]:
        import tritonclient.grpc as grpcclient

        c = self._client
        inputs = infer_inputs(self.request.tensors(), grpcclient)
        q: queue.Queue = queue.Queue()

        def callback(result: Any, error: Any) -> None:
            q.put((result, error, time.perf_counter()))

        triton = c._take_stream_client()
        try:
            try:
                triton.start_stream(callback=callback, headers=routing_headers(self.request.session_id))
                self._cancel_hook = lambda: triton.stop_stream(cancel_requests=True)
                if self._cancelled:
                    raise self._cancelled_error()
                self._start_clock()
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
            watch = StallWatch(c.idle_timeout_s)
            while True:
                try:
                    result, error, t = q.get(timeout=0.25)
                except queue.Empty:
                    if self._cancelled:
                        raise self._cancelled_error() from None
                    if watch.check_due() and self.session_id:
                        c._check_session_alive(self.session_id)
                    handler = getattr(getattr(triton, "_stream", None), "_handler", None)
                    if handler is not None and not handler.is_alive() and q.empty():
                        raise self._closed_early_error() from None
                    if watch.expired():
                        raise watch.idle_error() from None
                    continue
                watch.heard()
                if error is not None:
                    if self._cancelled:
                        raise self._cancelled_error()
                    self._heard()
                    raise from_exception(error, c.url)
                delta, final = self._feed_grpc(result, t)
                if delta is not None:
                    yield delta
                if final:
                    break
            yield self._finish()
        finally:
            self._cancel_hook = None
            reusable = self.done is not None
            try:
                triton.stop_stream(cancel_requests=not reusable)
            except Exception:  # noqa: BLE001 - teardown must not mask the real error
                reusable = False
            c._give_back_stream_client(triton, reusable)

    # -- HTTP -------------------------------------------------------------
    def _iter_http(self) -> Iterator[Event]:
        c = self._client
        path, body = c._http_call(self.request)
        host, _, port = c.url.partition(":")
        conn = http.client.HTTPConnection(host, int(port or 80), timeout=c.idle_timeout_s)
        self._cancel_hook = conn.close
        try:
            try:
                self._start_clock()
                conn.request(
                    "POST",
                    path,
                    body=body,
                    headers={
                        "Content-Type": "application/json",
                        "Accept": "text/event-stream",
                        **routing_headers(self.request.session_id),
                    },
                )
                resp = conn.getresponse()
            except http.client.BadStatusLine as exc:
                raise MultiStreamError(
                    f"{c.url} did not answer HTTP/1.1 (is it the gRPC port? use --protocol grpc)"
                ) from exc
            except Exception as exc:
                if self._cancelled:
                    raise self._cancelled_error() from exc
                raise from_exception(exc, c.url) from exc
            if resp.status != 200:
                self._heard()
                raise MultiStreamError(http_error_message(resp.status, resp.read()), status=str(resp.status))
            try:
                if self.request.stream:
                    for line in iter(resp.readline, b""):
                        delta = self._feed_sse_line(line)
                        if delta is not None:
                            yield delta
                    delta = self._end_sse()
                else:
                    delta = self._feed_json_body(resp.read())
                if delta is not None:
                    yield delta
            except MultiStreamError:
                raise
            except Exception as exc:
                if self._cancelled:
                    raise self._cancelled_error() from exc
                raise from_exception(exc, c.url) from exc
            yield self._finish()
        finally:
            self._cancel_hook = None
            conn.close()


class MultiStreamClient(ClientCore):
    """Synchronous client of the ``multistream`` ensemble and ``session_control`` model.

    Each ``generate`` opens its own gRPC stream (tritonclient allows one stream per client
    object), so one ``MultiStreamClient`` may run several generations from several threads.
    """

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
        super().__init__(
            url,
            protocol,
            model_name=model_name,
            control_model=control_model,
            idle_timeout_s=idle_timeout_s,
            verbose=verbose,
        )
        self._unary: Any = None
        self._lock = threading.Lock()
        # Idle gRPC clients (channels) kept for the next generate: tritonclient allows one
        # stream per client at a time, and a fresh channel per request would add a TCP +
        # HTTP/2 handshake to every TTFT (visible in load tests).
        self._idle_stream_clients: list[Any] = []

    # -- generation ---------------------------------------------------------
    @documents_options
    def generate(self, prompt: str, **options: Any) -> Generation:
        """Start a request; iterate the result for ``StreamDelta`` events and a final ``Done``.

        Only options that are set (not ``None``) are sent; the server's defaults apply to the
        rest. Raises ``TypeError`` for an unknown option and ``ValueError`` for a bad value at
        once; transport and server errors are raised as ``MultiStreamError`` during iteration.
        """
        return Generation(self, make_request(prompt, options))

    # -- session control ------------------------------------------------------
    def push_input(self, session_id: str, text: str) -> bool:
        """Inject user text into a running session (the User channel)."""
        return self._control(session_id, "input", text)

    def cancel(self, session_id: str, *, pending: bool = False) -> bool:
        """Ask the server to cancel a session (works from any connection).

        ``pending``: the caller owns an in-flight request of this id that has not answered
        yet; a session not registered yet is then cancelled when it registers, instead of
        "not found" (``core.cancel_action``).
        """
        return self._control(session_id, cancel_action(pending), None)

    def _check_session_alive(self, session_id: str) -> None:
        """Raises if the server says the session was lost (``core.raise_if_lost``)."""
        try:
            self._control(session_id, "status", None)
        except MultiStreamError as exc:
            raise_if_lost(exc)

    def warm_up(self) -> None:
        """Opens the unary connection and reads ``session_control``'s config now, so that the
        first cancel is as quick as any later one (``AsyncMultiStreamClient.warm_up``)."""
        try:
            self._control_client()
        except Exception as exc:
            raise from_exception(exc, self.url) from exc

    def is_ready(self) -> bool:
        """True when the server is live and the ensemble is ready."""
        try:
            c = self._unary_client()
            return bool(c.is_server_live() and c.is_model_ready(self.model_name))
        except Exception:  # noqa: BLE001 - "not ready" is the answer
            return False

    def close(self) -> None:
        """Release the unary connection and the idle stream channels."""
        with self._lock:
            idle, self._idle_stream_clients = self._idle_stream_clients, []
            unary, self._unary = self._unary, None
        for t in idle:
            try:
                t.close()
            except Exception:  # noqa: BLE001 - a broken channel is being dropped anyway
                pass
        if unary is not None:
            unary.close()

    def __enter__(self) -> MultiStreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------
    def _take_stream_client(self) -> Any:
        with self._lock:
            if self._idle_stream_clients:
                return self._idle_stream_clients.pop()
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url, verbose=self.verbose)

    def _give_back_stream_client(self, triton: Any, reusable: bool) -> None:
        if reusable:
            with self._lock:
                if len(self._idle_stream_clients) < MAX_IDLE_STREAM_CLIENTS:
                    self._idle_stream_clients.append(triton)
                    return
        try:
            triton.close()
        except Exception:  # noqa: BLE001 - a broken channel is being dropped anyway
            pass

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

    def _control_client(self) -> Any:
        """The unary client, once ``session_control``'s config (batched or not) is known."""
        c = self._unary_client()
        if self._control_batched is None:
            self._control_batched = control_batched(c.get_model_config(self.control_model))
        return c

    def _control(self, session_id: str, action: str, text: str | None) -> bool:
        try:
            c = self._control_client()
            inputs, outputs = self._control_args(session_id, action, text)
            return control_accepted(
                c.infer(self.control_model, inputs, outputs=outputs, headers=routing_headers(session_id))
            )
        except Exception as exc:
            raise from_exception(exc, self.url) from exc
