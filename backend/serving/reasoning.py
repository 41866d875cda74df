"""Triton model ``reasoning`` (decoupled): background thinking streams, reached via BLS.

Why its own model: reasoning is long and throughput-bound, the answer is short and
latency-bound. On its own instances (own processes, own engine, own KV pool) reasoning
can batch the thinking streams of every request (continuous batching in the engine: all
streams of all sessions advance in one forward per step) without ever delaying a decode
step of the user-facing answer.

Each request runs ``reasoning_streams`` streams in ONE engine session over the prompt KV
from ``prefill`` (no recompute): one row per step decodes a token of every stream, the
paper's "several tokens per forward cost about one". Streams differ by a short forced
"thinking" preamble and a per-stream seed. Budget: ``reasoning_budget`` tokens each.
Cancellation: the BLS caller cannot cancel a decoupled BLS request in Triton 2.51, so
``decode`` raises a flag in the session mailbox; a client cancel (``is_cancelled``)
works too. Either stops the streams within one step and frees the KV slot. How deltas go
back to the caller is ``backend.serving.reasoning_wire`` (:class:`ReasoningReply`).
"""

from __future__ import annotations

import queue
import time
from typing import Any

from backend.engine import StreamEvent, StreamSpec
from backend.serving import handoff
from backend.serving.engine_model import EngineModel, error_message
from backend.serving.pump import POLL_S, CancelPoll, StreamPump
from backend.serving.reasoning_wire import ReasoningDelta, ReasoningReply
from backend.serving.request import REASONING_PREAMBLES, RequestConfig
from backend.serving.session_control import Mailbox
from backend.serving.tensors import Responder, input_ids, request_json

#: Values of the ``fault_injection`` parameter (tests only; empty in every shipped config).
FAULTS = ("", "error_after", "hang_after")


def parse_fault(spec: str) -> tuple[str, int, str]:
    """``"error_after:N[:PREFIX]"`` / ``"hang_after:N[:PREFIX]"`` -> (kind, N, prefix); ``""`` -> none.

    After N reasoning tokens, requests whose session id starts with PREFIX (all when empty)
    fail with an error, or go silent until cancelled. Why a deploy parameter and not a
    request input: a client must never be able to make the server misbehave. Only whoever
    renders the repository (a test's ``start_server``) can set it, to prove that decode
    survives a reasoning call that fails or times out; the prefix lets one test server
    serve faulty and healthy sessions side by side.
    """
    kind, _, rest = spec.strip().partition(":")
    n, _, prefix = rest.partition(":")
    if kind not in FAULTS:
        raise ValueError(f"fault_injection must be one of {FAULTS} with ':N[:PREFIX]', got {spec!r}")
    return kind, int(n or 0), prefix


class ReasoningModel(EngineModel):
    """One engine per instance; one thread per request feeding its responses."""

    role = "reasoning"

    def setup(self, args: dict[str, Any]) -> None:
        self.mailbox = Mailbox.for_args(args)
        self.preambles = [self.tokenizer.encode(p + "\n") for p in REASONING_PREAMBLES]
        # Comma-separated specs, the first whose prefix matches applies (tests only).
        self.faults = [parse_fault(f) for f in self.params.get("fault_injection", "").split(",") if f.strip()]

    def streams_for(self, cfg: RequestConfig) -> list[StreamSpec]:
        return [
            StreamSpec(
                name=f"reasoning/{i}",
                kind="reasoning",
                sampling=cfg.reasoning_sampling(i),
                preamble_ids=list(self.preambles[i % len(self.preambles)]),
            )
            for i in range(cfg.reasoning_streams)
        ]

    def serve(self, request: Any, out: Responder) -> None:
        reply = ReasoningReply(out)
        try:
            self._run(request, reply)
        except Exception as e:  # noqa: BLE001 - the caller gets error deltas (reasoning_wire, 3.)
            error_message(self.role, e)  # traces the unexpected ones
            try:
                n = RequestConfig.from_json(request_json(request)).reasoning_streams
            except Exception:  # noqa: BLE001 - an unreadable request: the plain error is all we have
                n = 0
            reply.fail([f"reasoning/{i}" for i in range(n)], f"reasoning failed: {e}")

    def _run(self, request: Any, reply: ReasoningReply) -> None:
        cfg = RequestConfig.from_json(request_json(request))
        if cfg.reasoning_streams == 0:
            reply.finish()
            return
        prefix = handoff.from_request(request, self.vocab_size)
        q: queue.Queue[StreamEvent] = queue.Queue()
        esid = f"{cfg.session_id}.reasoning"
        self.engine.submit(
            input_ids(request),
            self.streams_for(cfg),
            attention="isolated",
            on_event=q.put,
            session_id=esid,
            prefix_kv=prefix,
        )
        self.poller.poll_now()
        pump = StreamPump("reasoning", self.metrics, cfg.arrival, self.group_tokens)
        live = cfg.reasoning_streams
        cancelled = False
        fault, fault_after = next(
            ((k, n) for k, n, prefix in self.faults if cfg.session_id.startswith(prefix)), ("", 0)
        )
        sent_tokens = 0
        checks = CancelPoll(self.engine)
        try:
            while live:
                if fault and sent_tokens >= fault_after:
                    self._inject_fault(fault, esid, cfg.session_id, reply.out)
                    return
                try:
                    ev = q.get(timeout=POLL_S)
                except queue.Empty:
                    ev = None
                if not cancelled and checks.due() and self._cancel_asked(reply.out, cfg.session_id):
                    cancelled = True
                    self.engine.cancel(esid)
                if ev is None:
                    continue
                if ev.finished:
                    live -= 1
                    if ev.finish_reason == "error":
                        raise RuntimeError(ev.error or f"{ev.stream} failed")
                group = pump.push(
                    ev.stream, ev.text, list(ev.token_ids), ev.finish_reason if ev.finished else None
                )
                if group is None or cancelled and not ev.finished:
                    continue
                reply.send(
                    ReasoningDelta(group.stream, group.text, group.ids, group.finish_reason or ""),
                    group.timing,
                )
                sent_tokens += len(group.ids)
        finally:
            self.engine.cancel(esid)  # no-op once ended; frees the slot on any error path
            self.mailbox.clear_reasoning_cancel(cfg.session_id)
        reply.finish()

    def _cancel_asked(self, out: Responder, session_id: str) -> bool:
        return out.cancelled() or self.closing.is_set() or self.mailbox.reasoning_cancelled(session_id)

    def _inject_fault(self, fault: str, esid: str, session_id: str, out: Responder) -> None:
        """The configured fault: fail with an error, or go silent until the caller cancels."""
        self.engine.cancel(esid)
        if fault == "error_after":
            raise RuntimeError("injected fault (fault_injection=error_after)")
        while not self._cancel_asked(out, session_id):
            time.sleep(POLL_S)  # hang_after: sends nothing more; decode's watchdog must notice
        out.finish()
