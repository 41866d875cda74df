"""asyncio client (``tritonclient.grpc.aio`` / ``aiohttp``), same API as the sync one.

gRPC note: ``tritonclient.grpc.aio.stream_infer`` cannot set
``triton_enable_empty_final_response`` (its request builder rejects the
reserved ``triton_`` prefix), and without it a decoupled ensemble's final
flag never reaches the client. So we build the request with tritonclient's
own builder, set that parameter on the protobuf, and call the client's stub
(``_client_stub``) directly.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .errors import IncompleteStreamError, MultiStreamCancelled, MultiStreamError, from_exception
from .events import Done, Event, StreamTracker
from .parse import fields_from_json, fields_from_result, http_error_message, is_final_grpc, iter_sse_json
from .request import GenerateRequest, control_tensors, ensure_session_id, grpc_inputs
from .sync import CONTROL_MODEL, MODEL_NAME, STALL_CHECK_S, make_request, normalize_url


class AsyncGeneration:
    """One running request: ``async for`` yields ``StreamDelta`` events then ``Done``."""

    def __init__(self, client: AsyncMultiStreamClient, request: GenerateRequest) -> None:
        self._client = client
        self.request = request = ensure_session_id(request)
        self.session_id: str | None = request.session_id
        self.done: Done | None = None
        self._cancelled = False
        self._call: Any = None
        self._started = False

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._started:
            raise RuntimeError("an AsyncGeneration can be iterated only once")
        self._started = True
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        inner = self._iter_grpc() if self._client.protocol == "grpc" else self._iter_http()
        try:
            async for ev in inner:
                if isinstance(ev, Done):
                    self.done = ev
                yield ev
        finally:
            await inner.aclose()  # caller stopped early: cancel the call now
            if self.done is None and self.session_id:
                # Triton 2.51 does not pass a call's cancellation on to a running ensemble
                # step: cancel the session through session_control too (best effort).
                try:
                    await self._client.cancel(self.session_id)
                except Exception:  # noqa: BLE001 - the session may have ended already
                    pass

    async def result(self) -> Done:
        """Consume the whole stream and return the summary."""
        async for _ in self:
            pass
        assert self.done is not None
        return self.done

    def cancel(self) -> None:
        """Cancel the in-flight call (gRPC call cancel / HTTP connection close)."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def _next_or_stall_check(self, responses: Any, tracker: StreamTracker) -> Any:
        """The next response; every ``STALL_CHECK_S`` without one, asks ``session_control``
        whether the session was lost (tritonserver 2.51 never ends the requests of a dead
        stub); ``asyncio.TimeoutError`` after ``idle_timeout_s`` of silence."""
        c = self._client
        nxt = asyncio.ensure_future(responses.__anext__())
        deadline = time.monotonic() + c.idle_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise asyncio.TimeoutError
                done, _ = await asyncio.wait({nxt}, timeout=min(STALL_CHECK_S, left))
                if done:
                    return nxt.result()
                if tracker.session_id:
                    await c._check_session_alive(tracker.session_id)
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
            inputs=grpc_inputs(self.request.tensors(), grpcclient),
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

        triton = grpcaio.InferenceServerClient(c.url, verbose=c.verbose)
        tracker = StreamTracker(session_id=self.request.session_id)
        try:
            call = triton._client_stub.ModelStreamInfer(requests())
            self._call = call
            tracker.t0 = time.perf_counter()
            responses = call.__aiter__()
            while True:
                try:
                    response = await self._next_or_stall_check(responses, tracker)
                except StopAsyncIteration:
                    raise IncompleteStreamError("server closed the stream without a final response") from None
                except asyncio.TimeoutError:
                    raise MultiStreamError(f"no response from server for {c.idle_timeout_s:.0f}s") from None
                except asyncio.CancelledError:
                    if self._cancelled:
                        raise MultiStreamCancelled("stream cancelled by the client") from None
                    raise
                except grpc.RpcError as exc:
                    if self._cancelled or exc.code() == grpc.StatusCode.CANCELLED:
                        raise MultiStreamCancelled("stream cancelled by the client") from exc
                    raise from_exception(_rpc_exc(exc), c.url) from exc
                t = time.perf_counter()
                if response.error_message:
                    raise MultiStreamError(response.error_message)
                result = grpcclient.InferResult(response.infer_response)
                delta = tracker.feed(fields_from_result(result), t)
                if tracker.session_id:
                    self.session_id = tracker.session_id
                if delta is not None:
                    yield delta
                if is_final_grpc(result):
                    break
            tracker.check_complete()
            yield tracker.done()
        finally:
            finished.set()
            if self._call is not None and not self._call.done():
                self._call.cancel()
            self._call = None
            await triton.close()

    async def _iter_http(self) -> AsyncIterator[Event]:
        import aiohttp

        c = self._client
        r = self.request
        path = f"http://{c.url}/v2/models/{c.model_name}/{'generate_stream' if r.stream else 'generate'}"
        tracker = StreamTracker(session_id=r.session_id)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=c.idle_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                async with session.post(
                    path, data=json.dumps(r.json_body()), headers={"Content-Type": "application/json"}
                ) as resp:
                    self._call = _AiohttpCancel(resp)
                    if resp.status != 200:
                        raise MultiStreamError(
                            http_error_message(resp.status, await resp.read()), status=str(resp.status)
                        )
                    if r.stream:
                        lines: list[bytes] = []
                        async for line in resp.content:
                            lines.append(line)
                            for obj in _drain(lines):
                                delta = tracker.feed(fields_from_json(obj))
                                self.session_id = tracker.session_id or self.session_id
                                if delta is not None:
                                    yield delta
                        for obj in iter_sse_json(lines):
                            delta = tracker.feed(fields_from_json(obj))
                            if delta is not None:
                                yield delta
                    else:
                        raw = await resp.read()
                        try:
                            obj = json.loads(raw)
                        except json.JSONDecodeError as exc:
                            raise MultiStreamError(f"malformed response: {raw[:200]!r}") from exc
                        delta = tracker.feed(fields_from_json(obj))
                        if delta is not None:
                            yield delta
                    self.session_id = tracker.session_id or self.session_id
        except MultiStreamError:
            raise
        except Exception as exc:
            if self._cancelled:
                raise MultiStreamCancelled("request cancelled by the client") from exc
            raise from_exception(exc, c.url) from exc
        finally:
            self._call = None
        if self._cancelled:
            raise MultiStreamCancelled("request cancelled by the client")
        tracker.check_complete()
        yield tracker.done()


def _drain(lines: list[bytes]) -> list[dict]:
    """Parse the complete SSE events buffered in ``lines`` (in place: keeps the unfinished tail)."""
    if not lines or lines[-1].strip():
        return []
    objs = list(iter_sse_json(lines))
    lines.clear()
    return objs


class _AiohttpCancel:
    def __init__(self, resp: Any) -> None:
        self._resp = resp

    def cancel(self) -> None:
        self._resp.close()

    def done(self) -> bool:
        return self._resp.closed


def _rpc_exc(exc: Any) -> Exception:
    """grpc.RpcError -> InferenceServerException-like (keeps the server's details)."""
    from tritonclient.utils import InferenceServerException

    return InferenceServerException(msg=exc.details() or str(exc), status=str(exc.code()))


class AsyncMultiStreamClient:
    """asyncio twin of :class:`client.MultiStreamClient`."""

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
    ) -> AsyncGeneration:
        """Start a request; ``async for`` over the result (see ``MultiStreamClient.generate``)."""
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
        return AsyncGeneration(self, req)

    async def push_input(self, session_id: str, text: str) -> bool:
        """Inject user text into a running session."""
        return await self._control(session_id, "input", text)

    async def cancel(self, session_id: str) -> bool:
        """Ask the server to cancel a session."""
        return await self._control(session_id, "cancel", None)

    async def _check_session_alive(self, session_id: str) -> None:
        """Raises if the server says the session was lost (see ``MultiStreamClient``)."""
        try:
            await self._control(session_id, "status", None)
        except MultiStreamError as exc:
            if "was lost" in str(exc):
                raise MultiStreamError(f"request lost on the server: {exc}") from None

    async def close(self) -> None:
        if self._unary is not None:
            await self._unary.close()
            self._unary = None

    async def __aenter__(self) -> AsyncMultiStreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _module(self) -> Any:
        if self.protocol == "grpc":
            import tritonclient.grpc as m
        else:
            import tritonclient.http as m
        return m

    async def _control(self, session_id: str, action: str, text: str | None) -> bool:
        m = self._module()
        try:
            if self._unary is None:
                if self.protocol == "grpc":
                    import tritonclient.grpc.aio as aio
                else:
                    import tritonclient.http.aio as aio
                self._unary = aio.InferenceServerClient(self.url, verbose=self.verbose)
            c = self._unary
            if self._control_batched is None:
                cfg = await c.get_model_config(self.control_model)
                mbs = cfg.config.max_batch_size if self.protocol == "grpc" else cfg.get("max_batch_size", 0)
                self._control_batched = int(mbs) > 0
            inputs = grpc_inputs(control_tensors(session_id, action, text, self._control_batched), m)
            result = await c.infer(self.control_model, inputs, outputs=[m.InferRequestedOutput("accepted")])
            arr = result.as_numpy("accepted")
        except Exception as exc:
            raise from_exception(exc, self.url) from exc
        return bool(arr is not None and arr.reshape(-1)[0])
