"""Triton model ``decode`` (decoupled): the user-facing I/O loop of a session.

Why it looks like this (DESIGN §3): an ensemble may have only one decoupled producer, so
``decode`` both streams the answer and reaches the ``reasoning`` model through BLS. The
BLS responses are consumed on a background thread and merged into one queue with the
engine's events; the loop forwards whatever arrives first, so the answer never waits on
reasoning. Per request:

1. import the prompt KV from ``prefill`` (``Engine.submit(prefix_kv=...)``): no recompute;
2. start reasoning through BLS when ``reasoning_streams > 0``;
3. loop: engine deltas -> responses (every ``response_group_tokens`` tokens), reasoning
   deltas -> their own responses (``text_output`` "" + ``reasoning_output``), mailbox
   messages -> ``Engine.inject`` (User channel) or cancel, ``is_cancelled()`` -> cancel;
4. in ``cross`` mode reasoning tokens are also injected into the answer's session as
   external channels; with ``sync: "revise"`` a ``revision`` stream follows once reasoning
   is done, conditioned on the reasoning text (the sync point for ordinary checkpoints);
5. the final flag always goes out, with an error response if anything failed: never a hang.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from backend.engine import Engine, EngineBusyError, StreamEvent, StreamSpec
from backend.serving.instance import (
    StatsPoller,
    build_engine,
    cancel_check_interval,
    enable_crash_traces,
    instance_parameters,
)
from backend.serving.metrics import ServingMetrics
from backend.serving.reasoning_wire import PACKET, DeferredRelease, ReasoningDelta
from backend.serving.request import RequestConfig
from backend.serving.session_control import Mailbox
from backend.serving.tensors import (
    Responder,
    StreamClock,
    delta_tensors,
    input_ids,
    prompt_state,
    request_json,
)
from backend.tokenizer import Tokenizer

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

#: How often the loop wakes without events to poll cancellation and the mailbox (s).
POLL_S = 0.02
#: After a cancel, how long to wait for the engine and reasoning to confirm (s).
CANCEL_GRACE_S = 5.0
#: Default of the ``reasoning_timeout_s`` parameter: a live BLS call to ``reasoning`` that
#: sends nothing for this long is given up (its streams end with ``finish_reason: error``).
REASONING_TIMEOUT_S = 120.0


def revision_prompt(tokenizer: Tokenizer, question: str, notes: dict[str, str]) -> list[int]:
    """The prompt of the ``revision`` stream: the question, with the reasoning as context.

    An ordinary checkpoint cannot read reasoning through cross-stream attention, so the
    sync point hands it over as text, the way a chat model is used to seeing notes.
    """
    body = "\n\n".join(f"[{name}]\n{text.strip()}" for name, text in sorted(notes.items()) if text.strip())
    messages = [
        {
            "role": "system",
            "content": "You are a helpful AI assistant. Use these notes from your own earlier "
            "reasoning to give a better final answer.\n\n" + body,
        },
        {"role": "user", "content": question},
    ]
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


@dataclass
class _StreamState:
    """What one user-facing stream has produced, and its not-yet-sent group."""

    text: str = ""
    ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    pending_ids: list[int] = field(default_factory=list)
    first_t: float | None = None
    last_t: float | None = None
    finish_reason: str | None = None


class _Session:
    """One request's decode loop (runs on its own thread)."""

    def __init__(self, model: DecodeModel, request: Any, out: Responder):
        self.model = model
        self.engine: Engine = model.engine
        self.out = out
        self.cfg = RequestConfig.from_json(request_json(request))
        self.ids = input_ids(request)
        self.kv, self.logits = prompt_state(request)
        self.request = request
        self.sid = self.cfg.session_id
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.clock = StreamClock(self.cfg.arrival)
        self.streams: dict[str, _StreamState] = {}
        self.reasoning_text: dict[str, str] = {}
        self.reasoning_ids: dict[str, int] = {}
        self.engine_sids: list[str] = []
        self.cancelled = False
        self.cancel_deadline = 0.0
        self.error: str | None = None
        self.reasoning_live = False
        #: Reasoning streams that sent their final delta (or were ended with an error here).
        self.reasoning_finished: set[str] = set()
        self.reasoning_seen = time.monotonic()

    # ------------------------------------------------------------------ setup
    def _submit(self, prompt: list[int], name: str, engine_sid: str, prefix: Any = None) -> None:
        streams = [StreamSpec(name=name, kind="output", sampling=self.cfg.output_sampling())]
        if name == "output" and self.cfg.attention_mode == "cross":
            streams += [
                StreamSpec(name=f"reasoning/{i}", kind="reasoning", external=True)
                for i in range(self.cfg.reasoning_streams)
            ]
        self.streams[name] = _StreamState()
        self.engine.submit(
            prompt,
            streams,
            attention=self.cfg.attention_mode if name == "output" else "isolated",
            on_event=lambda ev: self.q.put(("engine", ev)),
            session_id=engine_sid,
            prefix_kv=prefix,
        )
        self.engine_sids.append(engine_sid)

    def _start_reasoning(self) -> None:
        """BLS to ``reasoning``, iterated on a daemon thread that feeds the shared queue."""
        request = self.request
        inputs = [
            pb_utils.get_input_tensor_by_name(request, n)
            for n in ("input_ids", "request_json", "prompt_kv", "prompt_logits")
        ]

        def consume() -> None:
            responses = None
            try:
                # Only the BF16 packet: any other output tensor of a decoupled BLS response
                # crashes this stub (backend/serving/reasoning_wire.py).
                bls = pb_utils.InferenceRequest(
                    model_name=self.model.reasoning_model,
                    requested_output_names=[PACKET],
                    inputs=inputs,
                )
                responses = bls.exec(decoupled=True)
                for resp in responses:
                    if resp.has_error():
                        self.q.put(("reasoning_error", resp.error().message()))
                        continue
                    packet = pb_utils.get_output_tensor_by_name(resp, PACKET)
                    if packet is None:  # the flags-only final response
                        continue
                    delta = ReasoningDelta.from_packet(torch.from_dlpack(packet.to_dlpack()))
                    self.q.put(("reasoning", (delta.stream, delta.text, delta.ids, delta.finish_reason)))
            except Exception as e:  # noqa: BLE001 - reported to the client, never a hang
                self.q.put(("reasoning_error", f"reasoning failed: {e}"))
            finally:
                if responses is not None:
                    # Python must drop the finished iterator last, with the GIL, after the
                    # stub's cleanup thread has dropped its own: reasoning_wire.DeferredRelease.
                    self.model.release_later.keep(responses)
                    responses = None
                self.q.put(("reasoning_done", None))

        threading.Thread(target=consume, name=f"bls-{self.sid[:8]}", daemon=True).start()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        cfg = self.cfg
        mailbox = self.model.mailbox
        mailbox.register(self.sid)
        try:
            self._submit(self.ids, "output", self.sid, prefix=(self.kv, self.logits))
            self.model.poller.poll_now()  # the gauges show the session at once, not a period later
            self.kv = self.logits = None  # the engine holds them until admission
            self.reasoning_live = cfg.reasoning_streams > 0
            if self.reasoning_live:
                self._start_reasoning()
            revision_pending = cfg.sync == "revise"
            next_poll = 0.0
            while True:
                live = [n for n, st in self.streams.items() if st.finish_reason is None]
                if not live and not self.reasoning_live:
                    if revision_pending and not self.cancelled and self.error is None:
                        revision_pending = False
                        prompt = revision_prompt(self.model.tokenizer, cfg.text, self.reasoning_text)
                        self._submit(prompt, "revision", f"{self.sid}.revision")
                        continue
                    break
                if self.cancelled and time.monotonic() > self.cancel_deadline:
                    self._reasoning_failed("cancelled", reason="cancelled")
                    break
                try:
                    kind, item = self.q.get(timeout=POLL_S)
                except queue.Empty:
                    kind, item = "", None
                now = time.monotonic()
                if now >= next_poll:
                    next_poll = now + cancel_check_interval(self.engine)
                    if not self.cancelled and self.out.cancelled():
                        self._cancel()
                    if not self.cancelled:
                        self._poll_mailbox()
                    timeout = self.model.reasoning_timeout_s
                    if self.reasoning_live and now - self.reasoning_seen > timeout:
                        self._reasoning_failed(f"reasoning timed out: no response for {timeout:g}s")
                if kind == "engine":
                    self._on_engine(item)
                elif kind == "reasoning":
                    self.reasoning_seen = now
                    self._on_reasoning(*item)
                elif kind == "reasoning_error":
                    self._reasoning_failed(item)
                elif kind == "reasoning_done":
                    # Every stream the client saw gets its final delta, even if the BLS call
                    # ended without one (an instance that died, a cancel it never confirmed).
                    if self.cancelled:
                        self._reasoning_failed("cancelled", reason="cancelled")
                    else:
                        self._reasoning_failed("reasoning ended without a final delta")
        finally:
            mailbox.unregister(self.sid)
            for esid in self.engine_sids:
                self.engine.cancel(esid)  # no-op for ended sessions; frees KV on any error path
            if cfg.reasoning_streams and not self.reasoning_live:
                mailbox.clear_reasoning_cancel(self.sid)  # reasoning has ended: no stale flag
        self._finish()

    def _cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.cancel_deadline = time.monotonic() + CANCEL_GRACE_S
        for esid in self.engine_sids:
            self.engine.cancel(esid)
        if self.cfg.reasoning_streams:
            self.model.mailbox.cancel_reasoning(self.sid)

    def _reasoning_failed(self, message: str, reason: str = "error") -> None:
        """Ends every open reasoning stream with ``finish_reason`` ``reason``; the answer goes on.

        Why not fail the request: reasoning is background work. A reasoning instance that
        crashed, timed out or was too busy must not take the user-facing answer with it; the
        client sees which streams failed (and why, in that delta's ``reasoning_output``).
        Also used with ``reason="cancelled"`` when a cancelled reasoning call did not confirm
        in time, so every stream the client saw still gets its final delta.
        """
        self.reasoning_live = False
        names = [f"reasoning/{i}" for i in range(self.cfg.reasoning_streams)]
        open_streams = [n for n in names if n not in self.reasoning_finished]
        if not open_streams:
            return
        self.model.mailbox.cancel_reasoning(self.sid)  # stops a reasoning session still running
        for name in open_streams:
            self.reasoning_finished.add(name)
            if self.cfg.stream:
                self.out.send(
                    delta_tensors(
                        stream=name,
                        reasoning=f"[{message}]" if reason == "error" else "",
                        finish_reason=reason,
                        session_id=self.sid,
                        timing=self.clock.stamp(name),
                    )
                )

    def _poll_mailbox(self) -> None:
        for action, text in self.model.mailbox.poll(self.sid):
            if action == "cancel":
                self._cancel()
                return
            if action == "input" and text:
                ids = self.model.tokenizer.encode(text)
                for esid in self.engine_sids:
                    try:
                        self.engine.inject(esid, ids, "user")
                    except KeyError:
                        pass  # that stream already ended

    # ------------------------------------------------------------------ events
    def _on_engine(self, ev: StreamEvent) -> None:
        cfg = self.cfg
        if ev.kind == "user":
            # Echo of the User channel: proves to the client which row read its input.
            if cfg.stream and not self.cancelled:
                self.out.send(
                    delta_tensors(
                        stream="user", ids=ev.token_ids, session_id=self.sid, timing=self.clock.stamp("user")
                    )
                )
            return
        st = self.streams.get(ev.stream)
        if st is None or st.finish_reason is not None:
            return  # external reasoning channels of a cross session end with it: nothing to send
        now = time.time()
        metrics = self.model.metrics
        if ev.token_ids:
            if st.first_t is None:
                st.first_t = now
                metrics.ttft("output", (now - self.clock.arrival) * 1000.0)
            elif st.last_t is not None:
                metrics.inter_token("output", (now - st.last_t) * 1000.0 / len(ev.token_ids))
            st.last_t = now
            metrics.tokens("output", len(ev.token_ids))
        st.text += ev.text
        st.ids += ev.token_ids
        st.pending_text += ev.text
        st.pending_ids += ev.token_ids
        if ev.finished:
            st.finish_reason = ev.finish_reason
            if ev.finish_reason == "error":
                self.error = self.error or ev.error or f"stream {ev.stream} failed"
        if not cfg.stream or self.cancelled and not ev.finished:
            return
        if ev.finished or len(st.pending_ids) >= self.model.group_tokens:
            self.out.send(
                delta_tensors(
                    stream=ev.stream,
                    text=st.pending_text,
                    ids=st.pending_ids,
                    finish_reason=st.finish_reason,
                    session_id=self.sid,
                    timing=self.clock.stamp(ev.stream),
                )
            )
            st.pending_text, st.pending_ids = "", []

    def _on_reasoning(self, stream: str, text: str, ids: list[int], finish_reason: str) -> None:
        if stream in self.reasoning_finished:
            return  # already ended here (failed / timed out): late deltas are dropped
        if finish_reason:
            self.reasoning_finished.add(stream)
        self.reasoning_text[stream] = self.reasoning_text.get(stream, "") + text
        self.reasoning_ids[stream] = self.reasoning_ids.get(stream, 0) + len(ids)
        if self.cancelled and not finish_reason:
            return  # after a cancel only the final ("cancelled") delta still goes out
        if (
            not self.cancelled
            and self.cfg.attention_mode == "cross"
            and ids
            and self.streams["output"].finish_reason is None
        ):
            try:
                self.engine.inject(self.sid, ids, stream)
            except KeyError:
                pass
        if self.cfg.stream:
            self.out.send(
                delta_tensors(
                    stream=stream,
                    reasoning=text,
                    ids=ids,
                    finish_reason=finish_reason or None,
                    session_id=self.sid,
                    timing=self.clock.stamp(stream),
                )
            )

    # ------------------------------------------------------------------ end
    def _finish(self) -> None:
        cfg = self.cfg
        if self.error is not None:
            self.out.finish(error=self.error)
            return
        if cfg.stream:
            self.out.finish()
            return
        # stream=false: one response with the final user-facing text (the revision if any).
        name = "revision" if "revision" in self.streams else "output"
        st = self.streams.get(name, _StreamState())
        text = st.text if cfg.exclude_input_in_output else cfg.text + st.text
        reasoning = "\n\n".join(self.reasoning_text[k] for k in sorted(self.reasoning_text))
        reason = "cancelled" if self.cancelled else st.finish_reason
        timing = self.clock.stamp(name)
        self.out.finish(
            delta_tensors(
                stream=name,
                text=text,
                reasoning=reasoning,
                ids=st.ids,
                finish_reason=reason,
                session_id=self.sid,
                timing=timing,
            )
        )


class DecodeModel:
    """Triton model ``decode``: one thread per request, one shared engine per instance."""

    def initialize(self, args: dict[str, Any]) -> None:
        enable_crash_traces()
        params = instance_parameters(args)
        self.engine = build_engine(args)
        self.tokenizer = self.engine.tokenizer
        self.group_tokens = max(1, int(params.get("response_group_tokens", "1")))
        self.reasoning_model = params.get("reasoning_model", "reasoning")
        self.reasoning_timeout_s = float(params.get("reasoning_timeout_s", str(REASONING_TIMEOUT_S)))
        self.mailbox = Mailbox.for_args(args)
        self.metrics = ServingMetrics("decode", args.get("model_instance_name", "decode"))
        self.poller = StatsPoller(self.engine, self.metrics.engine_stats)
        self.release_later = DeferredRelease()

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            threading.Thread(target=self._serve, args=(request,), name="decode-session", daemon=True).start()
        return None

    def _serve(self, request: Any) -> None:
        out = Responder(request)
        try:
            _Session(self, request, out).run()
        except Exception as e:  # noqa: BLE001 - every failure reaches the client as an error
            clean = isinstance(e, ValueError | KeyError | EngineBusyError)
            msg = str(e) if clean else f"decode failed: {e!r}"
            if not clean:
                traceback.print_exc()
            out.finish(error=msg)
        finally:
            self.poller.poll_now()

    def finalize(self) -> None:
        self.poller.stop()
        self.metrics.close()
        self.engine.shutdown()
        self.release_later.clear()
