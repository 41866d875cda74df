"""The multi-stream engine: sessions, the step scheduler, and the thread-safe API.

One scheduler thread owns the model and the KV pool. Each step it runs ONE forward
over the pending tokens of every active session: a row (one token per live channel)
for sessions that are decoding, and a chunk of prompt for sessions still in prefill,
under a per-step token budget so that a long prompt never freezes everyone else's
decode (chunked prefill, as vLLM and TensorRT-LLM do). New sessions are admitted and
finished ones retired between steps (continuous batching). Callers on other threads
only enqueue commands (submit / inject / cancel) and receive ``StreamEvent`` s through a
callback, so the API is safe to call from Triton's request threads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from backend.kv_cache import CacheFullError, ContextLengthError, KVPool
from backend.llama import LlamaModel, PackedBatch, PackedSplit
from backend.model_store import validate_model_dir
from backend.quant import int4_supported
from backend.sampling import SamplingParams, StreamSampler
from backend.streams import (
    EMBED_USER,
    FIRST_STREAM_CHANNEL,
    MAX_CHANNELS,
    PROMPT_CHANNEL,
    USER_CHANNEL,
    StreamSpec,
    embedding_row,
    visibility,
)
from backend.tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineBusyError",
    "ContextLengthError",
    "SamplingParams",
    "StreamSpec",
    "StreamEvent",
    "resolve_dtype",
]


class EngineError(RuntimeError):
    """A request the engine cannot serve; the message says why."""


class EngineBusyError(EngineError):
    """Every KV slot is taken and the admission queue is full: try again later."""


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """``auto`` picks bf16 where the hardware has native bf16 math, else fp32.

    Measured on this project's 2-core AVX512-BF16 CPU: bf16 decode steps are ~1.6x faster
    than fp32 (weights are half the bytes and oneDNN has bf16 kernels). A CPU without
    bf16 support emulates it and is slower than fp32, hence the check.
    """
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name in ("fp32", "float32"):
        return torch.float32
    if name in ("fp16", "float16"):
        return torch.float16
    if name != "auto":
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {name!r}")
    if device.startswith("cuda"):
        return torch.bfloat16
    cap = torch.backends.cpu.get_cpu_capability()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return torch.bfloat16 if has_bf16 and cap in ("AVX512", "AMX") else torch.float32


def resolve_kv_dtype(name: str, model: LlamaModel) -> torch.dtype:
    """``auto``: fp32 on CPU, the model's dtype elsewhere.

    Why fp32 on CPU: attention runs in fp32 there (bf16 SDPA is several times slower for
    short queries), so a bf16 pool was converted whole, every layer of every step. That copy
    grows with the keys: one session with 4 streams spent 3.3 ms of a 31 ms step on it
    against 1.3 ms with one stream. Storing the keys in fp32 costs twice the KV memory
    (46 KB per token for SmolLM2-135M, paged in as used) and changes no number: a bf16
    value widens to fp32 exactly.
    """
    if name == "auto":
        return torch.float32 if model.device.type == "cpu" else model.dtype
    return resolve_dtype(name, str(model.device))


def resolve_quantization(name: str, model: LlamaModel) -> str:
    """``auto`` means int4 where its kernel exists for the model's device and dtype."""
    if name == "auto":
        return "int4" if int4_supported(model.device, model.dtype) else "none"
    return name


@dataclass
class EngineConfig:
    dtype: str = "auto"
    device: str = "cpu"
    #: ``int4``: decode rows use group-wise int4 weights (the default checkpoint ships as
    #: Q4_1, i.e. this very format); ``none``: dense; ``auto``: int4 where the kernel exists
    #: (CPU + bfloat16), dense otherwise.
    quantization: str = "auto"
    #: Steps with more decode tokens than this use the dense weights (faster at large M).
    #: An int4 kernel's cost grows with rows while a dense step stays memory-bound. All 30
    #: layers' matmuls of SmolLM2-135M, weights streamed from memory as in a real step
    #: (2 threads), in ms for 1 / 4 / 16 / 24 / 32 / 64 / 96 rows:
    #:   torch's int4 kernel  3.8 / 6.3 / 21.5 / 32.0 / 41.4 /   -  /   -
    #:   ours (bf16dp)        3.4 / 4.8 / 12.6 / 18.4 / 21.4 / 40.3 / 58.9
    #:   dense bf16          16.1 / 17.4 / 25.9 / 30.4 / 33.2 / 47.6 / 63.6
    #: None = by kernel: 96 with ours, 20 with torch's. (Timing one layer alone keeps its
    #: weights in cache and favours dense from ~8 rows: that misled an earlier default.)
    int4_max_rows: int | None = None
    #: KV pool dtype: ``auto`` (fp32 on CPU, where attention runs in fp32; the model dtype
    #: elsewhere), or any dtype name ``resolve_dtype`` takes.
    kv_dtype: str = "auto"
    threads: int | None = None
    max_sessions: int = 16
    max_context: int = 2048
    #: Most tokens one step processes; decode rows always go first, prefill takes the rest.
    max_step_tokens: int = 256
    #: Most prompt tokens one session prefills in one step.
    prefill_chunk: int = 128
    #: Sessions waiting for a slot before ``submit`` says busy.
    max_queued: int = 64
    #: Token that fills a channel with nothing to say in ``cross`` mode (stream-trained
    #: checkpoints). None: idle channels are simply left out of the row.
    silence_token_id: int | None = None


@dataclass
class StreamEvent:
    """A delta of one stream; every stream ends with exactly one ``finished`` event."""

    session_id: str
    stream: str
    kind: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    row: int = -1
    t: float = field(default_factory=time.monotonic)


EventCallback = Callable[[StreamEvent], None]


class _Stream:
    def __init__(self, spec: StreamSpec, channel: int, embed_row: int, tok: Tokenizer, prompt: list[int]):
        self.spec = spec
        self.channel = channel
        self.embed_row = embed_row
        self.forced: collections.deque[int] = collections.deque(spec.preamble_ids)
        self.sampler = None if spec.external else StreamSampler(spec.sampling, prompt)
        self.detok = IncrementalDetokenizer(tok)
        self.next_input: int | None = None  # the token this stream feeds into the next row
        self.generated: list[int] = []
        self.text = ""
        self.sent = 0  # how much of ``text`` the client has
        self.finished = False
        self.external_pending: collections.deque[int] = collections.deque()

    def take(self, hold: int) -> str:
        """The text not yet sent, less the last ``hold`` characters; marks it sent."""
        end = max(self.sent, len(self.text) - hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out


class _Session:
    def __init__(
        self,
        sid: str,
        prompt: list[int],
        streams: list[_Stream],
        vis: torch.Tensor,
        attention: str,
        on_event: EventCallback | None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None,
        export: concurrent.futures.Future | None,
    ):
        self.id = sid
        self.prompt = prompt
        self.streams = streams
        self.by_name = {s.spec.name: s for s in streams}
        self.vis = vis
        self.attention = attention
        self.on_event = on_event
        self.prefix = prefix
        self.export = export
        self.slot = -1
        self.prefilled = 0
        self.row = len(prompt)
        self.user_pending: collections.deque[int] = collections.deque()
        self.t_submit = time.monotonic()
        # Filled while building a step: which packed tokens belong to whom.
        self.step_entries: list[tuple[str, object, int]] = []

    @property
    def in_prefill(self) -> bool:
        return self.prefilled < len(self.prompt)

    def done(self) -> bool:
        if self.export is not None:
            return not self.in_prefill
        return all(s.finished or s.spec.external for s in self.streams)


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
        self.config = config or EngineConfig()
        self.model = model
        self.tokenizer = tokenizer
        cfg = model.cfg
        self.pool = KVPool(
            cfg.num_layers,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.config.max_sessions,
            self.config.max_context,
            resolve_kv_dtype(self.config.kv_dtype, model),
            model.device,
        )
        self.eos_ids = set(tokenizer.eos_token_ids)
        self._int4_max_rows = self.config.int4_max_rows
        if self._int4_max_rows is None:
            self._int4_max_rows = 96 if model.int4_kernel == "bf16dp" else 20
        self._lock = threading.Condition()
        self._commands: collections.deque[tuple] = collections.deque()
        self._queue: collections.deque[_Session] = collections.deque()
        self._active: dict[str, _Session] = {}
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
                model = LlamaModel.from_dir(
                    path, dtype=resolve_dtype(config.dtype, config.device), device=config.device
                )
                model.quantize(resolve_quantization(config.quantization, model))
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
        prompt_ids: list[int],
        streams: list[StreamSpec],
        *,
        attention: str = "isolated",
        on_event: EventCallback | None = None,
        session_id: str | None = None,
        prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> str:
        """Queues a session; returns its id. Raises ``ValueError`` for bad requests.

        ``prefix_kv``: ``(kv [layers, 2, kv_heads, P, head_dim], last_logits [vocab])`` as
        produced by :meth:`prefill_export` in another process: the prompt is not recomputed.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if not streams:
            raise ValueError("a session needs at least one stream")
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be unique, got {names}")
        for s in streams:
            s.validate()
        vis = visibility(attention, streams)
        self._check_context(prompt_ids, streams)
        if prefix_kv is not None and prefix_kv[0].shape[3] != len(prompt_ids):
            raise ValueError(
                f"prefix_kv covers {prefix_kv[0].shape[3]} tokens but the prompt has {len(prompt_ids)}"
            )
        sid = session_id or uuid.uuid4().hex
        return self._enqueue(prompt_ids, streams, vis, attention, on_event, sid, prefix_kv, None)

    def prefill_export(
        self, prompt_ids: list[int], timeout: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs a prompt and returns ``(kv, last_logits)`` for another process to continue from.

        The prefill is batched with whatever else the engine is running, then the slot is freed.
        """
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if len(prompt_ids) >= self.config.max_context:
            raise ContextLengthError(
                f"prompt is {len(prompt_ids)} tokens, the context limit is {self.config.max_context}"
            )
        fut: concurrent.futures.Future = concurrent.futures.Future()
        vis = visibility("isolated", [])
        self._enqueue(prompt_ids, [], vis, "isolated", None, uuid.uuid4().hex, None, fut)
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
            queued = len(self._queue)
            active = len(self._active)
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

    # ------------------------------------------------------------------ internals: admission
    def _check_context(self, prompt: list[int], streams: list[StreamSpec]) -> None:
        longest = max(len(s.preamble_ids) + (0 if s.external else s.sampling.max_tokens) for s in streams)
        # Rows are shared: the grid grows by one row per step, with one entry per live channel.
        need = len(prompt) + sum(
            len(s.preamble_ids) + (longest if s.external else s.sampling.max_tokens) for s in streams
        )
        if len(prompt) >= self.config.max_context:
            raise ContextLengthError(
                f"prompt is {len(prompt)} tokens, the context limit is {self.config.max_context}"
            )
        if need > self.config.max_context:
            raise ContextLengthError(
                f"prompt ({len(prompt)} tokens) plus max_tokens of every stream needs {need} cache "
                f"positions, the context limit is {self.config.max_context}"
            )

    def _enqueue(self, prompt, streams, vis, attention, on_event, sid, prefix, export) -> str:
        tok = self.tokenizer
        objs = []
        reasoning_index = 0
        for i, spec in enumerate(streams):
            objs.append(
                _Stream(spec, FIRST_STREAM_CHANNEL + i, embedding_row(spec, reasoning_index), tok, prompt)
            )
            reasoning_index += spec.kind == "reasoning"
        session = _Session(sid, list(prompt), objs, vis, attention, on_event, prefix, export)
        with self._lock:
            if sid in self._known:
                raise ValueError(f"session_id {sid!r} is already in use")
            if len(self._known) >= self.config.max_sessions + self.config.max_queued:
                raise EngineBusyError(
                    f"server busy: {self.config.max_sessions} sessions running and "
                    f"{self.config.max_queued} waiting (max_sessions={self.config.max_sessions}, "
                    f"max_queued={self.config.max_queued}); retry later"
                )
            self._known.add(sid)
            self._queue.append(session)
            self._lock.notify()
        return sid

    # ------------------------------------------------------------------ internals: loop
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._commands and not self._active and not self._queue:
                    self._lock.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            try:
                self._apply(commands)
                self._admit()
                if self._active:
                    t0 = time.perf_counter()
                    self._step()
                    dt = time.perf_counter() - t0
                    self._step_time_s = dt if self._step_time_s == 0.0 else 0.8 * self._step_time_s + 0.2 * dt
            except Exception as exc:  # noqa: BLE001 - a broken step must not kill the server
                self._fail_all(f"engine step failed: {type(exc).__name__}: {exc}")
        self._fail_all("engine shut down")

    def _apply(self, commands: list[tuple]) -> None:
        for cmd in commands:
            if cmd[0] == "cancel":
                self._cancel_now(cmd[1])
            elif cmd[0] == "inject":
                _, sid, ids, channel = cmd
                session = self._active.get(sid) or next((s for s in self._queue if s.id == sid), None)
                if session is None:
                    continue
                if channel == "user":
                    session.user_pending.extend(ids)
                elif channel in session.by_name and session.by_name[channel].spec.external:
                    session.by_name[channel].external_pending.extend(ids)

    def _cancel_now(self, sid: str) -> None:
        session = self._active.pop(sid, None)
        if session is None:
            for s in list(self._queue):
                if s.id == sid:
                    self._queue.remove(s)
                    session = s
        if session is None:
            return
        self._finish_session(session, "cancelled", None)

    def _admit(self) -> None:
        while self._queue and self.pool.free_slots:
            with self._lock:
                session = self._queue.popleft()
            try:
                session.slot = self.pool.allocate()
            except CacheFullError:
                with self._lock:
                    self._queue.appendleft(session)
                return
            self._active[session.id] = session
            if session.prefix is not None:
                kv, logits = session.prefix
                n = kv.shape[3]
                self.pool.import_prefix(
                    session.slot,
                    kv,
                    torch.arange(n, dtype=torch.int32),
                    torch.full((n,), PROMPT_CHANNEL, dtype=torch.int64),
                )
                session.prefilled = n
                session.prefix = None
                self._prefill_done(session, logits.float())

    def _fail_all(self, message: str) -> None:
        for session in list(self._active.values()) + list(self._queue):
            self._finish_session(session, "error", message)
        self._active.clear()
        self._queue.clear()

    def _finish_session(self, session: _Session, reason: str, error: str | None) -> None:
        self._active.pop(session.id, None)
        for s in session.streams:
            if not s.finished:
                self._finish_stream(session, s, reason, error)
        if session.export is not None and not session.export.done():
            session.export.set_exception(EngineError(error or f"prefill {reason}"))
        if session.slot >= 0:
            self.pool.release(session.slot)
            session.slot = -1
        with self._lock:
            self._known.discard(session.id)

    def _emit(self, session: _Session, event: StreamEvent) -> None:
        if session.on_event is not None:
            try:
                session.on_event(event)
            except Exception:  # noqa: BLE001 - a consumer's bug must not stop the engine
                pass

    def _finish_stream(
        self, session: _Session, s: _Stream, reason: str, error: str | None, ids=(), flush: bool = True
    ) -> None:
        """Ends a stream with its one ``finished`` event, carrying any text not yet sent."""
        s.finished = True
        if flush and reason != "error" and s.sampler is not None:
            s.text += s.detok.flush()
        tail = s.take(0) if reason != "error" else ""
        self._emit(
            session,
            StreamEvent(
                session.id, s.spec.name, s.spec.kind, list(ids), tail, True, reason, error, session.row
            ),
        )

    # ------------------------------------------------------------------ internals: one step
    def _step(self) -> None:
        budget = self.config.max_step_tokens
        tokens: list[int] = []
        positions: list[int] = []
        chans: list[int] = []
        embeds: list[int] = []
        per_session: list[tuple[_Session, int, int]] = []  # session, first packed index, count
        logit_owner: list[tuple[_Session, object]] = []
        logit_index: list[int] = []
        silence = self.config.silence_token_id
        # Slot order: consecutive slots let attention read the pool as one view.
        for session in sorted(self._active.values(), key=lambda s: s.slot):
            start_n = len(tokens)
            session.step_entries = []
            if session.in_prefill:
                continue
            row = session.row
            entries: list[tuple[int, int, int, object]] = []  # token, channel, embed row, owner
            for s in session.streams:
                if s.finished:
                    continue
                if s.spec.external:
                    if s.external_pending:
                        entries.append((s.external_pending.popleft(), s.channel, s.embed_row, None))
                    elif silence is not None and session.attention == "cross":
                        entries.append((silence, s.channel, s.embed_row, None))
                    continue
                if s.next_input is None:
                    continue
                entries.append((s.next_input, s.channel, s.embed_row, s))
            if session.user_pending:
                entries.append((session.user_pending.popleft(), USER_CHANNEL, EMBED_USER, "user"))
            elif silence is not None and session.attention == "cross" and entries:
                entries.append((silence, USER_CHANNEL, EMBED_USER, None))
            if not entries:
                continue
            try:
                self.pool.reserve(session.slot, len(entries))
            except ContextLengthError as exc:
                self._finish_session(session, "length", str(exc))
                continue
            first = self.pool.lengths[session.slot] - len(entries)
            for j, (tok, chan, emb, owner) in enumerate(entries):
                tokens.append(tok)
                positions.append(row)
                chans.append(chan)
                embeds.append(emb)
                if isinstance(owner, _Stream) and not owner.forced:
                    logit_owner.append((session, owner))
                    logit_index.append(start_n + j)
                session.step_entries.append(("row", owner, tok))
            self.pool.rows[session.slot, first : first + len(entries)] = row
            self.pool.chans[session.slot, first : first + len(entries)] = torch.tensor(chans[start_n:])
            per_session.append((session, start_n, len(entries)))
            budget -= len(entries)
        # Prefill chunks take what the decode rows left of the step's budget.
        for session in list(self._active.values()):
            if not session.in_prefill or budget <= 0:
                continue
            start_n = len(tokens)
            lo = session.prefilled
            hi = min(len(session.prompt), lo + self.config.prefill_chunk, lo + budget)
            try:
                first = self.pool.reserve(session.slot, hi - lo)
            except ContextLengthError as exc:
                self._finish_session(session, "error", str(exc))
                continue
            tokens.extend(session.prompt[lo:hi])
            positions.extend(range(lo, hi))
            chans.extend([PROMPT_CHANNEL] * (hi - lo))
            embeds.extend([EMBED_USER] * (hi - lo))
            self.pool.rows[session.slot, first : first + hi - lo] = torch.arange(lo, hi, dtype=torch.int32)
            self.pool.chans[session.slot, first : first + hi - lo] = PROMPT_CHANNEL
            session.prefilled = hi
            session.step_entries = [("prefill", None, hi - lo)]
            if hi == len(session.prompt):
                logit_owner.append((session, "prefill"))
                logit_index.append(start_n + hi - lo - 1)
            per_session.append((session, start_n, hi - lo))
            budget -= hi - lo
        if not tokens:
            return
        batch = self._pack(tokens, positions, chans, embeds, per_session, logit_index)
        logits = self.model.forward(batch, self.pool.k, self.pool.v)
        self._steps += 1
        self._tokens_processed += len(tokens)
        self._consume(per_session, logit_owner, logits)

    def _pack(self, tokens, positions, chans, embeds, per_session, logit_index) -> PackedBatch:
        dev = self.model.device
        n = len(tokens)
        b = len(per_session)
        max_q = max(cnt for _, _, cnt in per_session)
        slots = [s.slot for s, _, _ in per_session]
        lengths = [self.pool.lengths[s] for s in slots]
        key_len = max(lengths)
        slot_per_tok = torch.empty(n, dtype=torch.long)
        cache_idx = torch.empty(n, dtype=torch.long)
        pad_index = torch.empty(n, dtype=torch.long)
        q_row = torch.zeros((b, max_q), dtype=torch.int32)
        q_chan = torch.zeros((b, max_q), dtype=torch.long)
        q_idx = torch.full((b, max_q), -1, dtype=torch.long)
        pos_t = torch.tensor(positions, dtype=torch.int32)
        chan_t = torch.tensor(chans, dtype=torch.long)
        for i, (session, start, cnt) in enumerate(per_session):
            first = self.pool.lengths[session.slot] - cnt
            slot_per_tok[start : start + cnt] = session.slot
            idx = torch.arange(first, first + cnt)
            cache_idx[start : start + cnt] = idx
            pad_index[start : start + cnt] = torch.arange(i * max_q, i * max_q + cnt)
            q_row[i, :cnt] = pos_t[start : start + cnt]
            q_chan[i, :cnt] = chan_t[start : start + cnt]
            q_idx[i, :cnt] = idx
        slots_t = torch.tensor(slots, dtype=torch.long)
        key_rows = self.pool.rows[slots_t, :key_len]  # [B, L]
        key_chans = self.pool.chans[slots_t, :key_len]
        key_pos = torch.arange(key_len)
        valid = key_pos[None, :] < torch.tensor(lengths)[:, None]
        vis = torch.stack([s.vis for s, _, _ in per_session]).view(b, MAX_CHANNELS * MAX_CHANNELS)
        pair = q_chan[:, :, None] * MAX_CHANNELS + key_chans[:, None, :]
        allowed = vis.gather(1, pair.view(b, -1)).view(b, max_q, key_len)
        mask = valid[:, None, :] & (
            (allowed & (key_rows[:, None, :] < q_row[:, :, None]))
            | (key_pos[None, None, :] == q_idx[:, :, None])
        )
        # Padded query rows must see something or softmax yields NaN; their output is discarded.
        mask[:, :, 0] |= q_idx < 0
        return PackedBatch(
            tokens=torch.tensor(tokens, dtype=torch.long, device=dev),
            positions=pos_t.to(dev, torch.long),
            channel_embed_ids=torch.tensor(embeds, dtype=torch.long, device=dev)
            if self.model.channel_embedding is not None
            else None,
            slot=slot_per_tok.to(dev),
            cache_index=cache_idx.to(dev),
            slot_list=slots,
            slots_tensor=slots_t.to(dev),
            pad_index=pad_index.to(dev),
            max_q=max_q,
            key_len=key_len,
            mask=mask[:, None].to(dev),
            logit_index=torch.tensor(logit_index, dtype=torch.long, device=dev),
            split=PackedSplit.from_flags([c == PROMPT_CHANNEL for c in chans], self._int4_max_rows)
            if self.model.quantization != "none"
            else None,
        )

    def _consume(self, per_session, logit_owner, logits) -> None:
        logits = logits.cpu()
        by_owner: dict[int, torch.Tensor] = {}  # a stream's logits
        prefill_done: dict[str, torch.Tensor] = {}  # a prompt's last logits, by session
        for i, (session, owner) in enumerate(logit_owner):
            if owner == "prefill":
                prefill_done[session.id] = logits[i]
            else:
                by_owner[id(owner)] = logits[i]
        for session, _, _ in per_session:
            if session.id not in self._active:
                continue
            if session.step_entries and session.step_entries[0][0] == "prefill":
                if session.id in prefill_done:
                    self._prefill_done(session, prefill_done[session.id])
                continue
            row = session.row
            for _, owner, tok in session.step_entries:
                if owner == "user":
                    self._emit(session, StreamEvent(session.id, "user", "user", [tok], "", row=row))
                if not isinstance(owner, _Stream):
                    continue
                if owner.forced:
                    owner.next_input = owner.forced.popleft()
                    continue
                self._accept(session, owner, self._sample(session, owner, by_owner[id(owner)], row), row + 1)
            session.row += 1
            if session.done():
                self._finish_session(session, "stop", None)

    def _sample(self, session: _Session, s: _Stream, logits: torch.Tensor, row: int) -> int:
        if self.logits_hook is not None:
            self.logits_hook(session.id, s.spec.name, row, logits)
        assert s.sampler is not None
        return s.sampler.sample(logits)

    def _prefill_done(self, session: _Session, last_logits: torch.Tensor) -> None:
        if session.export is not None:
            kv = self.pool.export_prefix(session.slot, len(session.prompt)).clone()
            session.export.set_result((kv, last_logits))
            self._finish_session(session, "stop", None)
            return
        row = len(session.prompt)
        for s in session.streams:
            if s.spec.external:
                continue
            if s.forced:
                s.next_input = s.forced.popleft()
            else:
                self._accept(session, s, self._sample(session, s, last_logits, row - 1), row)
        if session.done():
            self._finish_session(session, "stop", None)

    def _accept(self, session: _Session, s: _Stream, token: int, row: int) -> None:
        """Records a sampled token: emits its text, or ends the stream on EOS / stop / length."""
        p = s.spec.sampling
        s.generated.append(token)
        assert s.sampler is not None
        s.sampler.observe(token)
        if (token in self.eos_ids and not p.ignore_eos) or token in p.stop_token_ids:
            self._finish_stream(session, s, "stop", None, [token])
            return
        if token == self.config.silence_token_id:
            s.next_input = token
            return
        s.text += s.detok.push([token])
        if p.stop:
            longest = max(len(x) for x in p.stop)
            hits = [i for i in (s.text.find(x, max(0, s.sent - longest)) for x in p.stop) if i >= 0]
            if hits:
                s.text = s.text[: min(hits)]
                self._finish_stream(session, s, "stop", None, [token], flush=False)
                return
        if len(s.generated) >= p.max_tokens:
            self._finish_stream(session, s, "length", None, [token])
            return
        # With stop strings, hold back a tail that could still grow into one (as vLLM does),
        # so a stop string never reaches the client.
        hold = max((len(x) for x in p.stop), default=1) - 1
        self._emit(session, StreamEvent(session.id, s.spec.name, s.spec.kind, [token], s.take(hold), row=row))
        s.next_input = token
