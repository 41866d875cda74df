"""System (d) of ``bench.compare``: llama.cpp's own server, ``llama-server``, on the same GGUF.

Started by ``bench.llama_server`` with one parallel slot per client of the largest level and
continuous batching, the GGUF's own chat template (``--jinja``), the same threads as the
project, and driven through its OpenAI-compatible streaming endpoint
(``/v1/chat/completions``, ``stream: true``) by the ``openai`` SDK, which is what a user of it
would call. Every request sends the prompt as one user message, greedy (``temperature: 0``)
with the workload's ``max_tokens``, so both servers render the same template over the same
text (the JSON records the prompt lengths llama-server reports, to check that).

Two phases, each on a fresh server:

1. prompt cache off (``--no-cache-prompt --cache-ram 0``, and ``cache_prompt: false`` per
   request): the sequential pass, the closed-loop concurrency levels and the long prompt,
   so that no request is shortened by an earlier one's KV;
2. prompt cache on (its default): the repeated-prefix test (``compare_common``'s
   ``repeated_prefix_prompts``), to compare with the project's own prefix cache.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from bench.compare_common import (
    RequestRecord,
    RssMonitor,
    Workload,
    aggregate,
    closed_loop,
    decode_rate,
    now,
    repeated_prefix_prompts,
    repeated_prefix_summary,
    summarize_requests,
)


async def _one(client: Any, prompt: str, max_tokens: int, cache_prompt: bool) -> RequestRecord:
    """One streamed chat completion; times every content chunk on the client clock."""
    t0 = now()
    stream = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"cache_prompt": cache_prompt},
    )
    times: list[float] = []
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta is not None and choice.delta.content:
                times.append(now())
    t_end = now()
    # One content chunk per token, except where a token is not yet printable UTF-8:
    # the server's own count is authoritative when it sends one.
    n = int(usage.completion_tokens) if usage is not None else len(times)
    first = times[0] if times else None
    return RequestRecord(
        ttft_s=(first - t0) if first is not None else t_end - t0,
        tokens=n,
        total_s=(times[-1] if times else t_end) - t0,
        decode_tok_s=decode_rate(n, first, times[-1] if times else None),
        prompt_tokens=int(usage.prompt_tokens) if usage is not None else None,
    )


#: The SDK's own retries: only for a connection that fails before any response (cpp-httplib
#: closes a keep-alive connection after a number of requests, and a request sent on it just
#: then never reached the server). A retried request's time includes the failed attempt.
MAX_RETRIES = 2


async def _level(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list, float]:
    """The level's records and wall time, as ``compare_triton._run_level``."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=MAX_RETRIES, timeout=600)
    t0 = now()
    try:
        records = await closed_loop(
            prompts, concurrency, lambda p: _one(client, p, max_tokens, cache_prompt=False)
        )
    finally:
        await client.close()
    return records, now() - t0


async def _sequential(
    url: str, prompts: list[str], max_tokens: int, cache_prompt: bool
) -> list[RequestRecord]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=MAX_RETRIES, timeout=600)
    try:
        return [await _one(client, p, max_tokens, cache_prompt) for p in prompts]
    finally:
        await client.close()


def run_llama_server(workload: Workload, out_dir: Path, allow_build: bool) -> dict[str, Any]:
    """Both phases; a "skipped" entry (with the reason) when there is no binary to run."""
    from backend.model_store import find_default_gguf
    from bench import llama_server as ls

    exe = ls.find_binary()
    if exe is None:
        if not allow_build:
            return {
                "system": "llama_server",
                "available": False,
                "skipped": "llama-server is not built on this machine (--quick never builds it; run "
                "`python -m bench.llama_server build`, several minutes, or the full bench.compare)",
            }
        exe = ls.build(say=lambda m: print(f"[llama_server] {m}", flush=True))
    slots = max(workload.concurrency)
    base = ls.LlamaServerConfig(
        model=find_default_gguf(), threads=workload.threads, parallel=slots, context=max(4096, 1024 * slots)
    )
    info = {"binary": str(exe), "args": base.serving_args(), "build": ls.build_info(exe)}
    out: dict[str, Any] = {"system": "llama_server", "available": True, "one_at_a_time": False, "info": info}

    server = ls.LlamaServer(exe, base, out_dir / "llama_server.log")
    with server, RssMonitor(server.process.pid) as rss:  # type: ignore[union-attr]
        asyncio.run(_sequential(server.url, ["Hello!"], 4, False))  # warm-up
        t0 = now()
        records = asyncio.run(_sequential(server.url, workload.prompts, workload.max_tokens, False))
        seq_wall = now() - t0
        by_conc: dict[str, Any] = {}
        if 1 in workload.concurrency:
            by_conc["1"] = aggregate(records, seq_wall, 1)
        for level in workload.concurrency:
            if level != 1:
                recs, wall = asyncio.run(
                    _level(server.url, workload.requests_at(level), level, workload.max_tokens)
                )
                by_conc[str(level)] = aggregate(recs, wall, level)
        long_runs = asyncio.run(
            _sequential(
                server.url, [workload.long_prompt] * max(1, workload.long_repeats), workload.max_tokens, False
            )
        )
    out["requests"] = summarize_requests(records)
    out["prompt_tokens"] = [r.prompt_tokens for r in records]
    out["aggregate"] = by_conc
    out["long_prompt"] = {
        "prompt_tokens": long_runs[0].prompt_tokens,
        "ttft_s": min(r.ttft_s for r in long_runs),  # best of N: see bench.compare
        "ttft_runs_s": [r.ttft_s for r in long_runs],
    }
    out["peak_rss_mib"] = rss.peak_mib

    cached = ls.LlamaServerConfig(**{**vars(base), "prompt_cache": True})
    server = ls.LlamaServer(exe, cached, out_dir / "llama_server_cached.log")
    with server:
        prompts = repeated_prefix_prompts(workload.long_prompt, workload.prefix_requests)
        runs = asyncio.run(_sequential(server.url, prompts, workload.max_tokens, True))
    out["repeated_prefix"] = repeated_prefix_summary(runs)
    return out
