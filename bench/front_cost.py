"""What the OpenAI front costs: the same requests through it and straight to Triton's gRPC.

One load driver for both paths, so the difference is the front's alone: ``concurrency``
asyncio workers, each sending the same greedy prompts; through the front with the official
``openai`` SDK (``AsyncOpenAI``, streaming chat), straight with the project's
``AsyncMultiStreamClient``. The two paths alternate level by level in one run (same machine,
same minute), and each reports TTFT (first answer token), inter-token latency and answer
tokens per second over the whole level. Used by ``bench.aiperf``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

PROMPTS = [
    "Why is the sky blue?",
    "Name three rivers in Europe.",
    "What is a prime number?",
    "How do plants make food?",
    "Explain what a compiler does.",
    "What causes the seasons?",
    "Why do cats purr?",
    "What is the speed of light?",
]


@dataclass
class Sample:
    ttft_s: float
    itl_s: list[float]
    tokens: int


def _summary(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ttft = sorted(s.ttft_s * 1000 for s in samples)
    itl = sorted(g * 1000 for s in samples for g in s.itl_s)
    tokens = sum(s.tokens for s in samples)
    return {
        "requests": len(samples),
        "ttft_ms_p50": statistics.median(ttft) if ttft else None,
        "ttft_ms_p90": ttft[int(0.9 * (len(ttft) - 1))] if ttft else None,
        "itl_ms_p50": statistics.median(itl) if itl else None,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
    }


async def _via_front(client: Any, prompt: str, max_tokens: int, extra: dict[str, Any]) -> Sample:
    t0 = time.perf_counter()
    times: list[float] = []
    stream = await client.chat.completions.create(
        model="multistream",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        stream=True,
        extra_body=extra,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
    return Sample(
        times[0] - t0 if times else float("nan"),
        [b - a for a, b in zip(times, times[1:], strict=False)],
        len(times),
    )


async def _direct(client: Any, prompt: str, max_tokens: int, extra: dict[str, Any]) -> Sample:
    from client import StreamDelta

    t0 = time.perf_counter()
    times: list[float] = []
    async for ev in client.generate(prompt, max_tokens=max_tokens, **extra):
        if isinstance(ev, StreamDelta) and ev.kind == "output" and ev.text:
            times.append(time.perf_counter())
    return Sample(
        times[0] - t0 if times else float("nan"),
        [b - a for a, b in zip(times, times[1:], strict=False)],
        len(times),
    )


async def _level(call: Any, make: Any, concurrency: int, requests: int, max_tokens: int, extra: dict) -> dict:
    """One level: ``make()`` builds the client once (as a real caller keeps one); the
    ``concurrency`` workers share it."""
    client = make()
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    samples: list[Sample] = []

    async def worker() -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            samples.append(await call(client, prompt, max_tokens, extra))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    return _summary(samples, wall)


def _openai(front_url: str) -> Any:
    import openai

    return openai.AsyncOpenAI(base_url=f"{front_url}/v1", api_key="unused", max_retries=0, timeout=600)


def _grpc(grpc_url: str) -> Any:
    from client import AsyncMultiStreamClient

    return AsyncMultiStreamClient(grpc_url)


def compare(
    front_url: str,
    grpc_url: str,
    levels: list[int],
    requests: int,
    max_tokens: int,
    extra: dict | None = None,
) -> dict[str, Any]:
    """``{concurrency: {"front": ..., "grpc": ..., "ttft_added_ms_p50", "throughput_ratio"}}``."""
    out: dict[str, Any] = {}
    for c in levels:
        n = max(requests, c)
        front = asyncio.run(_level(_via_front, lambda: _openai(front_url), c, n, max_tokens, extra or {}))
        direct = asyncio.run(_level(_direct, lambda: _grpc(grpc_url), c, n, max_tokens, extra or {}))
        out[str(c)] = {
            "front": front,
            "grpc": direct,
            "ttft_added_ms_p50": front["ttft_ms_p50"] - direct["ttft_ms_p50"],
            "throughput_ratio": front["output_tokens_per_s"] / direct["output_tokens_per_s"],
        }
    return out
