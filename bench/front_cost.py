"""What the OpenAI front costs: the same requests through it and straight to Triton's gRPC.

One load driver for every path, so the difference is the front's alone: ``concurrency``
asyncio workers, each sending the same greedy prompts, through

- ``grpc``: straight to Triton with the project's ``AsyncMultiStreamClient`` (the client the
  front itself uses upstream);
- ``front``: the front with a minimal streaming HTTP client (``aiohttp``, which the project's
  HTTP client uses too; each server-sent event parsed as JSON): the front's own cost is this path's TTFT minus ``grpc``'s;
- ``front_sdk``: the front with the official ``openai`` SDK (``AsyncOpenAI``, streaming chat),
  what most users run: its TTFT minus ``front``'s is the SDK's own client-side cost (request
  models, typed chunk objects), paid in the client's process whatever server it talks to.

Every path first sends each prompt once (not measured), so all of them find the server's
prefix cache in the same state; an earlier version measured the front cold and gRPC warm. The
paths take turns in interleaved rounds at each level (``_level``); each reports TTFT (first
answer token), inter-token latency and answer tokens per second over its rounds. From two
clients on, a last phase runs gRPC and the front side by side (``_same_time``). Used by
``bench.aiperf``.
"""

from __future__ import annotations

import asyncio
import json
import math
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
    #: The server's own time from the request's arrival to that first token (its
    #: ``timing_ms``; the front passes it on with ``stream_options.include_server_timing``):
    #: ``ttft_s`` minus it is what the path outside the model cost the request.
    server_ttft_s: float = float("nan")


def _sample(t0: float, times: list[float], server_ms: float | None) -> Sample:
    """A request sent at ``t0`` whose answer tokens arrived at ``times``."""
    return Sample(
        times[0] - t0 if times else float("nan"),
        [b - a for a, b in zip(times, times[1:], strict=False)],
        len(times),
        server_ms / 1000 if server_ms is not None else float("nan"),
    )


def _summary(samples: list[Sample], wall_s: float) -> dict[str, Any]:
    ttft = sorted(s.ttft_s * 1000 for s in samples)
    itl = sorted(g * 1000 for s in samples for g in s.itl_s)
    tokens = sum(s.tokens for s in samples)
    outside = [(s.ttft_s - s.server_ttft_s) * 1000 for s in samples if not math.isnan(s.server_ttft_s)]
    return {
        "requests": len(samples),
        "ttft_ms_p50": statistics.median(ttft) if ttft else None,
        # TTFT outside the server's arrival-to-first-token (network, Triton's front end, and
        # the OpenAI front on its path): what a path adds, without the engine's queueing.
        "outside_server_ms_p50": statistics.median(outside) if outside else None,
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
    return _sample(t0, times, None)


async def _via_front_raw(client: Any, prompt: str, max_tokens: int, extra: dict[str, Any]) -> Sample:
    """The same chat request as ``_via_front``, read as plain server-sent events."""
    t0 = time.perf_counter()
    times: list[float] = []
    body = {
        "model": "multistream",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_server_timing": True},
        **extra,
    }
    server_ms = None
    async with client.post("/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            if not raw.startswith(b"data: {"):
                continue
            chunk = json.loads(raw[6:])
            choices = chunk.get("choices")
            if choices and choices[0]["delta"].get("content"):
                times.append(time.perf_counter())
                if server_ms is None and chunk.get("server_timing_ms"):
                    server_ms = chunk["server_timing_ms"][0]
    return _sample(t0, times, server_ms)


async def _direct(client: Any, prompt: str, max_tokens: int, extra: dict[str, Any]) -> Sample:
    from client import StreamDelta

    t0 = time.perf_counter()
    times: list[float] = []
    server_ms = None
    async for ev in client.generate(prompt, max_tokens=max_tokens, **extra):
        if isinstance(ev, StreamDelta) and ev.kind == "output" and ev.text:
            times.append(time.perf_counter())
            if server_ms is None and ev.timing_ms:
                server_ms = ev.timing_ms[0]
    return _sample(t0, times, server_ms)


PATHS = ("grpc", "front", "front_sdk")


async def _level(urls: dict[str, str], concurrency: int, requests: int, max_tokens: int, extra: dict) -> dict:
    """One concurrency level of every path, in ``ROUNDS`` interleaved rounds (grpc, front,
    front_sdk, grpc, ...) so that a machine whose speed drifts over a minute (a shared VM)
    weighs on each path alike; per path, the samples and wall times of its rounds summed.
    Each client is built once (as a real caller keeps one) and shared by the ``concurrency``
    workers; each prompt goes once through each path first, unmeasured (see above)."""
    calls = {"grpc": (_direct, _grpc), "front": (_via_front_raw, _http), "front_sdk": (_via_front, _openai)}
    clients = {p: calls[p][1](urls[p]) for p in PATHS}
    for p in PATHS:
        for prompt in PROMPTS:
            await calls[p][0](clients[p], prompt, 2, extra)
    samples: dict[str, list[Sample]] = {p: [] for p in PATHS}
    walls = dict.fromkeys(PATHS, 0.0)
    per_round = max(concurrency, -(-requests // ROUNDS))
    for r in range(ROUNDS):
        for p in PATHS:
            queue: asyncio.Queue[str] = asyncio.Queue()
            for i in range(per_round):
                queue.put_nowait(PROMPTS[(r * per_round + i) % len(PROMPTS)])

            async def worker(p: str = p, queue: asyncio.Queue[str] = queue) -> None:
                while not queue.empty():
                    prompt = queue.get_nowait()
                    samples[p].append(await calls[p][0](clients[p], prompt, max_tokens, extra))

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            walls[p] += time.perf_counter() - t0
    out = {p: _summary(samples[p], walls[p]) for p in PATHS}
    if concurrency >= 2:
        out["same_time"] = await _same_time(calls, clients, concurrency, requests, max_tokens, extra)
    for client in clients.values():
        await client.close()
    return out


async def _same_time(
    calls: dict[str, Any],
    clients: dict[str, Any],
    concurrency: int,
    requests: int,
    max_tokens: int,
    extra: dict,
) -> dict[str, Any]:
    """Half the workers straight to gRPC, half through the front, at the same time.

    Why: at 16 clients a TTFT p50 is some 150 ms of queueing for the engine, and on a shared
    VM it moved by ±30 ms between back-to-back rounds of one path, far more than the front's
    own share. Requests that run side by side meet the same machine and the same engine
    batches, so the difference of their medians is the front's own added latency. What the
    front's CPU takes from the engine slows both halves alike here; the rounds' throughput
    ratio is what measures that."""
    halves = ("grpc", "front")
    got: dict[str, list[Sample]] = {p: [] for p in halves}
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(max(requests, concurrency)):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])

    async def worker(p: str) -> None:
        while not queue.empty():
            prompt = queue.get_nowait()
            got[p].append(await calls[p][0](clients[p], prompt, max_tokens, extra))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(halves[k % 2]) for k in range(concurrency)))
    wall = time.perf_counter() - t0
    return {p: _summary(got[p], wall) for p in halves}


#: Interleaved rounds per level (``_level``).
ROUNDS = 4


def _http(front_url: str) -> Any:
    import aiohttp

    return aiohttp.ClientSession(base_url=front_url, timeout=aiohttp.ClientTimeout(total=600))


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
    """``{concurrency: {"grpc", "front", "front_sdk": summaries, "same_time": {"grpc",
    "front"} (from 2 clients), "ttft_added_ms_p50", "ttft_added_ms_p50_same_time",
    "throughput_ratio", "sdk_client_ttft_ms_p50", "sdk_throughput_ratio"}}``: the first three
    are the front's own cost (minimal HTTP client against direct gRPC; the same-time figure is
    the steadier one under load, see :func:`_same_time`), the last two what the ``openai`` SDK
    adds on top in its own process."""
    urls = {"grpc": grpc_url, "front": front_url, "front_sdk": front_url}
    out: dict[str, Any] = {}
    for c in levels:
        level = asyncio.run(_level(urls, c, max(requests, c), max_tokens, extra or {}))
        direct, raw, sdk = level["grpc"], level["front"], level["front_sdk"]
        same = level.get("same_time")
        out[str(c)] = {
            **level,
            "ttft_added_ms_p50": raw["ttft_ms_p50"] - direct["ttft_ms_p50"],
            "ttft_added_ms_p50_same_time": (
                same["front"]["ttft_ms_p50"] - same["grpc"]["ttft_ms_p50"] if same else None
            ),
            "ttft_added_ms_p50_outside_server": (
                raw["outside_server_ms_p50"] - direct["outside_server_ms_p50"]
                if raw["outside_server_ms_p50"] is not None and direct["outside_server_ms_p50"] is not None
                else None
            ),
            "throughput_ratio": raw["output_tokens_per_s"] / direct["output_tokens_per_s"],
            "sdk_client_ttft_ms_p50": sdk["ttft_ms_p50"] - raw["ttft_ms_p50"],
            "sdk_throughput_ratio": sdk["output_tokens_per_s"] / direct["output_tokens_per_s"],
        }
    return out
