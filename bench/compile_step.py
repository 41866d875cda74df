"""The decode step three ways, on the same captured batches: ``python -m bench.compile_step --json``.

Issue 12 asked for a decode step without per-op Python dispatch, "``torch.compile`` with the
inductor CPU backend at fixed row buckets, or a fused C++ layer, your choice after
measuring both". This is that measurement, kept runnable:

- ``cpp``: the project's fused C++ step (``backend/kernels/decode_step.py``), what the engine
  runs for int4 decode rows;
- ``eager``: the torch forward of ``LlamaModel`` on the same batch (the C++ step turned off);
- ``compiled``: that torch forward under ``torch.compile`` (inductor, ``dynamic=False``: one
  graph per row bucket, as a server would compile its buckets at start), compile time
  reported apart. Dynamo cannot trace the pybind int4 / int8 kernels, so the graph breaks
  around each of them;
- ``compiled_ops``: the same with the two kernels registered as torch custom ops
  (``torch.library.custom_op`` with shape-only fake kernels), so inductor sees whole layers
  and fuses the norms, RoPE and residuals around the matmuls: the best a compiled step of
  this forward can do without rewriting it;
- with ``--dense``, the same ``eager`` / ``compiled`` pair on dense fp32 weights, the case
  where inductor sees the whole step (no custom int4 op to break its graph).

Every mode runs inside a real engine step, on the engine thread: ``rows`` concurrent
sessions, one stream each, a few rows past their prompts, so positions, masks and KV slots
are what a server step sees. Each mode runs that step's batch ``--iters`` times (it rewrites
the same KV positions); figures are the median ms per step. One process for everything, so
ratios hold within the run even on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from backend.engine import Engine, EngineConfig, SamplingParams, StreamSpec, resolve_dtype
from backend.kernels import int4, int8, native
from backend.model_store import resolve_model_dir
from backend.tokenizer import Tokenizer

PROMPT = "Write a short story about a robot who learns to paint."


_OPS: dict[str, Any] = {}


def kernel_ops() -> dict[str, Any]:
    """The int4 and int8 kernels as torch custom ops (registered once per process)."""
    if _OPS:
        return _OPS
    module = native.module()
    assert module is not None, "CPU kernels not available"

    @torch.library.custom_op("msbench::int4_mm", mutates_args=())
    def int4_mm(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        return module.int4_mm(x, packed, sz)

    @int4_mm.register_fake
    def _(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], packed.shape[0] * 16))

    @torch.library.custom_op("msbench::int8_mm", mutates_args=())
    def int8_mm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return module.int8_mm(x, packed, scales)

    @int8_mm.register_fake
    def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return x.new_empty((x.shape[0], packed.shape[0] * 16), dtype=torch.float32)

    _OPS.update(int4=int4_mm, int8=int8_mm)
    return _OPS


@contextlib.contextmanager
def kernels_as_ops() -> Iterator[None]:
    """While active, the model's int4 / int8 matmuls call the custom ops (same kernels)."""
    ops = kernel_ops()
    saved_int4, saved_int8 = int4.mm, int8.Int8Head.mm

    def head_mm(self: int8.Int8Head, x: torch.Tensor) -> torch.Tensor:
        return ops["int8"](x.to(torch.bfloat16).contiguous(), self.packed, self.scales)

    int4.mm = ops["int4"]
    int8.Int8Head.mm = head_mm  # type: ignore[method-assign]
    try:
        yield
    finally:
        int4.mm = saved_int4
        int8.Int8Head.mm = saved_int8  # type: ignore[method-assign]


def on_engine_thread(engine: Engine, prompt: list[int], rows: int, work: Callable[[Any], dict]) -> dict:
    """Runs ``work(batch)`` on the engine thread, inside a real decode-only step of ``rows`` sessions.

    Why inside the step: torch's OpenMP workers stop spin-waiting once more threads have
    computed than there are CPUs (see ``backend/engine/engine.py``), so timing from another
    thread than the one that runs every step would handicap whichever mode ran there.
    """
    model = engine.model
    forward = model.forward
    result: dict[str, Any] = {}
    seen = [0]

    def spy(batch: Any, kv_k: Any, kv_v: Any) -> torch.Tensor:
        split = batch.split
        all_decode = split is None or split.all_q4 or model.quantization == "none"
        if batch.num_sessions == rows and int(batch.tokens.shape[0]) == rows and all_decode:
            seen[0] += 1
            if seen[0] == 4:  # a few rows in: keys of every session, as in a served step
                try:
                    result.update(work(batch))
                except Exception as e:  # noqa: BLE001 - reported, the run goes on
                    result["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return forward(batch, kv_k, kv_v)

    model.forward = spy  # type: ignore[method-assign]
    done = threading.Semaphore(0)

    def on_event(ev: Any) -> None:
        if ev.finished:
            done.release()

    try:
        for _ in range(rows):
            engine.submit(
                prompt,
                [StreamSpec(name="output", sampling=SamplingParams(temperature=0.0, max_tokens=12))],
                on_event=on_event,
            )
        for _ in range(rows):
            if not done.acquire(timeout=1800):
                raise TimeoutError(f"{rows} sessions did not finish")
    finally:
        del model.forward  # back to the class's method
    if not result:
        raise RuntimeError(f"no decode-only step with {rows} rows was seen")
    return result


def graphs_compiled() -> int:
    """Graphs Dynamo has compiled in this process (a graph break makes more than one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def time_step(fn: Callable[[], Any], iters: int) -> float:
    """Median ms of ``fn`` over ``iters`` calls, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return round(statistics.median(times), 3)


def measure(engine: Engine, prompt: list[int], rows_list: list[int], iters: int, fused: bool) -> dict:
    """Per row bucket: ms per step in each mode, compile seconds, max |logit| difference."""
    model = engine.model
    pool = engine.pool
    forward = type(model).forward
    no_fused = lambda batch, kv_k: None  # noqa: E731 - the eager forward, C++ step off

    def torch_forward(batch: Any) -> torch.Tensor:
        return forward(model, batch, pool.k, pool.v)

    @contextlib.contextmanager
    def cpp_step_off() -> Iterator[None]:
        model._fused_step = no_fused  # type: ignore[method-assign]
        try:
            yield
        finally:
            del model._fused_step

    def eager(batch: Any) -> torch.Tensor:
        with cpp_step_off():
            return torch_forward(batch)

    # One compiled function for both variants; Dynamo's cache is reset before each, so the
    # custom-op variant is traced afresh (not recompiled on top of the other's frames).
    compiled = torch.compile(torch_forward, dynamic=False)

    def compiled_forward(batch: Any) -> torch.Tensor:
        with cpp_step_off():
            return compiled(batch)

    compiled_ops = compiled_forward

    def work(batch: Any) -> dict:
        entry: dict[str, Any] = {}
        ref = eager(batch)
        entry["eager_ms"] = time_step(lambda: eager(batch), iters)
        if fused:
            got = forward(model, batch, pool.k, pool.v)
            entry["cpp_ms"] = time_step(lambda: forward(model, batch, pool.k, pool.v), iters)
            entry["cpp_max_abs_logit_diff_vs_eager"] = round(float((got - ref).abs().max()), 4)
        torch._dynamo.reset()  # each variant and row bucket compiles from scratch, as at a start
        t0, g0 = time.perf_counter(), graphs_compiled()
        try:
            got = compiled_forward(batch)
        except Exception as e:  # noqa: BLE001 - report why inductor could not, and go on
            entry["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            return entry
        entry["compile_s"] = round(time.perf_counter() - t0, 1)
        entry["compiled_ms"] = time_step(lambda: compiled_forward(batch), iters)
        entry["compiled_graphs"] = graphs_compiled() - g0  # includes any recompiles while timed
        entry["compiled_max_abs_logit_diff_vs_eager"] = round(float((got - ref).abs().max()), 4)
        entry["compiled_vs_eager"] = round(entry["compiled_ms"] / entry["eager_ms"], 2)
        if fused:
            entry["compiled_vs_cpp"] = round(entry["compiled_ms"] / entry["cpp_ms"], 2)
            torch._dynamo.reset()
            with kernels_as_ops():
                t0, g0 = time.perf_counter(), graphs_compiled()
                try:
                    got = compiled_ops(batch)
                except Exception as e:  # noqa: BLE001
                    entry["compiled_ops_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    return entry
                entry["compile_ops_s"] = round(time.perf_counter() - t0, 1)
                entry["compiled_ops_ms"] = time_step(lambda: compiled_ops(batch), iters)
                entry["compiled_ops_graphs"] = graphs_compiled() - g0
            entry["compiled_ops_max_abs_logit_diff_vs_eager"] = round(float((got - ref).abs().max()), 4)
            entry["compiled_ops_vs_cpp"] = round(entry["compiled_ops_ms"] / entry["cpp_ms"], 2)
        return entry

    return {str(rows): on_engine_thread(engine, prompt, rows, work) for rows in rows_list}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rows", default="1,4,16", help="comma list of row buckets")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--dense", action="store_true", help="also eager / compiled on dense fp32 weights")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    model_dir = resolve_model_dir(args.model_dir)
    tok = Tokenizer.from_dir(model_dir)
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    result: dict[str, Any] = {
        "model": model_dir.name,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "iters": args.iters,
    }
    modes = [("default", args.dtype, "auto")]
    if args.dense:
        modes.append(("dense_fp32", "float32", "none"))
    for name, dtype, quant in modes:
        dtype_name = str(resolve_dtype(dtype, "cpu", quant)).removeprefix("torch.")
        config = EngineConfig(dtype=dtype_name, quantization=quant, threads=args.threads, max_sessions=16)
        engine = Engine.from_model_dir(model_dir, config)
        try:
            fused = engine.model.quantization != "none"
            result[name] = {
                "dtype": dtype_name,
                "quantization": engine.model.quantization,
                "steps": measure(engine, prompt, rows_list, args.iters, fused),
            }
        finally:
            engine.shutdown()
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
