"""Server-sent events out, disconnects in: the HTTP side every generating endpoint shares.

- :func:`first_event`: wait for the run's first event *before* answering, so a request the
  ensemble refuses gets its 400/429 as an HTTP status (not a 200 stream carrying an error);
- :func:`watch_disconnect`: while the front holds a request without streaming (that wait,
  or a whole ``stream: false`` answer), a client that hangs up cancels the run;
- :func:`sse_response`: once streaming, Starlette cancels the writer on a disconnect and the
  ``finally`` here cancels the run (``runner.Run`` keeps the clean-up out of that cancelled
  task); an error after the first byte goes out as OpenAI's ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from client.errors import MultiStreamError
from client.events import Done, StreamDelta

from .errors import APIError, bad_request, from_server
from .runner import Run

DONE_LINE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class StreamFlags:
    """How a generating endpoint answers: ``stream`` and its ``stream_options``.

    ``include_server_timing`` is this server's own option (chat and completions): each
    delta chunk then carries ``server_timing_ms``, the server's ``[ms since the request
    reached it, ms since this stream's previous response]`` (Triton's ``timing_ms``). A
    client's own time to first token minus the first of these is what the network and every
    hop outside the model cost that request, the front included, free of the queueing in the
    engine that makes end-to-end TTFT swing by tens of ms under load (``bench.front_cost``).
    """

    stream: bool = False
    include_usage: bool = False
    include_server_timing: bool = False


def stream_flags(body: dict[str, Any]) -> StreamFlags:
    """The :class:`StreamFlags` of a request body; 400 naming the field when one is not a bool."""
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad_request("stream_options must be an object", param="stream_options")
    flags = {}
    for key in ("include_usage", "include_server_timing"):
        value = opts.get(key)
        if value is None:
            value = False
        elif not isinstance(value, bool):
            raise bad_request(f"stream_options.{key} must be true or false", param="stream_options")
        flags[key] = value
    return StreamFlags(stream, **flags)


def sse(obj: Any, event: str | None = None) -> bytes:
    """One event; ``event:`` named for the Responses API, which clients dispatch on."""
    data = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {data}\n\n".encode()


@contextlib.asynccontextmanager
async def watch_disconnect(request: Request, run: Run) -> AsyncIterator[None]:
    """Cancel ``run`` if the client disconnects inside the block (the body is already read)."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                if not run.done:
                    run._runs.metrics.cancelled.labels("disconnect").inc()
                run.cancel()
                return

    task = asyncio.get_running_loop().create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


async def first_event(run: Run) -> tuple[StreamDelta | Done | None, AsyncIterator[StreamDelta | Done]]:
    """The run's first event (``None`` if it ended without any) and the iterator of the rest.

    Raises :class:`APIError` if the run failed before producing anything.
    """
    events = run.events().__aiter__()
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        return None, events
    except MultiStreamError as e:
        raise from_server(e, run.names) from None
    return first, events


async def chain(
    first: StreamDelta | Done | None, rest: AsyncIterator[StreamDelta | Done]
) -> AsyncIterator[StreamDelta | Done]:
    """``first`` (taken by :func:`first_event`) and then the rest, as one iterator."""
    if first is not None:
        yield first
    async for ev in rest:
        yield ev


async def collect(run: Run) -> Done:
    """Every event of a run, for a ``stream: false`` answer; :class:`APIError` on failure."""
    done: Done | None = None
    try:
        async for ev in run.events():
            if isinstance(ev, Done):
                done = ev
    except MultiStreamError as e:
        raise from_server(e, run.names) from None
    if done is None:
        raise APIError(500, "the generation ended without a result")
    return done


def sse_response(
    run: Run,
    chunks: AsyncIterator[bytes],
    *,
    on_error: Callable[[APIError], None],
    done_line: bool = True,
) -> StreamingResponse:
    """Stream ``chunks`` as SSE; a disconnect cancels ``run``, an error becomes an error event."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield chunk
        except MultiStreamError as e:
            err = from_server(e, run.names)
            on_error(err)
            yield sse(err.body())
        except APIError as err:
            on_error(err)
            yield sse(err.body())
        finally:
            if not run.done:
                run._runs.metrics.cancelled.labels("disconnect").inc()
                run.cancel()
        if done_line:
            yield DONE_LINE

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Session-Id": run.session_id},
    )
