"""The engine's thread-safe front: submit, inject, cancel, stats, and the step loop.

One thread owns the model and the KV pool. Callers on other threads (Triton's request
threads) only enqueue commands and receive :class:`StreamEvent` s through a callback. Each
step is nano-vllm's three phases: the scheduler plans (``schedule``), the model runs the
plan in ONE forward over every active session's tokens (``run``), and the samples go back
to the scheduler, whose events are delivered (``postprocess``). New sessions are admitted
and finished ones retired between steps (continuous batching).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from backend.engine.attention import EMBED_USER, USER_CHANNEL, grid_visibility, visibility
from backend.engine.batch import pack
from backend.engine.config import (
    EngineConfig,
    resolve_dtype,
    resolve_int4_prompts,
    resolve_kv_dtype,
    resolve_quantization,
)
from backend.engine.errors import ContextLengthError, EngineBusyError
from backend.engine.kv_cache import KVPool
from backend.engine.prefix_cache import PrefixCache
from backend.engine.scheduler import Scheduler, StepPlan, check_context
from backend.engine.session import (
    EventCallback,
    GridRules,
    Prefix,
    Session,
    StreamEvent,
    StreamSpec,
    new_session,
)
from backend.model_store import validate_model_dir
from backend.models import LlamaModel, load_model
from backend.tokenizer import Tokenizer


@dataclass
class PrefixKV:
    """A prefix computed by another engine (``prefill_export``): its KV and last row's logits.

    ``kv`` is ``[layers, 2, kv_heads, P, head_dim]``; ``logits`` is ``[k, vocab]`` fp32 for
    the k entries of the prefix's last row (1 for a prompt, C for a grid row).
    """

    kv: torch.Tensor
    logits: torch.Tensor


def distribution_stats(logits: torch.Tensor, bias: tuple[tuple[int, float], ...] = ()) -> tuple[float, float]:
    """``(entropy in nats, top-1 probability)`` of ``softmax(logits + bias)``: how sure a
    channel was, as the paper records per row and channel (before temperature)."""
    if bias:
        logits = logits.clone()
        for token, delta in bias:
            logits[token] += delta
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    return float(-(p * logp).sum()), float(p.max())


class Engine:
    """Owns a model and a KV pool, and runs the step loop on its own thread."""

    def __init__(self, model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig | None = None):
        """An engine around an already loaded model (tests, tools).

        Serving uses :meth:`from_model_dir`, which loads the model on the engine's own
        thread; see there for why that matters on CPU.
        """
        self._setup(model, tokenizer, config)
        self._thread = threading.Thread(target=self._loop, name="multistream-engine", daemon=True)
        self._thread.start()

    def _setup(self, model: LlamaModel, tokenizer: Tokenizer, config: EngineConfig | None) -> None:
        self.config = config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.pool = KVPool(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            config.max_sessions,
            config.max_context,
            resolve_kv_dtype(config.kv_dtype, model.device, model.dtype),
            model.device,
        )
        self.eos_ids = set(tokenizer.eos_token_ids)
        self.prefix_cache = PrefixCache(self.pool, config.prefix_cache_mb * 2**20, config.prefix_cache_block)
        self.scheduler = Scheduler(
            self.pool,
            max_step_tokens=config.max_step_tokens,
            prefill_chunk=config.prefill_chunk,
            block=config.prefix_cache_block,
            eos_ids=self.eos_ids,
            on_admit=self.prefix_cache.admit,
        )
        self._int4_rows = config.int4_rows_limit(model.int4_kernel) if model.quantization != "none" else None
        self._int4_prompts = resolve_int4_prompts(config.int4_prompts, model.int4_kernel)
        self._lock = threading.Condition()
        self._commands: collections.deque[tuple] = collections.deque()
        self._imported: dict[str, PrefixKV] = {}
        self._known: set[str] = set()
        self._stop = False
        self._steps = 0
        self._tokens_processed = 0
        #: Recent wall time of one step (exponential average, s): consumers poll their
        #: cancel flags once per step, not faster (``step_time_s``).
        self._step_time_s = 0.0
        #: Debug/test hook: ``hook(session_id, stream_name, row, logits)`` for every sampled
        #: position. None in serving, so it costs nothing there.
        self.logits_hook: Callable[[str, str, int, torch.Tensor], None] | None = None

    @classmethod
    def from_model_dir(cls, path: Path | str, config: EngineConfig | None = None) -> Engine:
        """Loads a checkpoint folder and starts the engine; all torch work on one thread.

        Why the engine thread loads the model: torch's CPU ops run on OpenMP, and libgomp
        stops its workers from spin-waiting between parallel regions as soon as it manages
        more threads than there are CPUs. A process whose main thread had opened a parallel
        region (loading, int4 packing) and whose engine thread then stepped had two thread
        teams: every region paid a futex wake-up. Measured on 2 cores, one session: a
        14.1 ms step when one thread does all the work against 23.8 ms when the main thread
        loaded. So the thread that steps is the only one that ever computes.
        """
        config = config or EngineConfig()
        validate_model_dir(Path(path))  # names the missing or broken file before any loading
        engine = cls.__new__(cls)
        loaded: concurrent.futures.Future[None] = concurrent.futures.Future()

        def load_then_loop() -> None:
            try:
                if config.threads:
                    torch.set_num_threads(config.threads)
                dtype = resolve_dtype(config.dtype, config.device, config.quantization)
                quantization = resolve_quantization(config.quantization, torch.device(config.device), dtype)
                # on CPU: mapped from the machine's packed weight file (backend.models.packed)
                model = load_model(path, dtype=dtype, device=config.device, quantization=quantization)
                engine._setup(model, Tokenizer.from_dir(Path(path)), config)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                loaded.set_exception(exc)
                return
            loaded.set_result(None)
            engine._loop()

        engine._thread = threading.Thread(target=load_then_loop, name="multistream-engine", daemon=True)
        engine._thread.start()
        loaded.result()
        return engine

    # ------------------------------------------------------------------ public API
    def submit(
        self,
        prefix: Sequence[int] | Prefix,
        streams: list[StreamSpec],
        *,
        attention: str = "isolated",
        on_event: EventCallback | None = None,
        session_id: str | None = None,
        prefix_kv: PrefixKV | None = None,
        rules: GridRules | None = None,
        user_ids: Sequence[int] = (),
        channel_stats: bool = False,
    ) -> str:
        """Queues a session; returns its id. Raises ``ValueError`` for bad requests.

        ``prefix``: prompt ids (the project's layout: one token per row on the prompt
        channel) or a :class:`Prefix` (the paper's seed row / header grid). ``rules``: the
        paper's layout (every channel in every row, silence, its stop rules); its streams
        name their ``channel``. ``user_ids``: tokens queued for the User channel, one per
        row after the prefix. ``prefix_kv``: the prefix's KV and last-row logits as
        :meth:`prefill_export` made them in another process: nothing is recomputed.
        ``channel_stats``: every event carries the entropy and top-1 probability of the
        distribution each of its tokens was sampled from (the paper's ``record_logits``).
        """
        if not isinstance(prefix, Prefix):
            if not prefix:
                raise ValueError("prompt_ids must not be empty")
            prefix = Prefix.prompt(prefix)
        if not streams:
            raise ValueError("a session needs at least one stream")
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be unique, got {names}")
        for s in streams:
            s.validate()
        check_context(prefix, streams, rules, self.config.max_context)
        if prefix_kv is not None:
            if prefix_kv.kv.shape[3] != len(prefix):
                raise ValueError(
                    f"prefix_kv covers {prefix_kv.kv.shape[3]} tokens but the prompt has {len(prefix)}"
                )
            if prefix_kv.logits.shape[0] != len(prefix.last_row):
                raise ValueError(
                    f"prefix_kv has logits for {prefix_kv.logits.shape[0]} entries, the prefix's last row "
                    f"has {len(prefix.last_row)}"
                )
        session = new_session(
            session_id or uuid.uuid4().hex,
            prefix,
            streams,
            attention=attention,
            on_event=on_event,
            rules=rules,
            user_ids=user_ids,
            tokenizer=self.tokenizer,
            eos_ids=self.eos_ids,
            silence_token_id=self.config.silence_token_id,
        )
        session.imported = prefix_kv is not None
        session.channel_stats = channel_stats
        self._enqueue(session, prefix_kv)
        return session.id

    def prefill_export(
        self, prefix: Sequence[int] | Prefix, timeout: float | None = None, rules: GridRules | None = None
    ) -> PrefixKV:
        """Runs a prefix and returns its KV and last row's logits for another process.

        The prefill is batched with whatever else the engine is running, then the slot is freed.
        ``rules``: the paper's grid, whose start rows see each other block-causally (and hide
        silence keys with ``skip_silence``), exactly as the session that imports them would.
        """
        if not isinstance(prefix, Prefix):
            if not prefix:
                raise ValueError("prompt_ids must not be empty")
            prefix = Prefix.prompt(prefix)
        check_context(prefix, [], None, self.config.max_context)
        fut: concurrent.futures.Future[PrefixKV] = concurrent.futures.Future()
        session = Session(
            uuid.uuid4().hex,
            prefix,
            [],
            grid_visibility(rules.num_channels) if rules is not None else visibility("isolated", []),
            "isolated",
            None,
            user_channel=USER_CHANNEL,
            user_embed=EMBED_USER,
            rules=rules,
            export=fut,
        )
        self._enqueue(session, None)
        return fut.result(timeout=timeout)

    def inject(self, session_id: str, token_ids: list[int], channel: str = "user") -> None:
        """Pushes tokens into a non-sampled channel; they enter the grid one per row."""
        with self._lock:
            if session_id not in self._known:
                raise KeyError(f"session_id {session_id!r} does not exist or has ended")
            self._commands.append(("inject", session_id, list(token_ids), channel))
            self._lock.notify()

    def cancel(self, session_id: str) -> bool:
        """Stops a session within one step and frees its KV slot. False if it is unknown."""
        with self._lock:
            if session_id not in self._known:
                return False
            self._commands.append(("cancel", session_id))
            self._lock.notify()
            return True

    def has_session(self, session_id: str) -> bool:
        with self._lock:
            return session_id in self._known

    def stats(self) -> dict:
        kv = self.pool.stats()
        with self._lock:
            queued = len(self.scheduler.queue)
            active = len(self.scheduler.active)
        return {
            "active_sessions": active,
            "queued_sessions": queued,
            "kv_slots_used": kv.slots_used,
            "kv_slots_total": kv.slots_total,
            "kv_used_tokens": kv.tokens_used,
            "kv_capacity_tokens": kv.tokens_capacity,
            "kv_bytes_reserved": kv.bytes_reserved,
            "quantization": self.model.quantization,
            "int4_kernel": self.model.int4_kernel,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "kv_dtype": str(self.pool.k[0].dtype).removeprefix("torch."),
            "steps": self._steps,
            "tokens_processed": self._tokens_processed,
            **{f"prefix_cache_{k}": v for k, v in vars(self.prefix_cache.stats).items()},
        }

    @property
    def step_time_s(self) -> float:
        """Recent wall time of one step in seconds (0 before the first step).

        Why: a serving loop that checks cancellation once per step stops a session "within
        one step"; checking more often only adds IPC (each ``is_cancelled`` is a round trip
        to the Triton server), which at 16 sessions was hundreds of calls a second.
        """
        return self._step_time_s

    def shutdown(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ admission
    def _enqueue(self, session: Session, prefix_kv: PrefixKV | None) -> None:
        cfg = self.config
        with self._lock:
            if session.id in self._known:
                raise ValueError(f"session_id {session.id!r} is already in use")
            if len(self._known) >= cfg.max_sessions + cfg.max_queued:
                raise EngineBusyError(
                    f"server busy: {cfg.max_sessions} sessions running and "
                    f"{cfg.max_queued} waiting (max_sessions={cfg.max_sessions}, "
                    f"max_queued={cfg.max_queued}); retry later"
                )
            self._known.add(session.id)
            if prefix_kv is not None:
                self._imported[session.id] = prefix_kv
            self._commands.append(("add", session))
            self._lock.notify()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        sched = self.scheduler
        while True:
            with self._lock:
                while not self._stop and not self._commands and not sched.active and not sched.queue:
                    self._lock.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            try:
                self._apply(commands)
                for session in sched.admit():
                    self._start_imported(session)
                if sched.active:
                    t0 = time.perf_counter()
                    self.step()
                    dt = time.perf_counter() - t0
                    self._step_time_s = dt if self._step_time_s == 0.0 else 0.8 * self._step_time_s + 0.2 * dt
            except Exception as exc:  # noqa: BLE001 - a broken step must not kill the server
                self._deliver(sched.fail_all(f"engine step failed: {type(exc).__name__}: {exc}"))
        self._deliver(sched.fail_all("engine shut down"))

    def _apply(self, commands: list[tuple]) -> None:
        for cmd in commands:
            if cmd[0] == "add":
                self.scheduler.add(cmd[1])
            elif cmd[0] == "cancel":
                self._deliver(self.scheduler.cancel(cmd[1]))
            elif cmd[0] == "inject":
                self.scheduler.inject(cmd[1], cmd[2], cmd[3])

    def _start_imported(self, session: Session) -> None:
        state = self._imported.pop(session.id)
        p = session.prefix
        self.pool.import_prefix(session.slot, state.kv, list(p.rows), list(p.chans), list(p.tokens))
        plan = self.scheduler.start_imported(session)
        self._postprocess(plan, state.logits.float())

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """schedule -> run -> postprocess."""
        plan = self.scheduler.schedule()
        if plan is None:
            self._deliver(self.scheduler.take_pending_events())
            return
        batch = pack(
            plan,
            self.pool,
            self.model.device,
            channel_embedding=self.model.channel_embedding is not None,
            int4_rows=self._int4_rows,
            int4_prompts=self._int4_prompts,
            block=self.config.prefix_cache_block,
        )
        logits = self.model.forward(batch, self.pool.k, self.pool.v).cpu()
        for sl in plan.slices:  # prefixes completed in this step: keep their blocks
            if sl.prefill and not sl.session.in_prefill:
                self.prefix_cache.insert(sl.session)
        self._steps += 1
        self._tokens_processed += len(plan)
        row_of = {idx: i for i, idx in enumerate(plan.logit_index)}
        self._postprocess(plan, logits, row_of)

    def _postprocess(
        self, plan: StepPlan, logits: torch.Tensor, row_of: dict[int, int] | None = None
    ) -> None:
        """Samples what the plan asks for, hands exports over, and delivers the events."""

        def at(index: int) -> torch.Tensor:
            return logits[index if row_of is None else row_of[index]]

        sampled = []
        stats: list[tuple[float, float] | None] = []
        for s in plan.samples:
            row_logits = at(s.index)
            if self.logits_hook is not None:
                self.logits_hook(s.session.id, s.stream.name, s.row - 1, row_logits)
            assert s.stream.sampler is not None
            sampled.append(s.stream.sampler.sample(row_logits, s.bias))
            stats.append(distribution_stats(row_logits, s.bias) if s.session.channel_stats else None)
        for session, indices in plan.exports:
            assert session.export is not None
            kv = self.pool.export_prefix(session.slot, len(session.prefix)).clone()
            session.export.set_result(PrefixKV(kv, torch.stack([at(i) for i in indices])))
        self._deliver(self.scheduler.update(plan, sampled, stats))

    def _deliver(self, events: list[tuple[Session, StreamEvent]]) -> None:
        for session, event in events:
            if session.on_event is not None:
                try:
                    session.on_event(event)
                except Exception:  # noqa: BLE001 - a consumer's bug must not stop the engine
                    pass
        ended = self.scheduler.ended
        if ended:
            with self._lock:
                for sid in ended:
                    self._known.discard(sid)
                    self._imported.pop(sid, None)
            ended.clear()


__all__ = ["ContextLengthError", "Engine", "PrefixKV"]
