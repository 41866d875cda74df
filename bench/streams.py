"""``python -m bench.streams --json``: does the shipped stream model think while it reads?

Through a real tritonserver, on the held-out split of ``train.tasks`` (greedy):

- ``accuracy``: the grid with all channels (``--model-dir streams-demo``, the paper's layout);
- ``accuracy_ablated``: the same requests with the thinking channel forced silent
  (``ablate_channels``);
- ``post_input_rows``: rows from the user's last token to the end of Output's answer;
- ``sequential_*``: the same model served one-stream (``stream_layout=project``,
  ``raw_prompt``): it reads, writes the states out, then answers. Its post-input rows are
  its generated tokens up to the answer's last (``output_ids`` of the server's deltas).

The server's deltas carry no row numbers, so the grid's rows are counted on the engine in
this process, on the same checkpoint and request; ``served_matches_engine`` is the share
of examples whose served Output and thinking text equal the in-process run token for token
(the grid is deterministic under greedy decoding, so anything below 1.0 is a bug). The
server confirms each count itself (``served_rows_confirmed``): ``max_tokens`` bounds the rows
a grid session generates, so with ``max_tokens`` = user rows + the counted rows the served
answer is complete, and with one row less it is not.

Targets (issue 13): accuracy >= 0.9, accuracy - accuracy_ablated >= 0.3,
post_input_rows <= 0.5 x sequential_post_input_rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean
from typing import Any

from train.evaluate import Outcome, grid_outcomes, sequential_from_ids, summarize
from train.render import THINK_CHANNEL, Renderer
from train.tasks import Example, held_out, score

SILENCE_PENALTY = 0.0
MAX_ROWS = 40


def _served(url: str, example: Example, options: dict[str, Any]) -> dict[str, list[int]]:
    """``stream -> token ids`` of one served generation."""
    from client import MultiStreamClient

    out: dict[str, list[int]] = {}
    for ev in MultiStreamClient(url).generate(example.text, **options):
        ids = getattr(ev, "token_ids", None)
        if ids:
            out.setdefault(ev.stream, []).extend(ids)
    return out


def served_grid(
    url: str, renderer: Renderer, examples: list[Example], ablate: bool, workers: int
) -> list[dict]:
    options: dict[str, Any] = {
        "max_tokens": MAX_ROWS,
        "temperature": 0.0,
        "reasoning_streams": renderer.num_channels - 2,
        "silence_penalty": SILENCE_PENALTY,
    }
    if ablate:
        options["ablate_channels"] = list(range(THINK_CHANNEL, renderer.num_channels))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda ex: _served(url, ex, options), examples))


def served_sequential(url: str, examples: list[Example], workers: int) -> list[list[int]]:
    options = {"max_tokens": MAX_ROWS, "temperature": 0.0, "raw_prompt": True}
    with ThreadPoolExecutor(workers) as pool:
        return [d.get("output", []) for d in pool.map(lambda ex: _served(url, ex, options), examples)]


def _local_grid(path: Path, renderer: Renderer, examples: list[Example], threads: int) -> list[Outcome]:
    """The same grid requests on an engine in this process (dense, as served): rows per example."""
    from backend.engine import Engine, EngineConfig

    config = EngineConfig(max_sessions=16, max_context=512, threads=threads, quantization="none")
    engine = Engine.from_model_dir(path, config)
    try:
        return grid_outcomes(engine, renderer, examples, silence_penalty=SILENCE_PENALTY)
    finally:
        engine.shutdown()


def served_rows_confirmed(
    url: str, renderer: Renderer, examples: list[Example], local: list[Outcome], workers: int
) -> float:
    """Share of the answered examples whose row count the server confirms (module docstring)."""
    from backend.engine.layout import user_tokens

    def check(pair: tuple[Example, Outcome]) -> bool:
        ex, lo = pair
        if lo.post_input_rows is None:
            return False
        rows = len(user_tokens(renderer.tokenizer, ex.text)) + lo.post_input_rows
        opts = {"temperature": 0.0, "reasoning_streams": 0, "silence_penalty": SILENCE_PENALTY}
        full = _served(url, ex, {**opts, "max_tokens": rows}).get("output", [])
        short = _served(url, ex, {**opts, "max_tokens": rows - 1}).get("output", [])
        return renderer.tokenizer.decode(full) == lo.text and renderer.tokenizer.decode(short) != lo.text

    with ThreadPoolExecutor(workers) as pool:
        return mean(pool.map(check, zip(examples, local, strict=True)))


def _serve(model_dir: Path, parameters: dict, threads: int):
    from launcher.serve import start_server

    # Dense weights: int4 rounding erases a LoRA fine-tune (launcher.serve does the same for
    # --model-dir streams-demo).
    return start_server(
        model_dir=str(model_dir),
        parameters={"*": {"quantization": "none", **parameters}},
        decode_instances=1,
        reasoning_instances=1,
        prefill_instances=1,
        preprocessing_instances=1,
        threads={"decode": threads, "prefill": threads, "reasoning": 1},
        max_sessions=16,
        max_context=512,
        log_level="warning",
    )


def run(model_dir: str, n: int, workers: int, threads: int) -> dict[str, Any]:
    from backend.model_store import resolve_model_dir
    from backend.tokenizer import Tokenizer

    path = resolve_model_dir(model_dir)
    renderer = Renderer(Tokenizer.from_dir(path))
    examples = held_out()[:n]
    tok = renderer.tokenizer
    t0 = time.perf_counter()
    with _serve(path, {}, threads) as server:
        grid = served_grid(server.grpc_url, renderer, examples, False, workers)
        ablated = served_grid(server.grpc_url, renderer, examples, True, workers)
        t_grid = time.perf_counter() - t0
        # Rows counted in-process, then confirmed by this server (module docstring).
        local = _local_grid(path, renderer, examples, threads)
        confirmed = served_rows_confirmed(server.grpc_url, renderer, examples, local, workers)
    t0 = time.perf_counter()
    with _serve(path, {"stream_layout": "project"}, threads) as server:
        seq_ids = served_sequential(server.grpc_url, examples, workers)
    t_seq = time.perf_counter() - t0

    think_name = "reasoning/Analytical"
    served = [
        Outcome(ex.family, tok.decode(g.get("output", [])), score(ex, tok.decode(g.get("output", []))), None)
        for ex, g in zip(examples, grid, strict=True)
    ]
    served_ablated = [
        Outcome(ex.family, tok.decode(g.get("output", [])), score(ex, tok.decode(g.get("output", []))), None)
        for ex, g in zip(examples, ablated, strict=True)
    ]
    matches = [
        tok.decode(g.get("output", [])) == lo.text and tok.decode(g.get(think_name, [])) == lo.thinking
        for g, lo in zip(grid, local, strict=True)
    ]
    sequential = [sequential_from_ids(renderer, ex, ids) for ex, ids in zip(examples, seq_ids, strict=True)]
    s_grid, s_abl, s_seq, s_local = (
        summarize(served),
        summarize(served_ablated),
        summarize(sequential),
        summarize(local),
    )
    rows, seq_rows = s_local["post_input_rows"], s_seq["post_input_rows"]
    ratio = rows / seq_rows if rows is not None and seq_rows else None
    result = {
        "model_dir": str(path),
        "n": len(examples),
        "accuracy": s_grid["accuracy"],
        "accuracy_ablated": s_abl["accuracy"],
        "post_input_rows": rows,
        "sequential_post_input_rows": seq_rows,
        "sequential_accuracy": s_seq["accuracy"],
        # One token per state, " so", the answer: what a one-stream model cannot go below.
        "sequential_min_rows": mean(len(ex.thoughts) + 2 for ex in examples),
        "post_input_rows_ratio": ratio,
        "served_matches_engine": mean(matches),
        "served_rows_confirmed": confirmed,
        "accuracy_by_family": s_grid["by_family"],
        "accuracy_ablated_by_family": s_abl["by_family"],
        "sequential_accuracy_by_family": s_seq["by_family"],
        "answered": {"grid": s_local["answered"], "sequential": s_seq["answered"]},
        "silence_penalty": SILENCE_PENALTY,
        "seconds": {"grid_server": round(t_grid, 1), "sequential_server": round(t_seq, 1)},
        "samples": [
            {"text": ex.text, "answer": ex.answer, "output": g.text, "ablated": a.text, "sequential": s.text}
            for ex, g, a, s in list(zip(examples, served, served_ablated, sequential, strict=True))[:8]
        ],
    }
    result["targets"] = {
        "accuracy>=0.9": result["accuracy"] >= 0.9,
        "accuracy-ablated>=0.3": result["accuracy"] - result["accuracy_ablated"] >= 0.3,
        "post_input_rows<=0.5x_sequential": ratio is not None and ratio <= 0.5,
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", default="streams-demo")
    p.add_argument("-n", type=int, default=100, help="held-out examples (the families in turn)")
    p.add_argument("--workers", type=int, default=8, help="concurrent requests")
    p.add_argument("--threads", type=int, default=2, help="torch threads per engine")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    result = run(args.model_dir, args.n, args.workers, args.threads)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    if args.json:
        print(text)
    else:
        for key in ("accuracy", "accuracy_ablated", "post_input_rows", "sequential_post_input_rows"):
            print(f"{key:28s} {result[key]}")
        print(f"{'targets':28s} {result['targets']}")
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
