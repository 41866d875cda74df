"""The playground's ASGI app: static page + one WebSocket per browser tab.

Why a server-side bridge instead of the browser talking to Triton directly:
browsers cannot speak gRPC streaming, and Triton's HTTP ``generate_stream``
has no way to push input into a running session. The app keeps one
:class:`AsyncMultiStreamClient` and, per tab, relays gRPC stream deltas to the
page and the page's "input" / "stop" actions to the ``session_control`` model.

WebSocket messages (JSON, one object per frame):

browser -> app
    ``{"type": "start", "prompt": str, "params": {...}}``   start a session
    ``{"type": "input", "text": str}``                      push user input into it
    ``{"type": "stop"}``                                    cancel it
app -> browser
    ``status``     Triton reachable or not (sent on connect and on ``{"type": "ping"}``)
    ``started``    the session id the app chose
    ``delta``      one stream delta + that stream's live TTFT / tokens / tokens/s
    ``input_ack``  what ``session_control`` answered for a pushed input
    ``stop_ack``   how the stop was carried out (server cancel or local cancel)
    ``done``       the library's ``Done`` summary (per-stream finish reasons, TTFT, rates)
    ``error``      a clear message (``kind``: "connection", "server" or "request")
    ``ended``      the session is over (after ``done`` or ``error``)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from client import (
    AsyncGeneration,
    AsyncMultiStreamClient,
    Done,
    IncompleteStreamError,
    MultiStreamCancelled,
    MultiStreamConnectionError,
    MultiStreamError,
    StreamDelta,
    StreamStats,
)
from client.core import CONTROL_MODEL, MODEL_NAME
from client.events import ECHO_STREAMS
from client.request import OPTIONS, Param

log = logging.getLogger("client.web")

STATIC_DIR = Path(__file__).parent / "static"
HEALTH_TIMEOUT_S = 5.0
# After a server-side cancel was accepted, how long to wait for the stream to end on its own
# (its streams' final "cancelled" deltas) before closing the gRPC call locally.
STOP_GRACE_S = 10.0
# Pushed input that arrives before the session's first delta waits for it: the decode model
# registers a session's input mailbox only once prefill is done, so an early push would be
# rejected as an unknown session.
MAX_PENDING_INPUTS = 16

#: The request options the page offers (its settings form is built from ``param_table()``);
#: derived from ``GenerateRequest``'s fields, so a new request parameter needs no edit here.
WEB_PARAMS: dict[str, Param] = {name: p for name, p in OPTIONS.items() if p.web}
#: The type each setting must have once converted from the form's string.
PARAM_TYPES: dict[str, type] = {name: p.pytype for name, p in WEB_PARAMS.items()}


def param_table() -> list[dict[str, Any]]:
    """The settings the page offers, served at ``/api/params``: the page renders one field each.

    ``min`` / ``max`` are the rule's bounds (an exclusive bound is only checked by the app);
    ``default`` is what a blank field means when the app fills it in (else the server's).
    """
    return [
        {
            "name": p.name,
            "type": p.pytype.__name__,
            "label": p.name.replace("_", " "),
            "help": f"{p.help} ({p.rule})" if p.rule and not p.choices else p.help,
            "choices": list(p.choices) if p.choices else None,
            "min": p.ge if p.ge is not None else p.gt,
            "max": p.le,
            "default": p.ui_default,
        }
        for p in WEB_PARAMS.values()
    ]


def parse_params(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Form values -> ``generate`` keyword arguments; blank means "server default".

    The page sends strings straight from its inputs; converting here (with the option's own
    parsing and rule) gives the user one clear message per bad field instead of a gRPC type
    error.
    """
    out: dict[str, Any] = {p.name: p.ui_default for p in WEB_PARAMS.values() if p.ui_default is not None}
    for name, value in (raw or {}).items():
        if name not in WEB_PARAMS:
            raise ValueError(f"unknown setting {name!r}")
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        out[name] = WEB_PARAMS[name].parse(value)
    return out


def _stats_json(st: StreamStats) -> dict[str, float | int | None]:
    """A stream's live numbers as the page shows them (TTFT in ms)."""
    ttft_ms = None if st.ttft_s is None else st.ttft_s * 1000.0
    return {"ttft_ms": ttft_ms, "tokens": st.tokens, "tokens_per_s": st.tokens_per_s}


@dataclass
class _Session:
    """One running generation of one tab."""

    session_id: str
    gen: AsyncGeneration
    task: asyncio.Task | None = None
    live: bool = False  # first delta seen: the server knows the session
    stopping: bool = False
    pending_inputs: list[str] = field(default_factory=list)

    def cancelled_summary(self) -> dict[str, Any]:
        """A ``done`` message for a stopped session whose end the library could not summarise.

        Streams that finished keep their own reason; the others were cut by the stop. The
        numbers are the client's live per-stream stats up to the cut.
        """
        stats = self.gen.stats()
        reasons = {n: st.finish_reason or "cancelled" for n, st in stats.items() if n not in ECHO_STREAMS}
        return {
            "type": "done",
            "outcome": "cancelled",
            "session_id": self.session_id,
            "finish_reasons": reasons or {"output": "cancelled"},
            "stats": {n: _stats_json(st) for n, st in stats.items()},
        }


class Playground:
    """Bridges browser tabs (WebSockets) to Triton; one instance per app."""

    def __init__(self, triton_url: str, *, model_name: str = MODEL_NAME) -> None:
        self.triton_url = triton_url
        self.model_name = model_name
        # One client for session_control calls (it keeps one unary gRPC channel);
        # each generate() opens its own bi-directional stream.
        self.client = AsyncMultiStreamClient(triton_url, "grpc", model_name=model_name)

    async def close(self) -> None:
        await self.client.close()

    async def health(self) -> dict[str, Any]:
        """Is Triton up and are ``multistream`` and ``session_control`` ready? Plus UI limits."""
        import tritonclient.grpc.aio as grpcaio

        triton = grpcaio.InferenceServerClient(self.client.url)
        try:

            async def probe() -> dict[str, Any]:
                if not await triton.is_server_live():
                    return {"ok": False, "message": f"Triton at {self.triton_url} is not live"}
                missing = [m for m in (self.model_name, CONTROL_MODEL) if not await triton.is_model_ready(m)]
                if missing:
                    return {
                        "ok": False,
                        "message": f"Triton at {self.triton_url} is up but model(s) "
                        f"{', '.join(missing)} are not ready",
                    }
                limits: dict[str, int] = {}
                with contextlib.suppress(Exception):  # limits are a UI nicety, never fatal
                    cfg = await triton.get_model_config("preprocessing")
                    for key in ("max_reasoning_streams", "max_tokens_limit"):
                        if key in cfg.config.parameters:
                            limits[key] = int(cfg.config.parameters[key].string_value)
                return {"ok": True, "message": f"connected to Triton at {self.triton_url}", "limits": limits}

            return await asyncio.wait_for(probe(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            return {
                "ok": False,
                "message": f"Triton at {self.triton_url} did not answer within {HEALTH_TIMEOUT_S:.0f}s",
            }
        except Exception as exc:  # tritonclient raises InferenceServerException for refused connections
            detail = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
            return {"ok": False, "message": f"cannot reach Triton at {self.triton_url}: {detail}"}
        finally:
            with contextlib.suppress(Exception):
                await triton.close()

    async def serve_socket(self, ws: WebSocket) -> None:
        """Run one tab's WebSocket until it closes; cancels its session if it is still running."""
        await ws.accept()
        tab = _Tab(self, ws)
        try:
            await tab.run()
        finally:
            await tab.abort()


class _Tab:
    """State of one WebSocket: at most one running session at a time."""

    def __init__(self, playground: Playground, ws: WebSocket) -> None:
        self.pg = playground
        self.ws = ws
        self.session: _Session | None = None
        self._send_lock = asyncio.Lock()
        self._closed = False
        self._tasks: set[asyncio.Task] = set()

    async def send(self, msg: dict[str, Any]) -> None:
        """Send one JSON frame; frames from the stream task and control calls must not interleave."""
        if self._closed:
            return
        async with self._send_lock:
            try:
                await self.ws.send_text(json.dumps(msg))
            except Exception:  # tab went away mid-send; run() notices the disconnect
                self._closed = True

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def run(self) -> None:
        self._spawn(self._send_status())
        while True:
            try:
                raw = await self.ws.receive_text()
            except (WebSocketDisconnect, RuntimeError):
                self._closed = True
                return
            try:
                msg = json.loads(raw)
                kind = msg.get("type")
            except (json.JSONDecodeError, AttributeError):
                await self.send({"type": "error", "kind": "request", "message": "malformed message"})
                continue
            if kind == "start":
                await self.start(str(msg.get("prompt") or ""), msg.get("params") or {})
            elif kind == "input":
                await self.push_input(str(msg.get("text") or ""))
            elif kind == "stop":
                await self.stop()
            elif kind == "ping":
                self._spawn(self._send_status())
            else:
                await self.send(
                    {"type": "error", "kind": "request", "message": f"unknown message type {kind!r}"}
                )

    async def _send_status(self) -> None:
        await self.send({"type": "status", **(await self.pg.health())})

    async def start(self, prompt: str, raw_params: dict[str, Any]) -> None:
        if self.session is not None:
            await self.send(
                {"type": "error", "kind": "request", "message": "a session is already running: stop it first"}
            )
            return
        try:
            params = parse_params(raw_params)
            sid = "web-" + uuid.uuid4().hex[:16]
            # The app picks the session id so input and stop can target the session at once.
            gen = self.pg.client.generate(prompt, session_id=sid, **params)
        except ValueError as exc:
            await self.send({"type": "error", "kind": "request", "message": str(exc)})
            return
        session = _Session(session_id=sid, gen=gen)
        self.session = session
        await self.send({"type": "started", "session_id": sid, "params": params, "prompt": prompt})
        session.task = self._spawn(self._stream(session))

    async def _stream(self, s: _Session) -> None:
        """Relay one generation's deltas; always ends with ``ended`` (after ``done`` or ``error``)."""
        outcome = "error"
        try:
            async for ev in s.gen:
                if isinstance(ev, StreamDelta):
                    kind = "user" if ev.stream in ECHO_STREAMS else ev.kind
                    await self.send(
                        {
                            "type": "delta",
                            "stream": ev.stream,
                            "kind": kind,
                            "text": ev.text,
                            "n_tokens": len(ev.token_ids),
                            "finish_reason": ev.finish_reason,
                            "server_ms": ev.timing_ms,
                            # measured by the client library where the responses arrive
                            **_stats_json(s.gen.tracker.stats(ev.stream)),
                        }
                    )
                    if not s.live:
                        s.live = True
                        for text in s.pending_inputs:
                            self._spawn(self._push(s, text))
                        s.pending_inputs.clear()
                        if s.stopping:  # stop pressed before the server knew the session
                            self._spawn(self._server_cancel(s))
                elif isinstance(ev, Done):
                    outcome = "cancelled" if "cancelled" in ev.finish_reasons.values() else "completed"
                    await self.send({"type": "done", "outcome": outcome, **_done_dict(ev)})
        except MultiStreamCancelled:
            outcome = "cancelled"
            await self.send({**s.cancelled_summary(), "local": True})
        except IncompleteStreamError as exc:
            if not s.stopping:
                await self.send(
                    {"type": "error", "kind": "server", "message": f"Triton returned an error: {exc}"}
                )
                return
            # The user asked to stop and the server ended the request, but some stream had no
            # final "cancelled" delta: still a cancelled session; say which streams were cut.
            outcome = "cancelled"
            log.warning("session %s stopped: %s", s.session_id, exc)
            await self.send({**s.cancelled_summary(), "incomplete": str(exc)})
        except MultiStreamConnectionError as exc:
            await self.send(
                {"type": "error", "kind": "connection", "message": f"Triton is down or unreachable: {exc}"}
            )
        except MultiStreamError as exc:
            await self.send(
                {"type": "error", "kind": "server", "message": f"Triton returned an error: {exc}"}
            )
        except Exception as exc:  # never leave the page spinning on an unexpected failure
            log.exception("session %s failed", s.session_id)
            await self.send({"type": "error", "kind": "server", "message": f"{type(exc).__name__}: {exc}"})
        finally:
            if self.session is s:
                self.session = None
            await self.send({"type": "ended", "session_id": s.session_id, "outcome": outcome})

    async def push_input(self, text: str) -> None:
        s = self.session
        if not text.strip():
            await self.send({"type": "input_ack", "text": text, "accepted": False, "message": "empty input"})
        elif s is None:
            await self.send(
                {
                    "type": "input_ack",
                    "text": text,
                    "accepted": False,
                    "message": "no session is running: start one with the prompt box",
                }
            )
        elif not s.live:
            if len(s.pending_inputs) >= MAX_PENDING_INPUTS:
                await self.send(
                    {
                        "type": "input_ack",
                        "text": text,
                        "accepted": False,
                        "message": "too many inputs queued before the first token",
                    }
                )
                return
            s.pending_inputs.append(text)
            await self.send(
                {
                    "type": "input_ack",
                    "text": text,
                    "accepted": None,
                    "queued": True,
                    "session_id": s.session_id,
                }
            )
        else:
            self._spawn(self._push(s, text))

    async def _push(self, s: _Session, text: str) -> None:
        """``session_control`` action "input"; the page shows the server's ``accepted`` answer."""
        try:
            accepted = await self.pg.client.push_input(s.session_id, text)
            await self.send(
                {"type": "input_ack", "text": text, "accepted": accepted, "session_id": s.session_id}
            )
        except MultiStreamError as exc:
            await self.send(
                {
                    "type": "input_ack",
                    "text": text,
                    "accepted": False,
                    "session_id": s.session_id,
                    "message": str(exc),
                }
            )

    async def stop(self) -> None:
        s = self.session
        if s is None:
            await self.send({"type": "stop_ack", "via": None, "message": "no session is running"})
            return
        if s.stopping:
            return
        s.stopping = True
        if s.live:
            self._spawn(self._server_cancel(s))
        else:
            # Not yet known to the server (still in prefill): wait for the first delta, which
            # then cancels through the server; if it never comes, cut the stream locally.
            await self.send({"type": "stop_ack", "via": "pending", "session_id": s.session_id})
            self._spawn(self._local_cancel_later(s, STOP_GRACE_S))

    async def _server_cancel(self, s: _Session) -> None:
        """Cancel through ``session_control`` so every stream ends with finish_reason "cancelled".

        Why not just close the gRPC call: a server-side cancel lets the streams
        send their final deltas, so the page shows what was generated and the
        per-stream numbers; the local cancel is the fallback.
        """
        try:
            accepted = await self.pg.client.cancel(s.session_id)
            await self.send(
                {"type": "stop_ack", "via": "server", "accepted": accepted, "session_id": s.session_id}
            )
        except MultiStreamError as exc:
            # Usually the session ended on its own in the meantime; cut the stream if it has not.
            await self.send(
                {"type": "stop_ack", "via": "local", "session_id": s.session_id, "message": str(exc)}
            )
            s.gen.cancel()
            return
        await self._local_cancel_later(s, STOP_GRACE_S)

    async def _local_cancel_later(self, s: _Session, delay: float) -> None:
        if s.task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(s.task), delay)
        if not s.task.done():
            s.gen.cancel()

    async def abort(self) -> None:
        """Tab closed: do not leave its session generating on the server."""
        self._closed = True
        s = self.session
        if s is not None:
            if s.live:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.pg.client.cancel(s.session_id), HEALTH_TIMEOUT_S)
            s.gen.cancel()
            if s.task is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(s.task, HEALTH_TIMEOUT_S)
        for task in list(self._tasks):
            task.cancel()


def _done_dict(done: Done) -> dict[str, Any]:
    """The library's summary for the page, without the User-channel echo (it has no pane)."""
    d = done.to_dict()
    out = {k: d[k] for k in ("session_id", "ttft_s", "tokens", "tokens_per_s", "total_s", "finish_reasons")}
    for key in ("ttft_s", "tokens", "tokens_per_s", "finish_reasons"):
        out[key] = {n: v for n, v in out[key].items() if n not in ECHO_STREAMS}
    return out


def create_app(triton_url: str, *, model_name: str = MODEL_NAME) -> Starlette:
    """The ASGI app: ``/`` (page), ``/static/*``, ``/api/health``, ``/api/params``, ``/ws``."""
    pg = Playground(triton_url, model_name=model_name)

    async def index(_: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"triton": triton_url, **(await pg.health())})

    async def params(_: Request) -> JSONResponse:
        return JSONResponse(param_table())

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):  # type: ignore[no-untyped-def]
        yield
        await pg.close()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/health", health),
            Route("/api/params", params),
            WebSocketRoute("/ws", pg.serve_socket),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.playground = pg
    return app
