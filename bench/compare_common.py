"""Shared pieces of ``bench.compare``: the workload, per-request records, statistics, RSS.

Why a separate module: every system's runner (``compare_triton``, ``compare_local`` in a
child process, ``compare_llama_server``) must agree on the workload and on how a request
is summarised, so that lives here.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
LOAD_PROMPTS = REPO_ROOT / "load" / "prompts.json"
BENCH_PROMPTS = Path(__file__).resolve().parent / "prompts.json"

#: Filler for the long prompt: a neutral passage repeated until the chat-templated prompt
#: reaches the target length, then one question, so every system prefills the same ids.
_LONG_FILLER = (
    "The following is an excerpt from a field report about a small river town. Every spring the "
    "river rises with snowmelt from the mountains to the north, and every spring the town argues "
    "about the levee. The older residents remember the flood of the wet year, when the water reached "
    "the steps of the church and the bakery lost a season of flour. The younger residents point out "
    "that the levee has held for thirty years and that the money would pay for a new school roof. "
)
_LONG_QUESTION = "\n\nSummarize the disagreement in three sentences and propose one fair next step."
#: Questions that follow one shared long passage in the repeated-prefix test (the first
#: request computes the passage, the others can reuse it from a prefix cache).
_PREFIX_QUESTIONS = (
    _LONG_QUESTION,
    "\n\nWho are the two sides of the argument, in one sentence each?",
    "\n\nWhat happened in the wet year? Answer briefly.",
    "\n\nList three things the town could spend the money on.",
    "\n\nWrite a headline for this report.",
)


def load_prompts() -> tuple[list[str], str]:
    """The bundled prompt set and where it came from (``load/prompts.json`` if present).

    Sharing the locust prompt set keeps the load test and this benchmark on the same
    traffic; the bench copy is the fallback if ``load/`` is not there.
    """
    for path in (LOAD_PROMPTS, BENCH_PROMPTS):
        if path.exists():
            prompts = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"{path}: expected a JSON list of non-blank strings")
            return prompts, str(path.relative_to(REPO_ROOT))
    raise FileNotFoundError(f"no prompt set: neither {LOAD_PROMPTS} nor {BENCH_PROMPTS} exists")


def make_long_prompt(tokenizer: Any, target_tokens: int = 512) -> tuple[str, int]:
    """A user message whose chat-templated prompt is ``target_tokens`` long (within a few).

    Built by trimming a repeated passage at token granularity, with the server's own
    tokenizer and chat template (``backend.tokenizer.Tokenizer``), so "the 512-token prompt"
    means 512 prompt ids for the server and for HF; llama.cpp tokenizes the same text with
    the same vocabulary. Returns (user text, templated prompt length).
    """

    def templated_len(text: str) -> int:
        return len(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}])))

    overhead = templated_len(_LONG_QUESTION.strip())
    filler_ids: list[int] = []
    while len(filler_ids) < target_tokens * 2:
        filler_ids += tokenizer.encode(_LONG_FILLER)
    n = max(1, target_tokens - overhead)
    text = ""
    for _ in range(8):  # decode/encode round trips can shift the count by a token or two
        text = tokenizer.decode(filler_ids[:n]).rstrip() + _LONG_QUESTION
        got = templated_len(text)
        if got == target_tokens:
            break
        n += target_tokens - got
    return text, templated_len(text)


def repeated_prefix_prompts(long_prompt: str, requests: int) -> list[str]:
    """``requests`` prompts that share the long prompt's passage and differ in the question.

    What a prefix cache is for: a system prompt or earlier turns sent again with a new
    question. Each prompt is still a single user message, so every system renders it with
    the same chat template; only the question's few tokens (and the template's tail) differ.
    """
    passage = long_prompt.removesuffix(_LONG_QUESTION)
    return [passage + _PREFIX_QUESTIONS[i % len(_PREFIX_QUESTIONS)] for i in range(requests)]


@dataclass
class Workload:
    """What every system is asked to do (the same for all four)."""

    prompts: list[str]
    long_prompt: str
    max_tokens: int = 64
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    long_repeats: int = 2
    threads: int = 2
    dtype: str = "auto"
    #: Requests each closed-loop worker runs per level (at least; the prompt set may add more).
    requests_per_worker: int = 3

    #: Requests of the repeated-prefix test (the first one fills the cache).
    prefix_requests: int = 4

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Workload:
        return cls(**json.loads(text))

    def requests_at(self, concurrency: int) -> list[str]:
        """Prompts for one concurrency level: ``requests_per_worker`` per worker, cycling the set.

        Why more than one per worker: with one, the level is a single wave (all prefills at
        once, then a tail where the longest answers run alone), so "16 concurrent" held only
        for part of the wall time; measured here, one wave gave 74-105 tok/s and three per
        worker 102-118 on the same server. Closed-loop serving benchmarks (vLLM's
        ``benchmark_serving``) likewise send many more requests than the concurrency.
        """
        n = max(concurrency * max(1, self.requests_per_worker), len(self.prompts))
        return [self.prompts[i % len(self.prompts)] for i in range(n)]


@dataclass
class RequestRecord:
    """One request as the client saw it (seconds, client clock)."""

    ttft_s: float  # request sent -> first user-facing token
    tokens: int  # user-facing tokens received
    total_s: float  # request sent -> last token / end
    decode_tok_s: float | None  # (tokens - 1) / (last - first); None with < 2 tokens
    prompt_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def decode_rate(tokens: int, first_t: float | None, last_t: float | None) -> float | None:
    """Tokens per second after the first token: prefill is excluded, as in ``bench.engine``."""
    if tokens < 2 or first_t is None or last_t is None or last_t <= first_t:
        return None
    return (tokens - 1) / (last_t - first_t)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default) without needing numpy here."""
    vals = sorted(v for v in values if v is not None and not math.isnan(v))
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def summarize_requests(records: list[RequestRecord]) -> dict[str, Any]:
    """TTFT p50/p95 and per-request decode rate (mean and p50) of a sequential pass."""
    rates = [r.decode_tok_s for r in records if r.decode_tok_s]
    return {
        "requests": len(records),
        "ttft_p50_s": percentile([r.ttft_s for r in records], 50),
        "ttft_p95_s": percentile([r.ttft_s for r in records], 95),
        "decode_tok_s_mean": sum(rates) / len(rates) if rates else None,
        "decode_tok_s_p50": percentile(rates, 50),
        "output_tokens": sum(r.tokens for r in records),
    }


def repeated_prefix_summary(runs: list[RequestRecord]) -> dict[str, Any]:
    """The first request computes the shared passage; the TTFT of the others is the cache's figure."""
    return {
        "requests": len(runs),
        "first_ttft_s": runs[0].ttft_s,
        "ttft_p50_s": percentile([r.ttft_s for r in runs[1:]], 50),
        "ttft_runs_s": [r.ttft_s for r in runs],
        "prompt_tokens": [r.prompt_tokens for r in runs],
    }


def aggregate(
    records: list[RequestRecord], wall_s: float, concurrency: int, note: str = ""
) -> dict[str, Any]:
    """Aggregate throughput of one concurrency level: all user-facing tokens / wall time."""
    tokens = sum(r.tokens for r in records)
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": len(records),
        "output_tokens": tokens,
        "wall_s": wall_s,
        "tok_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": percentile([r.ttft_s for r in records], 50),
        "ttft_p95_s": percentile([r.ttft_s for r in records], 95),
    }
    if note:
        out["note"] = note
    return out


class RssMonitor:
    """Peak resident set size of a process and all its descendants, sampled with psutil.

    Why sampling a tree: Triton runs every Python model instance as a separate stub
    process, so the server's memory is the sum over the tree, not the tritonserver binary.
    A 50 ms period catches the plateau (weights, KV) reliably; short spikes may be missed.
    """

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        import psutil

        self._proc = psutil.Process(pid)
        self._period = period_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)

    def sample(self) -> int:
        import psutil

        total = 0
        try:
            procs = [self._proc, *self._proc.children(recursive=True)]
        except psutil.Error:
            return 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._period)

    def __enter__(self) -> RssMonitor:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sample()

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


def now() -> float:
    """The one clock every system is timed with."""
    return time.perf_counter()


async def closed_loop(
    prompts: list[str], concurrency: int, one: Callable[[str], Awaitable[RequestRecord]]
) -> list[RequestRecord]:
    """``concurrency`` closed-loop workers share ``prompts``, each sending its next request
    when the last one ends (``one``: prompt -> record). One definition, so every system's
    levels are driven the same way."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    records: list[RequestRecord] = []

    async def worker() -> None:
        while True:
            try:
                prompt = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            records.append(await one(prompt))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records
