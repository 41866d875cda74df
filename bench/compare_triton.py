"""Systems (a) and (b) of ``bench.compare``: the ``multistream`` Triton server, through ``client/``.

(a) ``multistream``: the prompt set through the gRPC streaming API, one request at a time
    (TTFT, per-request decode rate, aggregate at concurrency 1) and then with N requests in
    flight (``AsyncMultiStreamClient``, N workers each sending its next request as soon as
    the previous one finishes, until the level's requests are done); plus the long prompt,
    plus the *reasoning* requests: ``reasoning_streams=1, reasoning_budget=B``, whose answer
    TTFT is what the paper's layout promises to keep low.

(b) ``think_then_answer``: the same server, with reasoning done the ordinary way, *before*
    the answer. Per question two requests, back to back:

    1. think: ``THINK_TEMPLATE`` ("Think step by step, in detail, about how to answer the
       question below ... Do not answer it yet. Question: <q>") with ``max_tokens=B`` (the
       reasoning budget) and no reasoning streams: the answer of this request *is* the thinking;
    2. answer: ``"<q>\\n\\nNotes from thinking it through:\\n<thinking>\\n\\nNow answer the
       question."`` with the answer's ``max_tokens``.

    Its answer TTFT is measured from the moment request 1 is sent to the first token of
    request 2's answer, i.e. what a user waits for the first word of the answer.

The model may stop thinking before the budget (EOS), which makes (b) cheaper than a
reasoning run that uses the budget; the contract has no ``ignore_eos``. So (b) also reports
an *estimate* at the full budget: think TTFT + (B - 1) / think decode rate + answer TTFT,
labelled as such (``ttft_full_budget_est_*``).

The (a)-reasoning and (b) requests are interleaved question by question, so both see the
same background load on a shared machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.compare_common import (
    RequestRecord,
    Workload,
    aggregate,
    closed_loop,
    now,
    percentile,
    repeated_prefix_prompts,
    repeated_prefix_summary,
    summarize_requests,
)
from client import AsyncMultiStreamClient, Done, MultiStreamClient

THINK_TEMPLATE = (
    "Think step by step, in detail, about how to answer the question below: what it asks, what you "
    "know about it, and what could go wrong. Do not answer it yet.\n\nQuestion: {q}"
)
ANSWER_TEMPLATE = "{q}\n\nNotes from thinking it through:\n{thinking}\n\nNow answer the question."


def record_from_done(done: Done, stream: str = "output", t_offset: float = 0.0) -> RequestRecord:
    """A client ``Done`` summary as a RequestRecord of its user-facing stream.

    ``t_offset`` is added to TTFT and total time (for (b), the time spent thinking first).
    """
    tokens = int(done.tokens.get(stream, 0))
    rate = done.tokens_per_s.get(stream) if tokens > 1 else None
    return RequestRecord(
        ttft_s=t_offset + done.ttft_s.get(stream, done.total_s),
        tokens=tokens,
        total_s=t_offset + done.total_s,
        decode_tok_s=rate,
    )


async def _run_level(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list, float]:
    """``concurrency`` closed-loop workers share ``prompts`` (``closed_loop``); returns records and wall time."""
    client = AsyncMultiStreamClient(url, protocol="grpc")

    async def one(prompt: str) -> RequestRecord:
        return record_from_done(await client.generate(prompt, max_tokens=max_tokens).result())

    t0 = now()
    try:
        records = await closed_loop(prompts, concurrency, one)
    finally:
        close = getattr(client, "close", None)
        if close is not None:
            res = close()
            if asyncio.iscoroutine(res):
                await res
    return records, now() - t0


def run_multistream(url: str, workload: Workload) -> dict[str, Any]:
    """(a) without reasoning: sequential pass, concurrency levels, long prompt."""
    with MultiStreamClient(url, protocol="grpc") as c:
        c.generate("Hello!", max_tokens=4).result()  # warm-up
        records: list[RequestRecord] = []
        t0 = now()
        for p in workload.prompts:
            records.append(record_from_done(c.generate(p, max_tokens=workload.max_tokens).result()))
        seq_wall = now() - t0
        by_conc: dict[str, Any] = {}
        if 1 in workload.concurrency:
            by_conc["1"] = aggregate(records, seq_wall, 1)
        for level in workload.concurrency:
            if level == 1:
                continue
            recs, wall = asyncio.run(_run_level(url, workload.requests_at(level), level, workload.max_tokens))
            by_conc[str(level)] = aggregate(recs, wall, level)
        long_runs = [
            record_from_done(c.generate(workload.long_prompt, max_tokens=workload.max_tokens).result())
            for _ in range(max(1, workload.long_repeats))
        ]
    return {
        "system": "multistream",
        "available": True,
        "one_at_a_time": False,
        "requests": summarize_requests(records),
        "aggregate": by_conc,
        "long_prompt": {
            "ttft_s": min(r.ttft_s for r in long_runs),  # best of N: see bench.compare
            "ttft_runs_s": [r.ttft_s for r in long_runs],
        },
    }


def run_repeated_prefix(url: str, workload: Workload) -> dict[str, Any]:
    """The long prompt's passage with new questions (prefix cache on): TTFT of the 2nd.. requests."""
    with MultiStreamClient(url, protocol="grpc") as c:
        c.generate("Hello!", max_tokens=4).result()  # warm-up
        runs = [
            record_from_done(c.generate(p, max_tokens=workload.max_tokens).result())
            for p in repeated_prefix_prompts(workload.long_prompt, workload.prefix_requests)
        ]
    return repeated_prefix_summary(runs)


def run_reasoning_comparison(
    url: str, questions: list[str], budget: int, max_tokens: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(a) with one reasoning stream vs (b) think-then-answer, interleaved per question.

    Returns (multistream reasoning summary, think_then_answer system entry).
    """
    ms: list[RequestRecord] = []
    ms_reason_tokens: list[int] = []
    ms_reason_ttft: list[float] = []
    seq: list[RequestRecord] = []
    think_tokens: list[int] = []
    think_s: list[float] = []
    full_budget_est: list[float] = []
    t_seq_total = 0.0
    with MultiStreamClient(url, protocol="grpc") as c:
        for q in questions:
            done = c.generate(q, max_tokens=max_tokens, reasoning_streams=1, reasoning_budget=budget).result()
            ms.append(record_from_done(done))
            rs = [s for s in done.tokens if s.startswith("reasoning")]
            ms_reason_tokens.append(sum(int(done.tokens[s]) for s in rs))
            if rs:
                ms_reason_ttft.append(min(done.ttft_s.get(s, done.total_s) for s in rs))

            t0 = now()
            think = c.generate(THINK_TEMPLATE.format(q=q), max_tokens=budget).result()
            t_think = now() - t0
            answer = c.generate(
                ANSWER_TEMPLATE.format(q=q, thinking=think.output_text.strip()), max_tokens=max_tokens
            ).result()
            t_seq_total += now() - t0
            seq.append(record_from_done(answer, t_offset=t_think))
            think_tokens.append(int(think.tokens.get("output", 0)))
            think_s.append(t_think)
            think_rate = think.tokens_per_s.get("output")
            if think_rate and "output" in think.ttft_s and "output" in answer.ttft_s:
                full_budget_est.append(
                    think.ttft_s["output"] + (budget - 1) / think_rate + answer.ttft_s["output"]
                )

    multistream_reasoning = {
        "reasoning_streams": 1,
        "reasoning_budget": budget,
        **summarize_requests(ms),
        "reasoning_tokens_mean": sum(ms_reason_tokens) / len(ms_reason_tokens) if ms_reason_tokens else 0,
        "reasoning_ttft_p50_s": percentile(ms_reason_ttft, 50),
    }
    answers = sum(r.tokens for r in seq)
    think_then_answer = {
        "system": "think_then_answer",
        "available": True,
        "one_at_a_time": True,
        "definition": "request 1 thinks (max_tokens = budget, its answer is the thinking), request 2 "
        "answers with the thinking in its prompt; TTFT = request 1 sent -> first answer token",
        "reasoning_budget": budget,
        "requests": summarize_requests(seq),
        "think_tokens_mean": sum(think_tokens) / len(think_tokens) if think_tokens else 0,
        "think_s_p50": percentile(think_s, 50),
        "ttft_full_budget_est_p50_s": percentile(full_budget_est, 50),
        "ttft_full_budget_est_note": "estimate, not a measurement: think TTFT + (budget - 1) / think "
        "decode rate + answer TTFT, i.e. (b) if the thinking had used the whole budget",
        "aggregate": {
            "1": {
                "concurrency": 1,
                "requests": len(seq),
                "output_tokens": answers,
                "wall_s": t_seq_total,
                "tok_s": answers / t_seq_total if t_seq_total > 0 else None,
                "note": "user-facing answer tokens / wall time of the think+answer pairs",
            }
        },
        "aggregate_note": "measured at concurrency 1 only: every request costs budget + max_tokens "
        "tokens, so 4 and 16 in flight do not fit the benchmark's time budget on 2 cores",
    }
    return multistream_reasoning, think_then_answer
