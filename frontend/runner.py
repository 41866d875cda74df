"""One generation of the front, consumed on its own task: what makes disconnect = cancel safe.

Why a task of its own: when an HTTP client goes away, Starlette cancels the task writing the
response. Had that task been iterating the ``AsyncGeneration``, its clean-up (closing the gRPC
channel, cancelling the session through ``session_control``) would itself be cancelled at
its first ``await``, and the session would generate on until ``max_tokens``. Here the
response only reads a queue; a cancel (disconnect, ``/v1/sessions/{id}/cancel``, a response
cancel) calls :meth:`Run.cancel`, which cancels the gRPC call, and the client library, on
this undisturbed task, then cancels the session on the server (Triton 2.51 does not pass a
stream cancel on to the ensemble's ``decode`` step).

The front holds nothing without bound: at most ``max_concurrent`` runs at once (then 429),
and the client library's idle timeout ends a run whose server went silent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from backend.serving.hop_trace import cancel_hop
from client.aio import AsyncGeneration, AsyncMultiStreamClient
from client.errors import MultiStreamCancelled, MultiStreamError
from client.events import Done, StreamDelta, TopLogprob
from client.request import GenerateRequest

from .errors import bad_request, busy
from .metrics import FrontMetrics

_END = object()


#: One answer token for OpenAI's ``logprobs``: its text, its log probability and its
#: ``top_logprobs`` alternatives (empty unless asked for).
TokenLogprob = tuple[str, float, list[TopLogprob]]


def token_logprobs(ev: StreamDelta) -> list[TokenLogprob]:
    """``(text, logprob, alternatives)`` per token of a delta. A request that asks for log
    probabilities gets one token per response (``backend/serving/decode.py``), so each token
    has its own text; should a delta ever carry several, its one text goes with its first
    token and the others get ``""``."""
    tops = ev.top_logprobs
    return [
        (ev.text if i == 0 else "", lp, tops[i] if i < len(tops) else []) for i, lp in enumerate(ev.logprobs)
    ]


def has_chunk(ev: StreamDelta) -> bool:
    """Whether a delta becomes a chunk of a streamed chat or completion: not the User echo,
    and text, or an answer's log probabilities whose tokens have no text yet (a character
    split across tokens), so the streamed ``logprobs`` are every answer token."""
    return ev.kind != "input" and bool(ev.text or (ev.logprobs and ev.kind != "reasoning"))


class Run:
    """A running generation: ``events()`` yields its ``StreamDelta`` s then its ``Done``."""

    def __init__(self, runs: Runs, request: GenerateRequest, endpoint: str) -> None:
        self._runs = runs
        self.endpoint = endpoint
        #: Answers asked for (OpenAI ``n``): k answer streams of one decode session, each
        #: response tagged ``sequence_index`` (backend/serving/decode.py).
        self.sequences = request.num_return_sequences or 1
        self.generation = AsyncGeneration(runs.client, request)
        self.session_id: str = self.generation.session_id or ""
        self.created = time.time()
        self.t0 = time.perf_counter()
        self.cancelled = False
        #: option -> the request field that set it (``options.body_names``), for errors.
        self.names: dict[str, str] = {}
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._first_answer = False
        #: ``(text, logprob)`` per answer token when ``return_log_probs`` (OpenAI ``logprobs``).
        self.answer_logprobs: list[TokenLogprob] = []
        #: The same for sequences 1.. of ``n`` > 1 (``answer_logprobs`` is sequence 0's).
        self.sequence_logprobs: dict[int, list[TokenLogprob]] = {}
        self.task = asyncio.get_running_loop().create_task(self._pump())

    def logprobs_of(self, sequence: int) -> list[TokenLogprob]:
        """The answer's token log probabilities of one sequence (choice ``index``)."""
        return self.answer_logprobs if sequence == 0 else self.sequence_logprobs.get(sequence, [])

    async def _pump(self) -> None:
        metrics = self._runs.metrics
        try:
            async for ev in self.generation:
                if (
                    isinstance(ev, StreamDelta)
                    and not self._first_answer
                    and ev.kind == "output"
                    and (ev.text or ev.token_ids)
                ):
                    self._first_answer = True
                    metrics.ttft.labels(self.endpoint).observe(time.perf_counter() - self.t0)
                if isinstance(ev, StreamDelta) and ev.logprobs and ev.kind == "output":
                    if ev.sequence:
                        self.sequence_logprobs.setdefault(ev.sequence, []).extend(token_logprobs(ev))
                    else:
                        self.answer_logprobs += token_logprobs(ev)
                self._queue.put_nowait(ev)
        except MultiStreamCancelled:
            self._queue.put_nowait(MultiStreamCancelled("cancelled"))
        except MultiStreamError as e:
            self._queue.put_nowait(e)
        except Exception as e:  # noqa: BLE001 - never leave a reader waiting
            self._queue.put_nowait(MultiStreamError(f"{type(e).__name__}: {e}"))
        finally:
            self._queue.put_nowait(_END)
            self._runs._finished(self)

    async def events(self) -> AsyncIterator[StreamDelta | Done]:
        """Deltas, then ``Done``; raises the run's ``MultiStreamError`` where it failed."""
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """Stop the generation; the session is cancelled on the server (see the module doc)."""
        if not self.task.done():
            cancel_hop(self.session_id, "front_seen")  # bench.cancel_probe --trace
            self.cancelled = True
            self.generation.cancel()

    @property
    def done(self) -> bool:
        return self.task.done()


class Runs:
    """Every live run of the front, by session id: the concurrency bound and the gauges."""

    def __init__(
        self,
        client: AsyncMultiStreamClient,
        metrics: FrontMetrics,
        max_concurrent: int,
    ) -> None:
        #: The ensemble, for every request: ``n`` > 1 too (one session, n answer streams).
        self.client = client
        self.metrics = metrics
        self.max_concurrent = max_concurrent
        self.live: dict[str, Run] = {}

    def start(self, request: GenerateRequest, endpoint: str, names: dict[str, str] | None = None) -> Run:
        """A new run, or :class:`APIError` 429 when ``max_concurrent`` runs are live."""
        if len(self.live) >= self.max_concurrent:
            raise busy(
                f"server busy: {len(self.live)} requests in flight at the front "
                f"(--max-concurrent {self.max_concurrent}); retry shortly"
            )
        if request.session_id and request.session_id in self.live:
            raise bad_request(
                f"session_id {request.session_id!r} is already running; choose another", param="session_id"
            )
        run = Run(self, request, endpoint)
        run.names = names or {}
        self.live[run.session_id] = run
        self.metrics.inflight.set(len(self.live))
        return run

    def _finished(self, run: Run) -> None:
        if self.live.get(run.session_id) is run:
            del self.live[run.session_id]
        self.metrics.inflight.set(len(self.live))

    def cancel_all(self) -> None:
        for run in list(self.live.values()):
            run.cancel()

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Cancel every run and wait (bounded) for their server-side cancels to go out."""
        self.cancel_all()
        tasks = [r.task for r in self.live.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)
