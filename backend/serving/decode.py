"""Triton model ``decode`` (decoupled): the user-facing I/O loop of a session.

Why it looks like this (DESIGN.md §1, the ensemble): an ensemble may have only one
decoupled producer, so ``decode`` both streams the answer and reaches the ``reasoning``
model through BLS (:class:`~backend.serving.reasoning_wire.ReasoningCall`, the one seam).
The BLS deltas and the engine's events meet in one queue; the loop forwards whatever
arrives first, so the answer never waits on reasoning. Per request:

1. import the prompt KV from ``prefill`` (``backend.serving.handoff``): no recompute;
2. start reasoning through BLS when ``reasoning_streams > 0``;
3. loop: engine deltas -> responses (every ``response_group_tokens`` tokens), reasoning
   deltas -> their own responses (``text_output`` "" + ``reasoning_output``), mailbox
   messages -> ``Engine.inject`` (User channel) or cancel, read as soon as the mailbox's
   doorbell rings (so a cancel reaches the engine at once and the session ends at the next
   step boundary), ``is_cancelled()`` -> cancel;
4. in ``cross`` mode reasoning tokens are also injected into the answer's session as
   external channels; with ``sync: "revise"`` a ``revision`` stream follows once reasoning
   is done, conditioned on the reasoning text (the sync point for ordinary checkpoints);
5. the final flag always goes out, with an error response if anything failed: never a hang.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import numpy as np

from backend.engine import StreamEvent, StreamSpec
from backend.engine.layout import StreamLayout, user_tokens
from backend.engine.session import answer_index, answer_specs, answer_stream
from backend.serving import handoff
from backend.serving.engine_model import EngineModel
from backend.serving.hop_trace import HopTrace
from backend.serving.pump import POLL_S, CancelPoll, Group, StreamPump
from backend.serving.reasoning_wire import ReasoningCall, ReasoningDelta
from backend.serving.reply_channel import DeferredRelease
from backend.serving.request import RequestConfig
from backend.serving.session_control import Doorbell, Mailbox
from backend.serving.tensors import Responder, delta_tensors, input_ids, request_json
from backend.serving.top_logprobs import top_arrays
from backend.tokenizer import Tokenizer

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


class DecodeRequest:
    """One request's decode loop (runs on its own thread)."""

    def __init__(self, model: DecodeModel, request: Any, out: Responder, cfg: RequestConfig | None = None):
        self.model = model
        self.engine = model.engine
        self.out = out
        self.request = request
        self.cfg = cfg if cfg is not None else RequestConfig.from_json(request_json(request))
        self.ids = input_ids(request)
        self.prefix: handoff.PrefixKV | None = handoff.from_request(request, model.vocab_size)
        self.sid = self.cfg.session_id
        self.q: queue.Queue[tuple[str, Any]] = queue.Queue()
        # A token's log probability goes with that token's own text (OpenAI's
        # ``logprobs.content[i].token``), so a request that asks for them gets one token per
        # response: never grouped (``response_group_tokens``) nor coalesced when the loop
        # falls behind (``_on_engine_batch``).
        self.per_token = self.cfg.return_log_probs
        self.pump = StreamPump(
            "output", model.metrics, self.cfg.arrival, 1 if self.per_token else model.group_tokens
        )
        self.trace = HopTrace(self.sid)  # bench.hops: per-response hop timestamps, off by default
        self.engine_sids: list[str] = []
        self.cancelled = False
        self.cancel_deadline = 0.0
        self.error: str | None = None
        # The paper's grid computes its thinking channels in the same session: nothing over BLS.
        names = (
            [f"reasoning/{i}" for i in range(self.cfg.reasoning_streams)]
            if self.cfg.layout != "paper"
            else []
        )
        self.reasoning = ReasoningCall(
            names,
            post=self.q.put,
            give_up=lambda: model.mailbox.cancel_reasoning(self.sid),
            timeout_s=model.reasoning_timeout_s,
        )
        self.reasoning_text: dict[str, str] = {}
        #: The stream whose text a ``stream=false`` response carries: the revision if any.
        self.final_stream = "output"
        #: The answers' engine streams (``num_return_sequences`` k: ``output``, ``output/1``, ...).
        self.answers = [answer_stream(i) for i in range(self.cfg.num_return_sequences)]

    # ------------------------------------------------------------------ setup
    def _submit(self, prompt: list[int], name: str, engine_sid: str, prefix: Any = None) -> None:
        """One engine session: the answer (``num_return_sequences`` k: k answer streams of this
        one session, sharing its slot and prompt KV, seeded ``seed + i``), or the revision."""
        sampling = self.cfg.output_sampling()
        if name == "output":
            streams = answer_specs(sampling, self.cfg.num_return_sequences)
        else:
            streams = [StreamSpec(name=name, kind="output", sampling=sampling)]
        for spec in streams:
            self.pump.open(spec.name)
        if name == "output" and self.cfg.attention_mode == "cross":
            streams += [
                StreamSpec(name=f"reasoning/{i}", kind="reasoning", external=True)
                for i in range(self.cfg.reasoning_streams)
            ]
        self.final_stream = name
        self.engine.submit(
            prompt,
            streams,
            attention=self.cfg.attention_mode if name == "output" else "isolated",
            on_event=lambda ev: self.q.put(("engine", ev)),
            session_id=engine_sid,
            prefix_kv=prefix,
        )
        self.engine_sids.append(engine_sid)

    def _start(self) -> None:
        """Submits the request's first session: the answer, from the imported prompt KV."""
        self._submit(self.ids, "output", self.sid, prefix=self.prefix)

    def _live(self) -> bool:
        """Some stream the client waits for has not ended yet."""
        return bool(self.pump.live()) or self.reasoning.live

    def _input_ids(self, text: str) -> list[int]:
        """Tokens of text pushed through ``session_control`` (``input``)."""
        return self.model.tokenizer.encode(text)

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        cfg = self.cfg
        mailbox = self.model.mailbox
        doorbell = self.model.doorbell
        if doorbell is not None:
            doorbell.subscribe(self.sid, lambda: self.q.put(("mail", None)))
        try:
            mailbox.register(self.sid, doorbell)
        except BaseException:
            if doorbell is not None:
                doorbell.unsubscribe(self.sid)
            raise
        try:
            self._start()
            self.prefix = None  # the engine holds it until admission
            self.model.poller.poll_now()  # the gauges show the session at once, not a period later
            if self.reasoning.live:
                self.reasoning.start(self.request, self.model.reasoning_model, self.model.release_later)
            revision_pending = cfg.sync == "revise"
            checks = CancelPoll(self.engine)
            while True:
                if not self._live():
                    if revision_pending and not self.cancelled and self.error is None:
                        revision_pending = False
                        prompt = revision_prompt(self.model.tokenizer, cfg.text, self.reasoning_text)
                        self._submit(prompt, "revision", f"{self.sid}.revision")
                        continue
                    break
                if self.cancelled and time.monotonic() > self.cancel_deadline:
                    self._forward_reasoning(self.reasoning.fail("cancelled", "cancelled"))
                    break
                try:
                    kind, item = self.q.get(timeout=POLL_S)
                except queue.Empty:
                    kind, item = "", None
                if checks.due():
                    if not self.cancelled and (self.out.cancelled() or self.model.closing.is_set()):
                        self._cancel()
                    if not self.cancelled:
                        self._poll_mailbox()
                    self._forward_reasoning(self.reasoning.check())
                if kind == "engine":
                    kind, item = self._on_engine_batch(item)
                if kind == "reasoning":
                    self._forward_reasoning(self.reasoning.receive(item))
                elif kind == "mail" and not self.cancelled:
                    self._poll_mailbox()  # the doorbell rang: a cancel goes to the engine now
        finally:
            self.trace.close()
            if doorbell is not None:
                doorbell.unsubscribe(self.sid)
            mailbox.unregister(self.sid)
            if self.cancelled:
                self.trace.cancel("unregistered")
            for esid in self.engine_sids:
                self.engine.cancel(esid)  # no-op for ended sessions; frees KV on any error path
            if cfg.reasoning_streams and not self.reasoning.live:
                mailbox.clear_reasoning_cancel(self.sid)  # reasoning has ended: no stale flag
        self._finish()

    def _cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        self.cancel_deadline = time.monotonic() + CANCEL_GRACE_S
        for esid in self.engine_sids:
            self.engine.cancel(esid)
        self.trace.cancel("decode_read")  # the engine has it: the session ends at this step's end
        self.reasoning.cancel()

    def _poll_mailbox(self) -> None:
        for action, text in self.model.mailbox.poll(self.sid):
            if action == "cancel":
                self._cancel()
                return
            if action == "input" and text:
                ids = self._input_ids(text)
                for esid in self.engine_sids:
                    try:
                        self.engine.inject(esid, ids, "user")
                    except KeyError:
                        pass  # that stream already ended

    # ------------------------------------------------------------------ events
    def _send(
        self,
        stream: str,
        *,
        text: str = "",
        reasoning: str = "",
        ids: list[int] | None = None,
        finish_reason: str | None = None,
        timing: tuple[float, float] | None = None,
        logprobs: tuple[list[float], float] | None = None,
        stats: list[tuple[float, float]] | None = None,
        top: tuple[np.ndarray, ...] | None = None,
    ) -> None:
        t0 = time.monotonic()
        name, sequence = self._client_stream(stream)
        self.out.send(
            delta_tensors(
                stream=name,
                text=text,
                reasoning=reasoning,
                ids=ids or [],
                finish_reason=finish_reason,
                session_id=self.sid,
                timing=timing if timing is not None else self.pump.stamp(stream),
                prompt_tokens=self.cfg.prompt_tokens,
                logprobs=logprobs,
                stats=stats,
                top=top,
                sequence=sequence,
            )
        )
        self.trace.sent(stream, len(ids or []), t0, time.monotonic())

    def _client_stream(self, stream: str) -> tuple[str, int | None]:
        """The ``stream_name`` and ``sequence_index`` a client sees for an engine stream.

        With k > 1 answers every answer is ``output`` under its own ``sequence_index`` (as
        TensorRT-LLM tags sequences); what the answers share (reasoning, the User echo) is
        filed under sequence 0. With one answer no ``sequence_index`` is sent."""
        if len(self.answers) == 1:
            return stream, None
        index = answer_index(stream)
        return ("output", index) if index is not None else (stream, 0)

    def _on_engine_batch(self, first: StreamEvent) -> tuple[str, Any]:
        """``first`` and every engine event already queued behind it, as one response per
        stream. Why: when this thread falls behind the engine (many sessions on few cores),
        the tokens that piled up go out together instead of one IPC send each, which is what
        made it fall behind; a loop that keeps up sends every token on its own, as before.
        Returns the non-engine item that ended the drain (``("", None)`` if none), for the
        loop to handle next."""
        batch = [first]
        follow: tuple[str, Any] = ("", None)
        while True:
            try:
                kind, item = self.q.get_nowait()
            except queue.Empty:
                break
            if kind != "engine":
                follow = (kind, item)
                break
            batch.append(item)
        touched: list[str] = []
        for ev in batch:
            self.trace.dequeued(ev.t)
            self._on_engine(ev, hold=not self.per_token)
            if ev.stream not in touched:
                touched.append(ev.stream)
        for stream in touched:  # what hold kept back, one response per stream
            group = self._pump_of(stream).due(stream)
            if not self.cancelled:
                self._send_group(group)
        return follow

    def _pump_of(self, stream: str) -> StreamPump:
        """The pump that groups ``stream``'s deltas."""
        return self.pump

    def _on_engine(self, ev: StreamEvent, hold: bool = False) -> None:
        if ev.kind == "user":
            # Echo of the User channel: proves to the client which row read its input.
            if self.cfg.stream and not self.cancelled:
                self._send("user", ids=list(ev.token_ids))
            return
        if self.pump.finished(ev.stream) or ev.stream.startswith("reasoning/"):
            return  # external reasoning channels of a cross session end with it: nothing to send
        reason = ev.finish_reason if ev.finished else None
        if ev.token_ids and ev.stream == self.final_stream:
            self.trace.token(ev.t)
        if reason == "cancelled":
            self.trace.cancel("engine_ended", ev.t)
        group = self.pump.push(
            ev.stream, ev.text, list(ev.token_ids), reason, ev.logprobs, ev.top_logprobs, hold=hold
        )
        if ev.finished and ev.finish_reason == "error":
            self.error = self.error or ev.error or f"stream {ev.stream} failed"
        if self.cancelled and not ev.finished:
            return
        self._send_group(group)

    def _send_group(self, group: Group | None) -> None:
        """One response for a pump group (streaming requests only)."""
        if group is None or not self.cfg.stream:
            return
        self._send(
            group.stream,
            text=group.text,
            ids=group.ids,
            finish_reason=group.finish_reason,
            timing=group.timing,
            logprobs=group.logprobs if self.cfg.return_log_probs else None,
            top=self._top(group.top),
        )

    def _top(self, top: list[tuple[list[int], list[float]]]) -> tuple[np.ndarray, ...] | None:
        """The ``top_logprobs_*`` outputs of these tokens, when the request asked for them."""
        if not self.cfg.top_logprobs:
            return None
        return top_arrays(top, self.cfg.top_logprobs, self.model.tokenizer)

    def _forward_reasoning(self, deltas: list[ReasoningDelta]) -> None:
        for d in deltas:
            self.reasoning_text[d.stream] = self.reasoning_text.get(d.stream, "") + d.text
            if self.cancelled and not d.finish_reason:
                continue  # after a cancel only the final ("cancelled") delta still goes out
            if (
                not self.cancelled
                and self.cfg.attention_mode == "cross"
                and d.ids
                and not all(self.pump.finished(a) for a in self.answers)
            ):
                try:
                    self.engine.inject(self.sid, d.ids, d.stream)
                except KeyError:
                    pass
            if self.cfg.stream:
                self._send(d.stream, reasoning=d.text, ids=d.ids, finish_reason=d.finish_reason or None)

    # ------------------------------------------------------------------ end
    def _finish(self) -> None:
        cfg = self.cfg
        if self.error is not None:
            self.out.finish(error=self.error)
            return
        if cfg.stream:
            self.out.finish()
            return
        # stream=false: one response with the final user-facing text (the revision if any);
        # k > 1 answers: one response per answer, tagged sequence_index, the last one final
        # (TensorRT-LLM answers one result per sequence). Each carries the shared reasoning.
        names = self.answers if len(self.answers) > 1 else [self.final_stream]
        reasoning = "\n\n".join(self.reasoning_text[k] for k in sorted(self.reasoning_text))
        for i, name in enumerate(names):
            text = self.pump.text(name)
            client_name, sequence = self._client_stream(name)
            tensors = delta_tensors(
                stream=client_name,
                text=text if cfg.exclude_input_in_output else cfg.text + text,
                reasoning=reasoning,
                ids=self.pump.ids(name),
                finish_reason="cancelled" if self.cancelled else self.pump.finish_reason(name),
                session_id=self.sid,
                timing=self.pump.stamp(name),
                prompt_tokens=self.cfg.prompt_tokens,
                logprobs=self.pump.logprobs(name) if cfg.return_log_probs else None,
                top=self._top(self.pump.top(name)),
                sequence=sequence,
            )
            if i == len(names) - 1:
                self.out.finish(tensors)
            else:
                self.out.send(tensors)


class GridRequest(DecodeRequest):
    """One request on the paper's stream layout: the whole grid is ONE engine session.

    Why not reasoning over BLS: in this layout the thinking channels must see Output's
    earlier rows and Output theirs (the block-causal mask the checkpoint was trained
    with), so they cannot live in another session or another process. Every channel is
    computed; ``reasoning_streams`` only picks how many thinking channels the client sees
    (the first ones), as ``reasoning/<channel name>`` deltas in ``reasoning_output``.
    Silence is never sent as text. Pushed input joins channel 0's queue, tokenized as the
    paper tokenizes user text.
    """

    def __init__(self, model: DecodeModel, request: Any, out: Responder, cfg: RequestConfig | None = None):
        super().__init__(model, request, out, cfg)
        self.layout = StreamLayout(self.cfg.num_channels, self.cfg.silence_id)
        self.think = StreamPump("reasoning", model.metrics, self.cfg.arrival, model.group_tokens)
        shown = self.layout.thinking_channels[: self.cfg.reasoning_streams]
        self.shown = {self.layout.stream_name(c) for c in shown}
        self.pending_stats: dict[str, list[tuple[float, float]]] = {}

    def _start(self) -> None:
        cfg = self.cfg
        self.pump.open("output")
        for name in self.shown:
            self.think.open(name)
        self.engine.submit(
            self.layout.prefix(self.ids),
            self.layout.stream_specs(cfg.grid_sampling),
            attention="cross",
            on_event=lambda ev: self.q.put(("engine", ev)),
            session_id=self.sid,
            prefix_kv=self.prefix,
            rules=cfg.grid_rules(),
            user_ids=cfg.user_ids,
            channel_stats=cfg.return_channel_stats,
        )
        self.engine_sids.append(self.sid)

    def _live(self) -> bool:
        return bool(self.pump.live()) or bool(self.think.live())

    def _input_ids(self, text: str) -> list[int]:
        return user_tokens(self.model.tokenizer, text)

    def _on_engine(self, ev: StreamEvent, hold: bool = False) -> None:
        if ev.kind == "user":
            super()._on_engine(ev)
            return
        pump = self._pump_of(ev.stream)
        if ev.stream != "output" and ev.stream not in self.shown or pump.finished(ev.stream):
            return  # a thinking channel the client did not ask to see: computed, not sent
        if self.cfg.return_channel_stats:
            self.pending_stats.setdefault(ev.stream, []).extend(ev.stats)
        reason = ev.finish_reason if ev.finished else None
        # Log probabilities: Output's only (RequestConfig.grid_sampling), and only of the tokens
        # the client sees: the engine records none for a silence token (scheduler.update).
        group = pump.push(
            ev.stream, ev.text, list(ev.token_ids), reason, ev.logprobs, ev.top_logprobs, hold=hold
        )
        if ev.stream != "output":
            self.reasoning_text[ev.stream] = self.reasoning_text.get(ev.stream, "") + ev.text
        if ev.finished and ev.finish_reason == "error":
            self.error = self.error or ev.error or f"stream {ev.stream} failed"
        if self.cancelled and not ev.finished:
            return
        self._send_group(group)

    def _pump_of(self, stream: str) -> StreamPump:
        return self.pump if stream == "output" else self.think

    def _send_group(self, group: Group | None) -> None:
        """One response for a group of Output (``text_output``) or of a shown thinking channel."""
        if group is None or not self.cfg.stream:
            return
        stats = self.pending_stats.pop(group.stream, []) if self.cfg.return_channel_stats else None
        answer = group.stream == "output"
        text, reasoning = (group.text, "") if answer else ("", group.text)
        self._send(
            group.stream,
            text=text,
            reasoning=reasoning,
            ids=group.ids,
            finish_reason=group.finish_reason,
            timing=group.timing,
            stats=stats,
            logprobs=group.logprobs if answer and self.cfg.return_log_probs else None,
            top=self._top(group.top) if answer else None,
        )


class DecodeModel(EngineModel):
    """Triton model ``decode``: one thread per request, one shared engine per instance."""

    role = "decode"

    def setup(self, args: dict[str, Any]) -> None:
        self.reasoning_model = self.params.get("reasoning_model", "reasoning")
        self.reasoning_timeout_s = float(self.params.get("reasoning_timeout_s", str(REASONING_TIMEOUT_S)))
        self.mailbox = Mailbox.for_args(args)
        #: Rung by ``session_control`` (and tensorrt_llm_bls's watcher) after each message.
        self.doorbell = Doorbell.open()
        self.release_later = DeferredRelease()

    def serve(self, request: Any, out: Responder) -> None:
        cfg = RequestConfig.from_json(request_json(request))
        kind = GridRequest if cfg.layout == "paper" else DecodeRequest
        kind(self, request, out, cfg).run()

    def teardown(self) -> None:
        self.release_later.clear()
        if self.doorbell is not None:
            self.doorbell.close()
