"""asyncio transport (``tritonclient.grpc.aio`` / aiohttp), same API as the sync client.

What a request is and what its answers mean lives in ``core.py``; this module only moves
bytes and turns transport exceptions into ``MultiStreamError``.

gRPC note: ``tritonclient.grpc.aio.stream_infer`` cannot set
``triton_enable_empty_final_response`` (its request builder rejects the reserved ``triton_``
prefix), and without it a decoupled ensemble's final flag never reaches the client. So we
build the request with tritonclient's own builder, set that parameter on the protobuf, and
call the client's stub (``_client_stub``) directly.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
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


class AsyncGeneration(GenerationCore):
    """One running request: ``async for`` yields ``StreamDelta`` events then ``Done``."""

    def __init__(self, client: AsyncMultiStreamClient, request: GenerateRequest) -> None:
        super().__init__(request)
        self._client = client
        self._call: Any = None
        self._server_cancel: asyncio.Task[None] | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        self._begin()
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        inner = self._iter_grpc() if self._client.protocol == "grpc" else self._iter_http()
        try:
            async for ev in inner:
                yield ev
        finally:
            await inner.aclose()  # caller stopped early: cancel the call now
            claim = self._claim_server_cancel()
            if claim is not None:
                await self._cancel_on_server(*claim)
            elif self._server_cancel is not None:
                await self._server_cancel  # the one cancel() started: out before the iteration ends

    async def result(self) -> Done:
        """Consume the whole stream and return the summary."""
        async for _ in self:
            pass
        assert self.done is not None
        return self.done

    def cancel(self) -> None:
        """Cancel the in-flight call (gRPC call cancel / HTTP connection close) and the session.

        The ``session_control`` cancel goes out at once, on a task of the running loop (as the
        sync client's does), not after the call's teardown: closing the channel first cost
        the OpenAI front's disconnects a few ms, tens under load, before the server heard of
        them. Called off the loop, the iteration's end cancels the session instead.
        """
        self._cancelled = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        claim = self._claim_server_cancel() if loop is not None else None
        if loop is not None and claim is not None:
            self._server_cancel = loop.create_task(self._cancel_on_server(*claim))
        if self._call is not None:
            self._call.cancel()

    async def _cancel_on_server(self, session_id: str, pending: bool) -> None:
        """``session_control`` cancel, best effort: the session may have ended already."""
        try:
            await self._client.cancel(session_id, pending=pending)
        except MultiStreamError:
            pass

    async def _next_response(self, responses: Any, watch: StallWatch) -> Any:
        """The next response, asking ``session_control`` about the session when it is slow."""
        c = self._client
        nxt = asyncio.ensure_future(responses.__anext__())
        try:
            while True:
                if watch.expired():
                    raise watch.idle_error()
                done, _ = await asyncio.wait({nxt}, timeout=watch.wait_s())
                if done:
                    watch.heard()
                    return nxt.result()
                if watch.check_due() and self.session_id:
                    await c._check_session_alive(self.session_id)
        finally:
            if not nxt.done():
                nxt.cancel()

    async def _iter_grpc(self) -> AsyncIterator[Event]:
        import grpc
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as grpcaio
        from tritonclient.grpc._utils import _get_inference_request

        c = self._client
        req = _get_inference_request(
            model_name=c.model_name,
            inputs=infer_inputs(self.request.tensors(), grpcclient),
            model_version="",
            request_id=uuid.uuid4().hex,
            outputs=None,
            sequence_id=0,
            sequence_start=False,
            sequence_end=False,
            priority=0,
            timeout=None,
            parameters=None,
        )
        req.parameters["triton_enable_empty_final_response"].bool_param = True
        finished = asyncio.Event()

        async def requests() -> AsyncIterator[Any]:
            yield req
            await finished.wait()  # keep the request side open until the final response

        triton = c._stream_client(grpcaio)
        try:
            call = triton._client_stub.ModelStreamInfer(
                requests(), metadata=tuple(routing_headers(self.request.session_id).items()) or None
            )
            self._call = call
            self._start_clock()
            responses = call.__aiter__()
            watch = StallWatch(c.idle_timeout_s)
            while True:
                try:
                    response = await self._next_response(responses, watch)
                except StopAsyncIteration:
                    raise self._closed_early_error() from None
                except asyncio.CancelledError:
                    if self._cancelled:
                        raise self._cancelled_error() from None
                    raise
                except grpc.RpcError as exc:
                    if self._cancelled or exc.code() == grpc.StatusCode.CANCELLED:
                        raise self._cancelled_error() from exc
                    self._heard()
                    raise from_exception(_rpc_exc(exc), c.url) from exc
                t = time.perf_counter()
                if response.error_message:
                    self._heard()
                    raise MultiStreamError(response.error_message)
                delta, final = self._feed_grpc(grpcclient.InferResult(response.infer_response), t)
                if delta is not None:
                    yield delta
                if final:
                    break
            yield self._finish()
        finally:
            finished.set()
            if self._call is not None and not self._call.done():
                self._call.cancel()
            self._call = None

    async def _iter_http(self) -> AsyncIterator[Event]:
        import aiohttp

        c = self._client
        path, body = c._http_call(self.request)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=c.idle_timeout_s)
        try:
            session = c._http_session()
            self._start_clock()
            async with session.post(
                f"http://{c.url}{path}",
                data=body,
                headers={"Content-Type": "application/json", **routing_headers(self.request.session_id)},
                timeout=timeout,
            ) as resp:
                self._call = _AiohttpCancel(resp)
                if resp.status != 200:
                    self._heard()
                    raise MultiStreamError(
                        http_error_message(resp.status, await resp.read()), status=str(resp.status)
                    )
                if self.request.stream:
                    async for line in resp.content:
                        delta = self._feed_sse_line(line)
                        if delta is not None:
                            yield delta
                    delta = self._end_sse()
                else:
                    delta = self._feed_json_body(await resp.read())
                if delta is not None:
                    yield delta
        except MultiStreamError:
            raise
        except Exception as exc:
            if self._cancelled:
                raise self._cancelled_error() from exc
            raise from_exception(exc, c.url) from exc
        finally:
            self._call = None
        yield self._finish()


class _AiohttpCancel:
    """An aiohttp response behind the ``cancel()`` / ``done()`` face of a gRPC call."""

    def __init__(self, resp: Any) -> None:
        self._resp = resp

    def cancel(self) -> None:
        self._resp.close()  # drops the connection (never back to the pool): Triton sees it

    def done(self) -> bool:
        return self._resp.closed


def _rpc_exc(exc: Any) -> Exception:
    """grpc.RpcError -> InferenceServerException-like (keeps the server's details)."""
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(msg=exc.details() or str(exc), status=str(exc.code()))


class AsyncMultiStreamClient(ClientCore):
    """asyncio twin of :class:`client.MultiStreamClient`.

    Every gRPC generation is a stream of its own on one shared channel (HTTP/2 multiplexes
    them; the sync client pools channels instead because tritonclient's own stream API takes
    one per client, which this one bypasses). A channel per generation, the first version,
    cost every request a TCP and HTTP/2 handshake before its first token, and the OpenAI
    front, which runs every request through this client, about 1 ms of CPU each.
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
        self._streams: Any = None
        self._http: Any = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

    @documents_options
    def generate(self, prompt: str, **options: Any) -> AsyncGeneration:
        """Start a request; ``async for`` over the result for ``StreamDelta`` events and ``Done``.

        As ``MultiStreamClient.generate``: ``TypeError`` for an unknown option, ``ValueError``
        for a bad value at once, ``MultiStreamError`` during iteration.
        """
        return AsyncGeneration(self, make_request(prompt, options))

    async def push_input(self, session_id: str, text: str) -> bool:
        """Inject user text into a running session (the User channel)."""
        return await self._control(session_id, "input", text)

    async def cancel(self, session_id: str, *, pending: bool = False) -> bool:
        """Ask the server to cancel a session (works from any connection).

        ``pending``: the caller owns an in-flight request of this id that has not answered
        yet; a session not registered yet is then cancelled when it registers, instead of
        "not found" (``core.cancel_action``).
        """
        return await self._control(session_id, cancel_action(pending), None)

    async def _check_session_alive(self, session_id: str) -> None:
        """Raises if the server says the session was lost (``core.raise_if_lost``)."""
        try:
            await self._control(session_id, "status", None)
        except MultiStreamError as exc:
            raise_if_lost(exc)

    async def warm_up(self) -> None:
        """Opens the unary connection and reads ``session_control``'s config now, so that the
        first cancel is as quick as any later one. Why: a long-lived caller (the OpenAI front)
        cancels when a client hangs up, and a cold first call measured 77 ms over gRPC and
        192 ms over HTTP against ~1 ms warm. Raises like any call if Triton is not there."""
        try:
            await self._control_client()
        except Exception as exc:
            raise from_exception(exc, self.url) from exc

    async def is_ready(self) -> bool:
        """True when the server is live and the ensemble is ready."""
        try:
            c = self._unary_client()
            return bool(await c.is_server_live() and await c.is_model_ready(self.model_name))
        except Exception:  # noqa: BLE001 - "not ready" is the answer
            return False

    async def close(self) -> None:
        """Release the unary connection and the generations' channel or connection pool."""
        for attr in ("_unary", "_streams", "_http"):
            client = getattr(self, attr)
            setattr(self, attr, None)
            if client is not None:
                await client.close()

    def _stream_client(self, grpcaio: Any) -> Any:
        """The gRPC client whose channel every generation's stream shares."""
        if self._streams is None:
            self._streams = grpcaio.InferenceServerClient(self.url, verbose=self.verbose)
        return self._streams

    def _http_session(self) -> Any:
        """The aiohttp session whose keep-alive pool every HTTP generation shares.

        Why: a session per generation, the first version, opened a TCP connection and built
        a connector before every request; through the OpenAI front at 16 clients that was a
        tenth of the front's CPU, on the path to every first token. A cancelled generation
        closes its connection (``_AiohttpCancel``), so Triton still sees the hang-up; a
        finished one returns it to the pool. No limit on connections: each live stream holds
        one, and Triton, not this pool, decides when the server is busy. An idle connection is
        closed here after 30 s, before either server end would close it (Triton kept one idle
        for 29 s and reused it; the router's nginx waits 75 s): a request is never sent on a
        connection the server is closing. A session belongs to one event loop: a caller that
        runs the client under a new loop gets a new one.
        """
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._http is None or self._http.closed or self._http_loop is not loop:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            self._http = aiohttp.ClientSession(connector=connector)
            self._http_loop = loop
        return self._http

    async def __aenter__(self) -> AsyncMultiStreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _unary_client(self) -> Any:
        if self._unary is None:
            if self.protocol == "grpc":
                import tritonclient.grpc.aio as aio
            else:
                import tritonclient.http.aio as aio
            self._unary = aio.InferenceServerClient(self.url, verbose=self.verbose)
        return self._unary

    async def _control_client(self) -> Any:
        """The unary client, once ``session_control``'s config (batched or not) is known."""
        c = self._unary_client()
        if self._control_batched is None:
            self._control_batched = control_batched(await c.get_model_config(self.control_model))
        return c

    async def _control(self, session_id: str, action: str, text: str | None) -> bool:
        try:
            c = await self._control_client()
            inputs, outputs = self._control_args(session_id, action, text)
            return control_accepted(
                await c.infer(
                    self.control_model, inputs, outputs=outputs, headers=routing_headers(session_id)
                )
            )
        except Exception as exc:
            raise from_exception(exc, self.url) from exc
