"""Serving benchmark through a real tritonserver: ``python -m bench.serving --json``.

Three figures, each a ratio measured in one run on the same weights, dtype and threads
(this machine is shared, so absolute numbers drift and only same-run ratios mean much):

- ``per_token``: the steady-state time per streamed answer token through Triton (gRPC
  stream, ensemble, decoupled decode) minus the same in the engine in-process. Target:
  <= 1 ms of overhead per token.
- ``ttft_reasoning``: time to the first user-facing token of a request that also runs a
  256-token reasoning stream, versus sequential think-then-answer on the same server
  (reasoning to completion, then the answer): ``think time + answer TTFT``. Also the TTFT of
  the ``revision`` stream of ``sync: "revise"``, which is think-then-answer inside one
  request. Target: >= 10x lower.
- ``ttft_vs_hf``: client TTFT through Triton (tokenize, prefill in its own instance, KV
  hand-off to decode, first token) versus ``transformers`` ``generate(max_new_tokens=1)``
  from text, in-process. Target: <= 1.3x. ``kv_handoff`` reports the bytes of prompt KV
  that cross from prefill to decode and the TTFT cost over an in-process engine.

Every value is the median of ``--repeats`` runs. Per-token rates exclude the first token:
``(t_last - t_first) / (n - 1)`` for both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np
import torch

from backend.engine import Engine, EngineConfig, SamplingParams, StreamSpec, resolve_dtype
from backend.model_store import resolve_model_dir
from backend.serving.preprocessing import prompt_ids

STORY = "Write a long story about a dragon who learns to paint."
QUESTION = "Explain briefly why the sky is blue."
TYPES = {
    "text_input": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32),
    "stream": ("BOOL", np.bool_),
    "reasoning_streams": ("INT32", np.int32),
    "reasoning_budget": ("INT32", np.int32),
    "sync": ("BYTES", np.object_),
}


def triton_request(url: str, timeout: float = 300, **values: Any) -> dict[str, list[tuple[float, int]]]:
    """One gRPC streaming request; returns ``{stream: [(seconds since send, tokens)]}``."""
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((time.perf_counter(), result, error)))
    inputs = []
    for name, v in values.items():
        dt, np_dt = TYPES[name]
        arr = np.array([[v.encode() if isinstance(v, str) else v]], dtype=np_dt)
        inp = grpcclient.InferInput(name, [1, 1], dt)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    out: dict[str, list[tuple[float, int]]] = {}
    t0 = time.perf_counter()
    client.async_stream_infer("multistream", inputs, enable_empty_final_response=True)
    try:
        while True:
            t, result, error = got.get(timeout=timeout)
            if error is not None:
                raise RuntimeError(str(error))
            name = result.as_numpy("stream_name")
            if name is not None:
                ids = result.as_numpy("output_ids")
                out.setdefault(name.reshape(-1)[0].decode(), []).append(
                    (t - t0, 0 if ids is None else ids.size)
                )
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def per_token_s(stamps: list[tuple[float, int]]) -> float:
    """Steady-state seconds per token, excluding the first delta."""
    tokens = sum(n for _, n in stamps[1:])
    return (stamps[-1][0] - stamps[0][0]) / tokens if tokens else float("nan")


def engine_run(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """In-process: (TTFT s from submit incl. prefill, s/token after the first, tokens)."""
    q: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    engine.submit(
        prompt, [StreamSpec("output", "output", SamplingParams(max_tokens=max_tokens))], on_event=q.put
    )
    stamps: list[tuple[float, int]] = []
    while True:
        ev = q.get(timeout=300)
        if ev.token_ids:
            stamps.append((time.perf_counter() - t0, len(ev.token_ids)))
        if ev.finished:
            break
    return stamps[0][0], per_token_s(stamps), sum(n for _, n in stamps)


def engine_ttft_from_text(engine: Engine, text: str) -> float:
    """In-process TTFT from text, like the server's: chat template + tokenize + prefill + first token."""
    t = time.perf_counter()
    prompt = prompt_ids(engine.tokenizer, text)
    return time.perf_counter() - t + engine_run(engine, prompt, 1)[0]


def hf_ttft(model_dir: Any, dtype: torch.dtype, text: str, repeats: int) -> float:
    """``transformers`` TTFT from text: chat template + tokenize + generate 1 token."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()

    def once() -> float:
        t = time.perf_counter()
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )
        with torch.inference_mode():
            model.generate(**ids, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - t

    once()
    return statistics.median(once() for _ in range(repeats))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per engine (server instances too)")
    ap.add_argument("--tokens", type=int, default=64, help="answer tokens for the per-token figure")
    ap.add_argument("--reasoning-budget", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--url", default=None, help="use a running server (host:grpc_port) instead of starting one"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)

    model_dir = resolve_model_dir(args.model_dir)
    dtype = resolve_dtype(args.dtype)
    dtype_name = str(dtype).removeprefix("torch.")
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if args.json else print
    threads = args.threads
    handle = None
    if args.url is None:
        from launcher.serve import start_server

        log("starting tritonserver ...")
        handle = start_server(
            model_dir=str(model_dir),
            dtype=dtype_name,
            decode_instances=1,
            reasoning_instances=1,
            prefill_instances=1,
            threads={"decode": threads, "reasoning": threads, "prefill": threads},
            max_sessions=8,
            max_context=2048,
        )
    url = args.url or handle.grpc_url
    result: dict[str, Any] = {
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "dtype": dtype_name,
        "threads": threads,
        "repeats": args.repeats,
    }
    try:
        # Warm-up: first requests pay lazy initialisation in every stub.
        triton_request(url, text_input=QUESTION, max_tokens=4, stream=True)
        triton_request(
            url, text_input=QUESTION, max_tokens=2, stream=True, reasoning_streams=1, reasoning_budget=2
        )

        # -- 1. per-token overhead -------------------------------------------------------------
        log("per-token: triton ...")
        tri = [
            triton_request(url, text_input=STORY, max_tokens=args.tokens, stream=True)["output"]
            for _ in range(args.repeats)
        ]
        tri_tok = statistics.median(per_token_s(s) for s in tri)
        tri_ttft = statistics.median(s[0][0] for s in tri)

        # -- 2. TTFT with reasoning vs sequential think-then-answer ----------------------------
        log("ttft with reasoning ...")
        budget = args.reasoning_budget
        par, seq, think_tokens, revision = [], [], [], []
        for _ in range(args.repeats):
            r = triton_request(
                url,
                text_input=QUESTION,
                max_tokens=16,
                stream=True,
                reasoning_streams=1,
                reasoning_budget=budget,
            )
            par.append(r["output"][0][0])
            think = triton_request(
                url,
                text_input=QUESTION,
                max_tokens=1,
                stream=True,
                reasoning_streams=1,
                reasoning_budget=budget,
            )
            think_done = think["reasoning/0"][-1][0]
            think_tokens.append(sum(n for _, n in think["reasoning/0"]))
            answer = triton_request(url, text_input=QUESTION, max_tokens=16, stream=True)
            seq.append(think_done + answer["output"][0][0])
            rev = triton_request(
                url,
                text_input=QUESTION,
                max_tokens=8,
                stream=True,
                reasoning_streams=1,
                reasoning_budget=budget,
                sync="revise",
            )
            revision.append(rev["revision"][0][0])
        ttft_par, ttft_seq = statistics.median(par), statistics.median(seq)

        # -- 3. TTFT vs HF generate; in-process engine reference -------------------------------
        log("ttft: triton, engine in-process, HF ...")
        tri_q = statistics.median(
            triton_request(url, text_input=QUESTION, max_tokens=1, stream=True)["output"][0][0]
            for _ in range(args.repeats)
        )
    finally:
        if handle is not None:
            handle.stop()  # free the cores before the in-process measurements

    torch.set_num_threads(threads)
    engine = Engine.from_model_dir(
        model_dir, EngineConfig(dtype=dtype_name, threads=threads, max_sessions=2, max_context=2048)
    )
    try:
        story = prompt_ids(engine.tokenizer, STORY)
        engine_run(engine, story, 4)
        runs = [engine_run(engine, story, args.tokens) for _ in range(args.repeats)]
        eng_tok = statistics.median(r[1] for r in runs)
        question = prompt_ids(engine.tokenizer, QUESTION)
        eng_q = statistics.median(engine_ttft_from_text(engine, QUESTION) for _ in range(args.repeats))
        cfg = engine.model.cfg
        kv_bytes = cfg.num_layers * 2 * cfg.num_kv_heads * len(question) * cfg.head_dim * 4
    finally:
        engine.shutdown()
    hf_q = hf_ttft(model_dir, dtype, QUESTION, args.repeats)

    overhead_ms = (tri_tok - eng_tok) * 1000
    result["per_token"] = {
        "triton_ms_per_token": round(tri_tok * 1000, 2),
        "engine_ms_per_token": round(eng_tok * 1000, 2),
        "overhead_ms_per_token": round(overhead_ms, 2),
        "tokens": args.tokens,
        "target_overhead_ms": 1.0,
        "pass": overhead_ms <= 1.0,
    }
    result["ttft_reasoning"] = {
        "reasoning_budget": budget,
        "reasoning_tokens": statistics.median(think_tokens),
        "answer_ttft_with_reasoning_ms": round(ttft_par * 1000, 1),
        "sequential_think_then_answer_ttft_ms": round(ttft_seq * 1000, 1),
        "revision_stream_ttft_ms": round(statistics.median(revision) * 1000, 1),
        "speedup": round(ttft_seq / ttft_par, 1),
        "target_speedup": 10.0,
        "pass": ttft_seq / ttft_par >= 10.0,
    }
    result["ttft_vs_hf"] = {
        "prompt_tokens": len(question),
        "triton_ttft_ms": round(tri_q * 1000, 1),
        "engine_in_process_ttft_ms": round(eng_q * 1000, 1),
        "hf_generate_ttft_ms": round(hf_q * 1000, 1),
        "ratio": round(tri_q / hf_q, 2),
        "target_ratio": 1.3,
        "pass": tri_q / hf_q <= 1.3,
    }
    result["kv_handoff"] = {
        "prompt_tokens": len(question),
        "kv_bytes_fp32": kv_bytes,
        "ttft_over_engine_ms": round((tri_q - eng_q) * 1000, 1),
        "story_ttft_ms": round(tri_ttft * 1000, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench.serving"
    sys.exit(main())
