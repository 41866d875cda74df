"""Engine benchmark (no Triton): ``python -m bench.engine --json``.

Measures, in one run and on the same weights, dtype and thread count:

- ``single_stream_tok_s``: decode rate of one greedy stream;
- ``hf_generate_tok_s``: ``transformers`` ``generate`` decode rate on the same prompt;
- ``row_step_ms`` / ``tokens_per_s_by_streams``: one session advancing C streams per row;
- ``batch_tok_s``: aggregate decode tokens/s of N concurrent single-stream sessions;
- ``paper_grid``: the paper's layout on the same checkpoint (C = 10 channels, every channel
  in every row): the step of one 10-channel row against a one-stream step, and rows per
  second for 1, 4 and 16 concurrent 10-channel sessions.

With int4 decode weights (the default on a bf16 CPU), the same metrics are also reported
for dense weights under ``"dense"``: int4 is ~4x cheaper for one row but its cost grows
with rows, so it wins on absolute speed while the row/batch *ratios* look better dense.

Decode rates exclude prefill: (tokens - 1) / (time of last token - time of first token),
and for HF, (T(n) - T(1)) over n - 1 new tokens. Targets are ratios in the same run, since
this machine is shared and absolute numbers drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time

import torch

from backend.engine import Engine, EngineConfig, GridRules, SamplingParams, StreamSpec, resolve_dtype
from backend.engine.layout import StreamLayout, find_silence, seed_row, user_tokens
from backend.model_store import resolve_model_dir
from backend.tokenizer import Tokenizer

PROMPT = "Write a short story about a robot who learns to paint."


def run_sessions(
    engine: Engine,
    prompt: list[int],
    sessions: int,
    streams: int,
    tokens: int,
    reasoning_only: bool = False,
) -> dict:
    """Submits ``sessions`` sessions at once; returns per-token timestamps (one list per
    session, all its streams) and wall time. Greedy, ``ignore_eos``. Streams: ``output``, then
    ``reasoning/0`` ...; with ``reasoning_only``, ``reasoning/0`` ... alone (a reasoning
    instance's load, ``bench.engines_per_process``)."""
    stamps: list[list[float]] = [[] for _ in range(sessions)]
    done = threading.Semaphore(0)
    remaining = [streams] * sessions

    def make_cb(i: int):
        def cb(ev) -> None:
            if ev.token_ids:
                stamps[i].append(ev.t)
            if ev.finished:
                remaining[i] -= 1
                if remaining[i] == 0:
                    done.release()

        return cb

    first = 0 if reasoning_only else 1  # index of the first reasoning stream
    specs = [
        StreamSpec(
            "output" if c < first else f"reasoning/{c - first}",
            kind="output" if c < first else "reasoning",
            sampling=SamplingParams(max_tokens=tokens, ignore_eos=True),
        )
        for c in range(streams)
    ]
    t0 = time.monotonic()
    for i in range(sessions):
        engine.submit(
            prompt,
            [StreamSpec(s.name, s.kind, SamplingParams(**vars(s.sampling))) for s in specs],
            on_event=make_cb(i),
        )
    for _ in range(sessions):
        done.acquire()
    return {"stamps": stamps, "wall": time.monotonic() - t0, "t0": t0}


def _decode_rate(stamps: list[float], per_row: int = 1) -> float:
    """Tokens per second after the first token; ``per_row`` tokens arrive per row."""
    rows = len(stamps) // per_row
    span = stamps[-1] - stamps[0]
    return (rows - 1) * per_row / span if span > 0 else float("nan")


def bench_engine(engine: Engine, prompt: list[int], tokens: int, repeats: int) -> dict:
    run_sessions(engine, prompt, 1, 1, 8)  # warm-up
    single = max(
        _decode_rate(run_sessions(engine, prompt, 1, 1, tokens)["stamps"][0]) for _ in range(repeats)
    )
    by_streams, step_ms = {}, {}
    for c in (1, 2, 4, 8):
        best = 0.0
        for _ in range(repeats):
            st = run_sessions(engine, prompt, 1, c, tokens)["stamps"][0]
            best = max(best, _decode_rate(st, per_row=c))
        by_streams[str(c)] = round(best, 2)
        step_ms[str(c)] = round(1000.0 * c / best, 3)
    batch = {}
    for n in (1, 4, 16):
        res = run_sessions(engine, prompt, n, 1, tokens)
        # Aggregate decode rate: all tokens after each session's first, over the span in which they came.
        first = max(s[0] for s in res["stamps"])
        last = max(s[-1] for s in res["stamps"])
        after = sum(sum(1 for t in s if t > first) for s in res["stamps"])
        batch[str(n)] = round(after / (last - first), 2) if last > first else float("nan")
    return {
        "single_stream_tok_s": round(single, 2),
        "row_step_ms": step_ms,
        "tokens_per_s_by_streams": by_streams,
        "batch_tok_s": batch,
    }


def _run_grids(engine: Engine, sessions: int, rows: int, channels: int = 10) -> float:
    """Aggregate rows per second of ``sessions`` concurrent grids of the paper's layout.

    Rows are counted from each session's first sampled row to its end (``max_rows``
    reached): (rows - 1) per session over the span from the latest first row to the last end.
    """
    tok = engine.tokenizer
    layout = StreamLayout(channels, find_silence(tok))
    first: list[float | None] = [None] * sessions
    end = [0.0] * sessions
    done = threading.Semaphore(0)

    def make_cb(i: int):
        live = [channels - 1]

        def cb(ev) -> None:
            if ev.kind != "user" and first[i] is None:
                first[i] = ev.t
            if ev.finished and ev.kind != "user":
                live[0] -= 1
                if live[0] == 0:
                    end[i] = ev.t
                    done.release()

        return cb

    for i in range(sessions):
        engine.submit(
            layout.prefix(seed_row(tok, layout.silence_id, channels)),
            layout.stream_specs(lambda c: SamplingParams(max_tokens=rows, ignore_eos=True)),
            on_event=make_cb(i),
            rules=GridRules(layout.silence_id, channels, stop_silent_rows=None, max_rows=rows),
            user_ids=user_tokens(tok, PROMPT),
        )
    for _ in range(sessions):
        done.acquire()
    span = max(end) - max(t for t in first if t is not None)
    return sessions * (rows - 1) / span if span > 0 else float("nan")


def bench_grid(engine: Engine, prompt: list[int], tokens: int, repeats: int) -> dict:
    """The paper's layout: a 10-channel row step against a one-stream step, and rows/s."""
    _run_grids(engine, 1, 8)  # warm-up
    one = max(_decode_rate(run_sessions(engine, prompt, 1, 1, tokens)["stamps"][0]) for _ in range(repeats))
    ten = max(_run_grids(engine, 1, tokens) for _ in range(repeats))
    rows = {str(n): round(_run_grids(engine, n, tokens), 2) for n in (1, 4, 16)}
    step = {"1": round(1000.0 / one, 3), "10": round(1000.0 / ten, 3)}
    return {
        "channels": 10,
        "row_step_ms": step,
        "ratio_step_c10_vs_c1": round(step["10"] / step["1"], 3),
        "rows_per_s_by_sessions": rows,
        "channel_tokens_per_s_by_sessions": {n: round(r * 10, 2) for n, r in rows.items()},
    }


def bench_hf(model_dir, dtype: torch.dtype, prompt: list[int], tokens: int, repeats: int) -> float:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)

    def timed(n: int) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t

    timed(4)
    t1 = min(timed(1) for _ in range(repeats))
    tn = min(timed(tokens) for _ in range(repeats))
    return (tokens - 1) / (tn - t1)


def _measure_in_child(args: argparse.Namespace, part: str) -> dict:
    """Runs one part of the benchmark in a fresh interpreter and returns its JSON.

    Why a process per part: torch's OpenMP workers stop spin-waiting once a process has
    had more threads computing than CPUs (libgomp counts them, and threads that have
    exited still count), after which every parallel region pays a wake-up. Measured in
    one process, whichever of the int4 engine, the dense engine and HF ran later was
    handicapped by the ones before it; each in its own process, they all start equal.
    """
    cmd = [
        sys.executable, "-m", "bench.engine", "--part", part, "--model-dir", args.model_dir,
        "--dtype", args.dtype, "--threads", str(args.threads), "--quantization", args.quantization,
        "--tokens", str(args.tokens), "--repeats", str(args.repeats),
    ]  # fmt: skip
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _run_part(args: argparse.Namespace, part: str) -> dict:
    """``engine``: the engine with ``--quantization``; ``dense``: without; ``hf``: transformers."""
    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(args.model_dir)
    # Each part in the dtype the engine would pick for it: dense (and HF) on a CPU without bf16
    # instructions is fp32 (torch emulates bf16 matmuls there; a dense bf16 run took minutes).
    dtype = resolve_dtype(args.dtype, "cpu", "none" if part in ("dense", "hf") else args.quantization)
    dtype_name = str(dtype).removeprefix("torch.")
    tok = Tokenizer.from_dir(model_dir)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    if part == "hf":
        return {"hf_generate_tok_s": round(bench_hf(model_dir, dtype, prompt, args.tokens, args.repeats), 2)}
    engine = Engine.from_model_dir(
        model_dir,
        EngineConfig(
            dtype=dtype_name,
            quantization="none" if part == "dense" else args.quantization,
            threads=args.threads,
            max_sessions=16,
            max_context=1024,
        ),
    )
    result: dict = {
        "model": str(model_dir.name),
        "dtype": dtype_name,
        "quantization": engine.model.quantization,
        "kv_dtype": engine.stats()["kv_dtype"],
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "prompt_tokens": len(prompt),
        "new_tokens": args.tokens,
    }
    result.update(bench_engine(engine, prompt, args.tokens, args.repeats))
    result["paper_grid"] = bench_grid(engine, prompt, args.tokens, args.repeats)
    engine.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quantization", default="auto", help="auto | int4 | none (decode weights)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--part", choices=("engine", "dense", "hf"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.part:
        print(json.dumps(_run_part(args, args.part)))
        return 0
    result = _measure_in_child(args, "engine")
    modes = [result]
    if result["quantization"] != "none":
        # The same weights in the same dtype as HF, dense: an int4 kernel's cost grows with
        # rows while a dense step is memory-bound, so their row/batch ratios differ.
        dense = _measure_in_child(args, "dense")
        shared = ("model", "threads", "cpu", "prompt_tokens", "new_tokens")
        result["dense"] = {k: v for k, v in dense.items() if k not in shared}
        modes.append(result["dense"])
    hf = None
    if not args.no_hf:
        hf = _measure_in_child(args, "hf")["hf_generate_tok_s"]
        result["hf_generate_tok_s"] = hf
    for r in modes:
        steps = r["row_step_ms"]
        if hf:
            r["ratio_single_vs_hf"] = round(r["single_stream_tok_s"] / hf, 2)
        r["ratio_step_c4_vs_c1"] = round(steps["4"] / steps["1"], 3)
        r["ratio_batch16_vs_1"] = round(r["batch_tok_s"]["16"] / r["batch_tok_s"]["1"], 2)
        r["targets_met"] = {
            "single_vs_hf_ge_1.5": r.get("ratio_single_vs_hf", 0) >= 1.5,
            "c4_step_le_1.25x_c1": r["ratio_step_c4_vs_c1"] <= 1.25,
            "batch16_ge_6x_batch1": r["ratio_batch16_vs_1"] >= 6,
        }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:28s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
