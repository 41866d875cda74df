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
works too. Either stops the streams within one step and frees the KV slot.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Any

import torch
import torch.utils.dlpack

from backend.engine import EngineBusyError, StreamEvent, StreamSpec
from backend.serving.instance import (
    StatsPoller,
    build_engine,
    cancel_check_interval,
    enable_crash_traces,
    instance_parameters,
)
from backend.serving.metrics import ServingMetrics
from backend.serving.reasoning_wire import PACKET, ReasoningDelta, wants_packet
from backend.serving.request import REASONING_PREAMBLES, RequestConfig
from backend.serving.session_control import Mailbox
from backend.serving.tensors import (
    REASONING_OUTPUTS,
    Responder,
    StreamClock,
    delta_tensors,
    input_ids,
    prompt_state,
    request_json,
)

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

POLL_S = 0.02
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


def send_delta(
    out: Responder, as_packet: bool, delta: ReasoningDelta, timing: tuple[float, float] = (0.0, 0.0)
) -> None:
    """Sends one delta: as the BF16 packet to decode's BLS call, as tensors to anyone else.

    Why two forms: see ``backend.serving.reasoning_wire`` (ordinary output tensors of a
    decoupled BLS response crash the caller's stub in Triton 2.51).
    """
    if as_packet:
        out.send([pb_utils.Tensor.from_dlpack(PACKET, torch.utils.dlpack.to_dlpack(delta.to_packet()))])
        return
    out.send(
        delta_tensors(
            stream=delta.stream,
            reasoning=delta.text,
            ids=delta.ids,
            finish_reason=delta.finish_reason or None,
            timing=timing,
            names=REASONING_OUTPUTS,
        )
    )


class ReasoningModel:
    """One engine per instance; one thread per request feeding its responses."""

    def initialize(self, args: dict[str, Any]) -> None:
        enable_crash_traces()
        params = instance_parameters(args)
        self.engine = build_engine(args)
        self.tokenizer = self.engine.tokenizer
        self.group_tokens = max(1, int(params.get("response_group_tokens", "1")))
        self.mailbox = Mailbox.for_args(args)
        self.metrics = ServingMetrics("reasoning", args.get("model_instance_name", "reasoning"))
        self.poller = StatsPoller(self.engine, self.metrics.engine_stats)
        self.preambles = [self.tokenizer.encode(p + "\n") for p in REASONING_PREAMBLES]
        # Comma-separated specs, the first whose prefix matches applies (tests only).
        self.faults = [parse_fault(f) for f in params.get("fault_injection", "").split(",") if f.strip()]

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            threading.Thread(
                target=self._serve, args=(request,), name="reasoning-session", daemon=True
            ).start()
        return None

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

    def _serve(self, request: Any) -> None:
        out = Responder(request)
        finished: set[str] = set()
        as_packet = wants_packet(request)  # decode's BLS call; decided once per request
        try:
            self._run(request, out, finished, as_packet)
        except Exception as e:  # noqa: BLE001 - every failure reaches the caller as an error
            if not isinstance(e, ValueError | KeyError | EngineBusyError):
                traceback.print_exc()
            self._fail_streams(request, out, finished, as_packet, f"reasoning failed: {e}")
        finally:
            self.poller.poll_now()

    def _fail_streams(
        self, request: Any, out: Responder, finished: set[str], as_packet: bool, message: str
    ) -> None:
        """Ends every open stream with a ``finish_reason: error`` delta carrying ``message``.

        Why data deltas and not an error response: on tritonserver 2.51 the error response
        (with the final flag) of a decoupled model called through BLS did not reach the
        caller's response iterator (measured: decode only noticed through its watchdog).
        Deltas always arrive, and decode forwards them as the stream's last delta.
        """
        try:
            n = RequestConfig.from_json(request_json(request)).reasoning_streams
        except Exception:  # noqa: BLE001 - an unreadable request: the plain error is all we have
            n = 0
        if n == 0:
            out.finish(error=message)
            return
        for name in (f"reasoning/{i}" for i in range(n)):
            if name not in finished:
                send_delta(out, as_packet, ReasoningDelta(name, f"[{message}]", [], "error"))
        out.finish()

    def _run(self, request: Any, out: Responder, finished: set[str], as_packet: bool) -> None:
        cfg = RequestConfig.from_json(request_json(request))
        if cfg.reasoning_streams == 0:
            out.finish()
            return
        ids = input_ids(request)
        kv, logits = prompt_state(request)
        q: queue.Queue[StreamEvent] = queue.Queue()
        esid = f"{cfg.session_id}.reasoning"
        self.engine.submit(
            ids,
            self.streams_for(cfg),
            attention="isolated",
            on_event=q.put,
            session_id=esid,
            prefix_kv=(kv, logits),
        )
        self.poller.poll_now()
        clock = StreamClock(cfg.arrival)
        live = cfg.reasoning_streams
        cancelled = False
        first: dict[str, float] = {}
        last: dict[str, float] = {}
        pending: dict[str, tuple[str, list[int]]] = {}
        fault, fault_after = next(
            ((k, n) for k, n, prefix in self.faults if cfg.session_id.startswith(prefix)), ("", 0)
        )
        sent_tokens = 0
        next_check = 0.0
        try:
            while live:
                if fault and sent_tokens >= fault_after:
                    self._inject_fault(fault, esid, cfg.session_id, out)
                    return
                try:
                    ev = q.get(timeout=POLL_S)
                except queue.Empty:
                    ev = None
                now_m = time.monotonic()
                if not cancelled and now_m >= next_check:
                    next_check = now_m + cancel_check_interval(self.engine)
                    if out.cancelled() or self.mailbox.reasoning_cancelled(cfg.session_id):
                        cancelled = True
                        self.engine.cancel(esid)
                if ev is None:
                    continue
                if ev.finished:
                    live -= 1
                now = time.time()
                if ev.token_ids:
                    if ev.stream not in first:
                        first[ev.stream] = now
                        self.metrics.ttft("reasoning", (now - clock.arrival) * 1000.0)
                    else:
                        self.metrics.inter_token(
                            "reasoning", (now - last[ev.stream]) * 1000.0 / len(ev.token_ids)
                        )
                    last[ev.stream] = now
                    self.metrics.tokens("reasoning", len(ev.token_ids))
                text, pend_ids = pending.get(ev.stream, ("", []))
                text, pend_ids = text + ev.text, pend_ids + list(ev.token_ids)
                if cancelled and not ev.finished:
                    continue
                if ev.finished and ev.finish_reason == "error":
                    raise RuntimeError(ev.error or f"{ev.stream} failed")
                if ev.finished or len(pend_ids) >= self.group_tokens:
                    delta = ReasoningDelta(
                        ev.stream, text, pend_ids, (ev.finish_reason or "") if ev.finished else ""
                    )
                    send_delta(out, as_packet, delta, clock.stamp(ev.stream))
                    sent_tokens += len(pend_ids)
                    text, pend_ids = "", []
                    if ev.finished:
                        finished.add(ev.stream)
                pending[ev.stream] = (text, pend_ids)
        finally:
            self.engine.cancel(esid)  # no-op once ended; frees the slot on any error path
            self.mailbox.clear_reasoning_cancel(cfg.session_id)
        out.finish()

    def _inject_fault(self, fault: str, esid: str, session_id: str, out: Responder) -> None:
        """The configured fault: fail with an error, or go silent until the caller cancels."""
        self.engine.cancel(esid)
        if fault == "error_after":
            raise RuntimeError("injected fault (fault_injection=error_after)")
        while not (out.cancelled() or self.mailbox.reasoning_cancelled(session_id)):
            time.sleep(POLL_S)  # hang_after: sends nothing more; decode's watchdog must notice
        out.finish()

    def finalize(self) -> None:
        self.poller.stop()
        self.metrics.close()
        self.engine.shutdown()


__all__ = ["ReasoningModel", "instance_parameters"]
