"""The step scheduler: which tokens the next forward runs, and what its samples mean.

Pure Python, as nano-vllm's scheduler: it never touches a tensor. Each step is
``schedule() -> StepPlan`` (a row of every decoding session, then prompt chunks under the
step's token budget: continuous batching with chunked prefill), then the engine runs the
plan and samples, then ``update(plan, sampled)`` records the tokens, applies the stop rules
and returns the events to deliver. The KV pool is asked for positions (it writes their grid
coordinates itself); everything else here is ints, deques and the rules of the layout.

Rows. A decode row feeds, for each live stream, the token it sampled last (or the next
token of its preamble), plus the next pushed user token on the User channel. Every token of
a row has the row index as its position. In the paper's layout (``GridRules``) every
channel is present in every row: silence for one with nothing to say, finished or ablated.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backend.engine.errors import ContextLengthError, EngineError
from backend.engine.kv_cache import KVPool
from backend.engine.session import GridRules, Prefix, Session, Stream, StreamEvent, StreamSpec


@dataclass
class Sample:
    """One token to sample: from the logits of packed token ``index`` (or, for a session
    whose prefix was imported, of entry ``index`` of its imported last row)."""

    index: int
    session: Session
    stream: Stream
    row: int  # the row the sampled token will be fed into
    bias: tuple[tuple[int, float], ...] = ()


@dataclass
class Slice:
    """The packed tokens ``start .. start + count`` of one session, at cache index ``first``."""

    session: Session
    start: int
    count: int
    first: int
    prefill: bool


@dataclass
class StepPlan:
    """Everything one forward runs and everything its logits are for."""

    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    chans: list[int] = field(default_factory=list)
    embeds: list[int] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    #: Streams that take the next token of their preamble after this step (no sampling).
    forced: list[Stream] = field(default_factory=list)
    #: User tokens fed in this step: ``(session, token, row)`` (echoed to the client).
    echoes: list[tuple[Session, int, int]] = field(default_factory=list)
    #: ``prefill_export`` sessions whose prefix completed: the packed indices of its last row.
    exports: list[tuple[Session, list[int]]] = field(default_factory=list)
    #: Sessions whose prefix completed in this step (their streams start now).
    started: list[Session] = field(default_factory=list)
    #: Set when the plan starts a session whose prefix KV was imported: no forward runs,
    #: ``Sample.index`` points into that session's imported logits.
    imported: Session | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def logit_index(self) -> list[int]:
        """The packed tokens whose logits the plan needs, in order (the model computes only these)."""
        need = {s.index for s in self.samples}
        for _, idx in self.exports:
            need.update(idx)
        return sorted(need)

    def decoding(self) -> list[Session]:
        return [sl.session for sl in self.slices if not sl.prefill]


def required_positions(prefix: Prefix, specs: Sequence[StreamSpec], rules: GridRules | None) -> int:
    """KV positions a session may need at most (checked at submission, before any work)."""
    if rules is not None:
        return len(prefix) + rules.num_channels * rules.max_rows
    longest = max(len(s.preamble_ids) + (0 if s.external else s.sampling.max_tokens) for s in specs)
    # Rows are shared: the grid grows by one row per step, with one entry per live channel.
    return len(prefix) + sum(
        len(s.preamble_ids) + (longest if s.external else s.sampling.max_tokens) for s in specs
    )


def check_context(
    prefix: Prefix, specs: Sequence[StreamSpec], rules: GridRules | None, max_context: int
) -> None:
    """``ContextLengthError`` naming the limit, for a session that could outgrow the context."""
    if len(prefix) >= max_context:
        raise ContextLengthError(f"prompt is {len(prefix)} tokens, the context limit is {max_context}")
    if specs or rules is not None:
        need = required_positions(prefix, specs, rules)
        if need > max_context:
            what = "rows x channels" if rules is not None else "max_tokens of every stream"
            raise ContextLengthError(
                f"prompt ({len(prefix)} tokens) plus {what} needs {need} cache "
                f"positions, the context limit is {max_context}"
            )


class Scheduler:
    """Admission queue, active sessions, and the two halves of a step."""

    def __init__(
        self,
        pool: KVPool,
        *,
        max_step_tokens: int,
        prefill_chunk: int,
        eos_ids: set[int],
        on_admit: Callable[[Session], object] | None = None,
        block: int = 1,
    ):
        self.pool = pool
        #: Prompt chunks end on multiples of this (the prefix cache's block), where a cache hit
        #: also ends, so a token is computed with the same neighbours whether its prompt was
        #: cold, partly cached or cut by the step's budget (``LlamaModel._attention``).
        self.block = max(1, block)
        #: Called when a session (not imported) gets its slot, before its prefill is planned:
        #: the prefix cache fills the slot and advances ``session.prefilled`` past what it had.
        self.on_admit = on_admit
        self.max_step_tokens = max_step_tokens
        self.prefill_chunk = prefill_chunk
        self.eos_ids = eos_ids
        self.queue: collections.deque[Session] = collections.deque()
        self.active: dict[str, Session] = {}
        #: Ids of sessions that ended since the engine last drained this list.
        self.ended: list[str] = []
        self._pending_events: list[tuple[Session, StreamEvent]] = []

    # ------------------------------------------------------------------ admission
    def add(self, session: Session) -> None:
        self.queue.append(session)

    def find(self, sid: str) -> Session | None:
        return self.active.get(sid) or next((s for s in self.queue if s.id == sid), None)

    def admit(self) -> list[Session]:
        """Gives free KV slots to queued sessions; returns those whose prefix KV was imported
        (the engine copies it into the slot and starts them with :meth:`start_imported`)."""
        imported = []
        while self.queue and self.pool.free_slots:
            session = self.queue.popleft()
            session.slot = self.pool.allocate()
            self.active[session.id] = session
            if session.imported:
                imported.append(session)
            elif self.on_admit is not None:
                self.on_admit(session)
        return imported

    def start_imported(self, session: Session) -> StepPlan:
        """The plan that starts a session whose prefix KV (and last row's logits) came from
        another process: its first samples read the imported logits, no forward runs."""
        session.prefilled = len(session.prefix)
        plan = StepPlan(imported=session)
        self._start(session, plan, lambda k: k)
        return plan

    def inject(self, sid: str, ids: list[int], channel: str) -> None:
        session = self.find(sid)
        if session is None:
            return
        if channel == "user":
            session.user_pending.extend(ids)
        elif channel in session.by_name and session.by_name[channel].spec.external:
            session.by_name[channel].external_pending.extend(ids)

    def cancel(self, sid: str) -> list[tuple[Session, StreamEvent]]:
        session = self.find(sid)
        if session is None:
            return []
        return self.finish(session, "cancelled", None)

    def fail_all(self, message: str) -> list[tuple[Session, StreamEvent]]:
        events = []
        for session in list(self.active.values()) + list(self.queue):
            events += self.finish(session, "error", message)
        return events

    def finish(self, session: Session, reason: str, error: str | None) -> list[tuple[Session, StreamEvent]]:
        """Ends a session: every open stream gets its one final event; the slot is freed."""
        self.active.pop(session.id, None)
        if session in self.queue:
            self.queue.remove(session)
        events = [
            (session, self._end_stream(session, s, reason, error)) for s in session.streams if not s.finished
        ]
        if session.export is not None and not session.export.done():
            session.export.set_exception(EngineError(error or f"prefill {reason}"))
        if session.slot >= 0:
            self.pool.release(session.slot)
            session.slot = -1
        self.ended.append(session.id)
        return events

    # ------------------------------------------------------------------ schedule
    def schedule(self) -> StepPlan | None:
        """The next step: one row of every decoding session, then prompt chunks."""
        plan = StepPlan()
        budget = self.max_step_tokens
        failed: list[tuple[Session, ContextLengthError]] = []
        # Slot order: consecutive slots let attention read the pool as one view.
        for session in sorted(self.active.values(), key=lambda s: s.slot):
            if session.in_prefill:
                continue
            entries = self._row(session)
            if not entries:
                continue
            try:
                first = self.pool.reserve(
                    session.slot,
                    [session.row] * len(entries),
                    [c for _, c, _, _ in entries],
                    [t for t, *_ in entries],
                )
            except ContextLengthError as exc:
                failed.append((session, exc))
                continue
            start = len(plan.tokens)
            for j, (tok, chan, emb, owner) in enumerate(entries):
                plan.tokens.append(tok)
                plan.positions.append(session.row)
                plan.chans.append(chan)
                plan.embeds.append(emb)
                if owner == "user":
                    plan.echoes.append((session, tok, session.row))
                elif isinstance(owner, Stream):
                    if owner.forced:
                        plan.forced.append(owner)
                    elif not owner.finished and not self._ablated(session, owner):
                        row = session.row + 1
                        plan.samples.append(
                            Sample(start + j, session, owner, row, self._bias(session, owner, row))
                        )
            plan.slices.append(Slice(session, start, len(entries), first, prefill=False))
            budget -= len(entries)
        for session, exc in failed:
            self._pending_events.extend(self.finish(session, "length", str(exc)))
        # Prefill chunks take what the decode rows left of the step's budget.
        for session in list(self.active.values()):
            if not session.in_prefill or session.imported or budget <= 0:
                continue
            lo, hi = self._chunk(session, budget)
            p = session.prefix
            try:
                first = self.pool.reserve(
                    session.slot, list(p.rows[lo:hi]), list(p.chans[lo:hi]), list(p.tokens[lo:hi])
                )
            except ContextLengthError as exc:
                self._pending_events.extend(self.finish(session, "error", str(exc)))
                continue
            start = len(plan.tokens)
            plan.tokens.extend(p.tokens[lo:hi])
            plan.positions.extend(p.rows[lo:hi])
            plan.chans.extend(p.chans[lo:hi])
            plan.embeds.extend(p.embeds[lo:hi])
            plan.slices.append(Slice(session, start, hi - lo, first, prefill=True))
            session.prefilled = hi
            budget -= hi - lo
            if hi == len(p):
                last = p.last_row
                base = start + (last[0] - lo)
                if session.export is not None:
                    plan.exports.append((session, [base + k for k in range(len(last))]))
                else:
                    self._start(session, plan, lambda k, base=base: base + k)
        return plan if plan.tokens else None

    def _chunk(self, session: Session, budget: int) -> tuple[int, int]:
        """The next prompt chunk ``[lo, hi)``. The prefix's last row is never split: its
        logits start the streams, and logits exist only for tokens of the current step. A
        chunk that stops short of the prefix's end stops on a multiple of ``block`` when it
        can (a budget smaller than one block takes what it gets rather than wait)."""
        p = session.prefix
        lo = session.prefilled
        hi = min(len(p), lo + self.prefill_chunk, lo + budget)
        if hi < len(p) and hi - hi % self.block > lo:
            hi -= hi % self.block
        last_start = p.last_row[0]
        if lo < last_start < hi < len(p):
            hi = last_start
        elif lo >= last_start:
            hi = len(p)
        return lo, hi

    def take_pending_events(self) -> list[tuple[Session, StreamEvent]]:
        """Events of sessions the last ``schedule`` had to end (context exhausted)."""
        events, self._pending_events = self._pending_events, []
        return events

    def _row(self, session: Session) -> list[tuple[int, int, int, object]]:
        """The entries ``(token, channel, embedding row, owner)`` of a decode row."""
        rules = session.rules
        silence = session.silence_id
        fill = rules is not None or (silence is not None and session.attention == "cross")
        entries: list[tuple[int, int, int, object]] = []
        for s in session.streams:
            if s.spec.external:
                if s.external_pending:
                    entries.append((s.external_pending.popleft(), s.channel, s.embed_row, None))
                elif fill and silence is not None:
                    entries.append((silence, s.channel, s.embed_row, None))
                continue
            if s.finished:
                if rules is not None:
                    entries.append((rules.silence_id, s.channel, s.embed_row, None))
                continue
            if s.next_input is None:
                continue
            entries.append((s.next_input, s.channel, s.embed_row, s))
        if session.user_pending:
            tok = session.user_pending.popleft()
            entries.append((tok, session.user_channel, session.user_embed, "user"))
            if session.first_user_row is None:
                session.first_user_row = session.row
            session.last_user_row = session.row
        elif fill and silence is not None and entries:
            entries.append((silence, session.user_channel, session.user_embed, None))
        if rules is not None:
            entries.sort(key=lambda e: e[1])  # the paper's column order: User, Output, thinking
        return entries

    def _start(self, session: Session, plan: StepPlan, index_of: object) -> None:
        """A prefix is complete: each stream samples its first token from the logits of the
        prefix's last row (its own channel's entry, or the prompt's last token)."""
        plan.started.append(session)
        row = session.prefix.next_row
        for s in session.streams:
            if s.spec.external:
                continue
            if s.forced:
                plan.forced.append(s)
            elif self._ablated(session, s):
                s.next_input = session.silence_id
            else:
                k = session.prefix.first_logits(s.channel)
                plan.samples.append(Sample(index_of(k), session, s, row, self._bias(session, s, row)))  # type: ignore[operator]

    @staticmethod
    def _ablated(session: Session, s: Stream) -> bool:
        return session.rules is not None and s.channel in session.rules.ablate

    @staticmethod
    def _bias(session: Session, s: Stream, row: int) -> tuple[tuple[int, float], ...]:
        """The paper's silence penalty on the sample that lands in ``row``.

        The user "has stopped" when ``row`` will carry no user token (the queue is empty) and
        they said something before: k = rows since their last token. With
        ``penalty_during_user_talk`` it also applies while they talk, k counted from their
        first row.
        """
        rules = session.rules
        if rules is None:
            return ()
        if not session.user_pending and session.last_user_row is not None:
            k = row - session.last_user_row
        elif session.user_pending and rules.penalty_during_user_talk:
            first = session.first_user_row if session.first_user_row is not None else row
            k = row - first + 1
        else:
            return ()
        penalty = rules.penalty(s.channel, k)
        return ((rules.silence_id, -penalty),) if penalty else ()

    # ------------------------------------------------------------------ update
    def update(
        self,
        plan: StepPlan,
        sampled: list[int],
        stats: Sequence[tuple[float, float] | None] | None = None,
    ) -> list[tuple[Session, StreamEvent]]:
        """Records the step's samples; returns the events to deliver, in order.

        ``stats[i]``: the entropy and top-1 probability of sample ``i``, for sessions that
        asked for them (``Session.channel_stats``), else None."""
        events = self.take_pending_events()
        for session, tok, row in plan.echoes:
            events.append((session, StreamEvent(session.id, "user", "user", [tok], "", row=row)))
        for s in plan.forced:
            s.next_input = s.forced.popleft()
        silent: dict[str, bool] = {}
        for i, (sample, tok) in enumerate(zip(plan.samples, sampled, strict=True)):
            session, s = sample.session, sample.stream
            stat = [stats[i]] if stats is not None and stats[i] is not None else []
            if session.id not in self.active or s.finished:
                continue
            if session.rules is not None:
                silent[session.id] = silent.get(session.id, True) and tok == session.rules.silence_id
            assert s.sampler is not None
            s.sampler.observe(tok)
            acc = s.output.accept(tok)
            if acc.finished:
                s.finished = True
                ids = [tok] if acc.visible else []
                ev = self._event(session, s, ids, acc.text, sample.row, acc.reason)
                ev.stats = stat if acc.visible else []
                ev.logprobs = s.sampler.logprobs[-1:] if acc.visible and s.sampler.params.logprobs else []
                ev.top_logprobs = (
                    s.sampler.top_logprobs[-1:] if acc.visible and s.sampler.params.top_logprobs else []
                )
                events.append((session, ev))
                continue
            s.next_input = tok
            if acc.visible:
                ev = self._event(session, s, [tok], acc.text, sample.row)
                ev.stats = stat
                ev.logprobs = s.sampler.logprobs[-1:] if s.sampler.params.logprobs else []
                ev.top_logprobs = s.sampler.top_logprobs[-1:] if s.sampler.params.top_logprobs else []
                events.append((session, ev))
        for session, _ in plan.exports:  # the engine has taken the KV and logits
            events += self.finish(session, "stop", None)
        decoding = plan.decoding()
        for session in decoding:
            session.row += 1
        for session in decoding + plan.started:
            if session.id in self.active:
                events += self._after_row(session, silent.get(session.id, True))
        return events

    def _after_row(self, session: Session, all_silent: bool) -> list[tuple[Session, StreamEvent]]:
        """Session-level stop rules once a row has been sampled."""
        rules = session.rules
        if rules is not None:
            session.rows_generated += 1
            if all_silent and not session.user_pending:
                session.silent_rows += 1
            else:
                session.silent_rows = 0
            output = next((s for s in session.streams if s.channel == rules.output_channel), None)
            if rules.stop_silent_rows is not None and session.silent_rows >= rules.stop_silent_rows:
                return self.finish(session, "stop", None)
            if session.rows_generated >= rules.max_rows:
                return self.finish(session, "length", None)
            if output is not None and output.finished:
                return self.finish(session, "stop", None)
        if session.done():
            return self.finish(session, "stop", None)
        return []

    # ------------------------------------------------------------------ events
    @staticmethod
    def _event(
        session: Session, s: Stream, ids: list[int], text: str, row: int, reason: str | None = None
    ) -> StreamEvent:
        return StreamEvent(
            session.id,
            s.name,
            s.spec.kind,
            ids,
            text,
            finished=reason is not None,
            finish_reason=reason,
            row=row,
        )

    def _end_stream(self, session: Session, s: Stream, reason: str, error: str | None) -> StreamEvent:
        """A stream's one final event, carrying any text not yet sent."""
        s.finished = True
        text = s.output.close(reason) if s.sampler is not None else ""
        return StreamEvent(session.id, s.name, s.spec.kind, [], text, True, reason, error, session.row)
