"""The one-shot GPU device check: ``python -m bench.gpu_check --json``.

Everything the GPU path claims, measured in one run on one machine, with only what a bare
GPU box has (Python, torch with CUDA, transformers, NumPy): no tritonserver, no network, no
model files. It writes random-weight checkpoints in the SmolLM2-135M and Llama-3.2-1B shapes
(HF layout: config.json, model.safetensors, a word-level tokenizer.json), loads them with
the project's own loader and reports, in one JSON object:

- ``agreement``: CPU fp32 vs device (CUDA bf16, and CUDA fp32) greedy tokens on fixed
  prompts: first divergence and the logit cosine up to it;
- ``handoff``: prefill exported by one engine, sent through the GPU hand-off wire
  (``backend.serving.gpu_handoff``, BF16), imported by another: identical tokens?
- ``throughput``: decode tokens/s at 1, 16 and 64 sessions, eager and with CUDA graphs
  (``backend.engine.cuda_graphs``), and whether graphs give the same tokens as eager;
- ``row_step``: the C-stream row step time against the 1-stream step (C = 1, 2, 4, 8);
- ``streams``: two engines on two CUDA streams in one process, overlap from CUDA events;
- ``processes``: two processes on one GPU, without and with MPS (when the daemon starts);
- ``weights``: device memory per extra instance with shared weights
  (``backend.engine.shared_weights``) vs its own copy;
- ``trtllm`` (``--trtllm``, in the TensorRT-LLM image): the TensorRT-LLM prefill's KV and
  first token vs the torch prefill (``backend.serving.trtllm_prefill``).

Every section is guarded: a failure is reported under ``errors`` and the others still run,
because a GPU session gets one try. ``--device cpu`` runs the same code with tiny shapes
(CUDA-only parts report why they were skipped); the test suite runs it so it cannot rot.
Runbook, expected runtime and what has been measured: docs/gpu.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backend.engine import Engine, EngineConfig, SamplingParams, StreamSpec, cuda_graphs
from backend.engine import shared_weights as sw

#: Checkpoint shapes (the published configs' numbers; weights are random).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
    },
}
GPU_SHAPES = ("smollm2-135m", "llama-3.2-1b")
#: Token id the word-level tokenizer calls its end of sequence (every run ignores it).
EOS_ID = 0


# ---------------------------------------------------------------------- checkpoints
def random_checkpoint(shape: str, path: Path, seed: int = 0, device: str = "cpu") -> Path:
    """Writes an HF-layout checkpoint with random weights of ``shape`` into ``path``.

    std 0.02 like HF's initialiser, norms near 1, so activations stay in range in bf16.
    Generated on ``device`` (fast for 1B on a GPU), written as bf16 safetensors.
    """
    from safetensors.torch import save_file

    cfg = dict(SHAPES[shape])
    path.mkdir(parents=True, exist_ok=True)
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = h // heads
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape_: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        t = torch.randn(*shape_, generator=gen, device=device, dtype=torch.float32) * std + mean
        return t.to(torch.bfloat16).cpu()

    tensors = {
        "model.embed_tokens.weight": rnd(cfg["vocab_size"], h, std=1.0),
        "model.norm.weight": rnd(h, mean=1.0),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "input_layernorm.weight": rnd(h, mean=1.0),
                p + "post_attention_layernorm.weight": rnd(h, mean=1.0),
                p + "self_attn.q_proj.weight": rnd(heads * hd, h),
                p + "self_attn.k_proj.weight": rnd(kv * hd, h),
                p + "self_attn.v_proj.weight": rnd(kv * hd, h),
                p + "self_attn.o_proj.weight": rnd(h, heads * hd),
                p + "mlp.gate_proj.weight": rnd(inter, h),
                p + "mlp.up_proj.weight": rnd(inter, h),
                p + "mlp.down_proj.weight": rnd(h, inter),
            }
        )
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        **cfg,
    }
    (path / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer(path, cfg["vocab_size"])
    return path


def write_tokenizer(path: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``t0 .. t{vocab-1}`` (ids are all any check needs)."""
    import tokenizers

    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t1")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{EOS_ID}", "bos_token": "t1"}))


def prompts(vocab: int, count: int, length: int, seed: int = 1) -> list[list[int]]:
    """Fixed pseudo-random prompts (ids away from the eos id)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(2, vocab, (length + 3 * i,), generator=g)).tolist() for i in range(count)]


#: Torch threads of CPU engines (``--cpu-threads``); None = torch's default.
CPU_THREADS: int | None = None


def engine_for(path: Path, device: str, dtype: str, *, sessions: int = 64, context: int = 512) -> Engine:
    return Engine.from_model_dir(
        path,
        EngineConfig(
            device=device,
            dtype=dtype,
            threads=CPU_THREADS if device == "cpu" else None,
            quantization="none",
            max_sessions=sessions,
            max_context=context,
            max_queued=256,
            max_step_tokens=4096,
            prefill_chunk=512,
        ),
    )


# ---------------------------------------------------------------------- running sessions
class Run:
    """Sessions submitted together; token timestamps per session and logits per sampled row."""

    def __init__(self, engine: Engine, keep_logits: bool = False):
        self.engine = engine
        self.keep_logits = keep_logits
        self.tokens: dict[str, dict[str, list[int]]] = {}
        self.stamps: dict[str, list[float]] = {}
        self.logits: dict[tuple[str, str, int], torch.Tensor] = {}
        self._left = 0
        self._cv = threading.Condition()
        if keep_logits:
            engine.logits_hook = self._hook

    def _hook(self, sid: str, stream: str, row: int, logits: torch.Tensor) -> None:
        self.logits[(sid, stream, row)] = logits.detach().float().cpu().clone()

    def submit(self, prompt: list[int], streams: int, tokens: int, **kw: Any) -> str:
        specs = [
            StreamSpec(
                "output" if c == 0 else f"reasoning/{c - 1}",
                kind="output" if c == 0 else "reasoning",
                sampling=SamplingParams(max_tokens=tokens, ignore_eos=True),
            )
            for c in range(streams)
        ]
        with self._cv:
            self._left += streams

        def on_event(ev: Any) -> None:
            with self._cv:
                per = self.tokens.setdefault(ev.session_id, {})
                if ev.token_ids:
                    per.setdefault(ev.stream, []).extend(ev.token_ids)
                    self.stamps.setdefault(ev.session_id, []).extend([ev.t] * len(ev.token_ids))
                if ev.finished:
                    self._left -= 1
                    self._cv.notify_all()

        return self.engine.submit(prompt, specs, on_event=on_event, **kw)

    def wait(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._left > 0:
                if not self._cv.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{self._left} streams still running after {timeout:.0f} s")
        self.engine.logits_hook = None

    def decode_rate(self) -> float:
        """Aggregate tokens/s after the last session's first token (prefill excluded)."""
        firsts = [s[0] for s in self.stamps.values() if s]
        last = max(s[-1] for s in self.stamps.values() if s)
        start = max(firsts)
        after = sum(sum(1 for t in s if t > start) for s in self.stamps.values())
        return after / (last - start) if last > start else float("nan")


def run_sessions(engine: Engine, prompt: list[int], sessions: int, streams: int, tokens: int) -> Run:
    run = Run(engine)
    for _ in range(sessions):
        run.submit(prompt, streams, tokens)
    run.wait()
    return run


def greedy(
    engine: Engine, prompt_list: list[list[int]], tokens: int
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Greedy tokens and per-token logits of each prompt (all sessions in one batch)."""
    run = Run(engine, keep_logits=True)
    sids = [run.submit(p, 1, tokens) for p in prompt_list]
    run.wait()
    out_tokens, out_logits = [], []
    for sid in sids:
        out_tokens.append(run.tokens[sid]["output"])
        rows = sorted(r for (s, _, r) in run.logits if s == sid)
        out_logits.append([run.logits[(sid, "output", r)] for r in rows])
    return out_tokens, out_logits


def compare(a: tuple, b: tuple) -> dict[str, Any]:
    """First divergence and logit cosine (up to and including it) between two greedy runs."""
    diverge, cos_min, cos_all, max_abs = [], 1.0, [], 0.0
    for ta, tb, la, lb in zip(a[0], b[0], a[1], b[1], strict=True):
        first = next((i for i, (x, y) in enumerate(zip(ta, tb, strict=False)) if x != y), None)
        diverge.append(first)
        upto = len(ta) if first is None else first + 1
        for x, y in zip(la[:upto], lb[:upto], strict=False):
            c = torch.nn.functional.cosine_similarity(x, y, dim=0).item()
            cos_all.append(c)
            cos_min = min(cos_min, c)
            max_abs = max(max_abs, (x - y).abs().max().item())
    return {
        "first_divergence": diverge,
        "identical": all(d is None for d in diverge),
        "logit_cosine_min": round(cos_min, 6),
        "logit_cosine_mean": round(statistics.fmean(cos_all), 6) if cos_all else None,
        "logit_max_abs_diff": round(max_abs, 6),
    }


# ---------------------------------------------------------------------- sections
class Check:
    """The run's state: options, checkpoints, the JSON being built, the time budget."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = args.device
        self.cuda = self.device.startswith("cuda")
        self.dtype = args.dtype
        self.shapes = args.shapes.split(",")
        self.t0 = time.monotonic()
        self.out: dict[str, Any] = {"errors": {}, "skipped": {}}
        # RAM-backed when there is room (a 1B checkpoint is 2.5 GB; containers' /dev/shm is often 64 MB).
        shm = Path("/dev/shm")
        base = str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 8 * 2**30 else None
        self.tmp = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=base))
        self.ckpt: dict[str, Path] = {}

    def left_s(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.t0)

    def section(self, name: str, fn: Callable[[], Any], need_s: float = 0.0) -> None:
        if self.left_s() < need_s:
            self.out["skipped"][name] = f"time budget: {self.left_s():.0f} s left, needs ~{need_s:.0f} s"
            return
        t = time.monotonic()
        try:
            self.out[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
            self.out["errors"][name] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
        self.out.setdefault("section_s", {})[name] = round(time.monotonic() - t, 1)

    def checkpoint(self, shape: str) -> Path:
        if shape not in self.ckpt:
            gen_device = self.device if self.cuda else "cpu"
            self.ckpt[shape] = random_checkpoint(shape, self.tmp / shape, seed=0, device=gen_device)
        return self.ckpt[shape]

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def env_section(check: Check) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": check.device,
        "dtype": check.dtype,
        "shapes": check.shapes,
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:
        info["numpy"] = None
    if check.cuda:
        props = torch.cuda.get_device_properties(torch.device(check.device))
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
        info["mps_control"] = shutil.which("nvidia-cuda-mps-control")
    from backend.serving.trtllm_prefill import trtllm_available

    info["tensorrt_llm"] = trtllm_available()[1]
    return info


def agreement_section(check: Check) -> dict[str, Any]:
    a = check.args
    out = {}
    for shape in check.shapes:
        path = check.checkpoint(shape)
        ps = prompts(SHAPES[shape]["vocab_size"], a.prompts, a.prompt_len)
        ref_engine = engine_for(path, "cpu", "float32", sessions=max(4, a.prompts), context=a.context)
        ref = greedy(ref_engine, ps, a.agree_tokens)
        ref_engine.shutdown()
        row: dict[str, Any] = {}
        variants = [(check.device, check.dtype)]
        if check.cuda:
            variants.append((check.device, "float32"))
        for device, dtype in variants:
            eng = engine_for(path, device, dtype, sessions=max(4, a.prompts), context=a.context)
            row[f"cpu_float32_vs_{device.split(':')[0]}_{dtype}"] = compare(
                ref, greedy(eng, ps, a.agree_tokens)
            )
            eng.shutdown()
        out[shape] = row
    return out


def handoff_section(check: Check) -> dict[str, Any]:
    """Engine A exports a prompt's KV, the GPU wire (BF16 through DLPack on a GPU deployment)
    carries it, engine B imports it: B's tokens must equal B computing the prompt itself."""
    from backend.serving import gpu_handoff

    a = check.args
    shape = check.shapes[0]
    path = check.checkpoint(shape)
    vocab = SHAPES[shape]["vocab_size"]
    engine_a = engine_for(path, check.device, check.dtype, sessions=4, context=a.context)
    engine_b = engine_for(path, check.device, check.dtype, sessions=4, context=a.context)
    wire = gpu_handoff.Wire(
        kv=torch.bfloat16 if check.dtype == "bfloat16" else torch.float32, device=torch.device(check.device)
    )
    out: dict[str, Any] = {"shape": shape, "wire_kv_dtype": str(wire.kv).removeprefix("torch.")}
    results = []
    for p in prompts(vocab, a.prompts, a.prompt_len, seed=7):
        t = time.perf_counter()
        exported = engine_a.prefill_export(p)
        kv, logits = gpu_handoff.to_wire(exported, wire)
        received = gpu_handoff.from_wire(kv, logits, vocab, wire)
        if check.cuda:
            torch.cuda.synchronize()
        wire_s = time.perf_counter() - t
        imported = Run(engine_b)
        imported.submit(p, 1, a.agree_tokens, prefix_kv=received)
        imported.wait()
        plain = Run(engine_b)
        plain.submit(p, 1, a.agree_tokens)
        plain.wait()
        ti = next(iter(imported.tokens.values()))["output"]
        tp = next(iter(plain.tokens.values()))["output"]
        results.append(
            {
                "identical": ti == tp,
                "first_divergence": next(
                    (i for i, (x, y) in enumerate(zip(ti, tp, strict=False)) if x != y), None
                ),
                "kv_bytes": kv.numel() * kv.element_size(),
                "export_and_wire_ms": round(1000 * wire_s, 2),
            }
        )
    engine_a.shutdown()
    engine_b.shutdown()
    out["prompts"] = results
    out["identical"] = all(r["identical"] for r in results)
    return out


def _graphs(engine: Engine) -> cuda_graphs.CudaGraphRunner:
    return cuda_graphs.install(engine, capture=engine.model.device.type == "cuda")


def throughput_section(check: Check) -> dict[str, Any]:
    a = check.args
    sessions = [int(s) for s in a.sessions.split(",")]
    out: dict[str, Any] = {
        "graphs_mode": "captured" if check.cuda else "padded eager (no CUDA: same padding, no capture)"
    }
    for shape in check.shapes:
        path = check.checkpoint(shape)
        prompt = prompts(SHAPES[shape]["vocab_size"], 1, a.prompt_len, seed=3)[0]
        row: dict[str, Any] = {}
        same: dict[str, Any] = {}
        ps = prompts(SHAPES[shape]["vocab_size"], a.prompts, a.prompt_len, seed=5)
        for mode in ("eager", "graphs"):
            eng = engine_for(path, check.device, check.dtype, sessions=max(sessions), context=a.context)
            runner = _graphs(eng) if mode == "graphs" else None
            rates = {}
            for n in sessions:
                run_sessions(eng, prompt, n, 1, 4)  # warm-up: this size's graphs are captured here
                rates[str(n)] = round(run_sessions(eng, prompt, n, 1, a.tokens).decode_rate(), 1)
            row[mode] = {"tok_s": rates}
            same[mode] = greedy(eng, ps, a.agree_tokens)
            if runner is not None:
                row[mode]["graphs"] = runner.stats.as_dict()
                row[mode]["graphs"]["buckets"] = len(runner.graphs) if runner.capture else None
                row[mode]["graphs"]["broken"] = runner.broken
            eng.shutdown()
        row["graphs_vs_eager_tok_s"] = {
            n: round(row["graphs"]["tok_s"][n] / row["eager"]["tok_s"][n], 3) for n in row["eager"]["tok_s"]
        }
        row["graphs_vs_eager_tokens"] = compare(same["eager"], same["graphs"])
        out[shape] = row
    return out


def row_step_section(check: Check) -> dict[str, Any]:
    a = check.args
    streams = [int(c) for c in a.streams.split(",")]
    out: dict[str, Any] = {}
    for shape in check.shapes:
        path = check.checkpoint(shape)
        prompt = prompts(SHAPES[shape]["vocab_size"], 1, a.prompt_len, seed=4)[0]
        row: dict[str, Any] = {}
        for mode in ("eager", "graphs"):
            eng = engine_for(path, check.device, check.dtype, sessions=16, context=a.context)
            if mode == "graphs":
                _graphs(eng)
            res: dict[str, Any] = {}
            for n in (1, min(16, max(int(s) for s in a.sessions.split(",")))):
                ms = {}
                for c in streams:
                    run_sessions(eng, prompt, n, c, 4)  # warm-up (captures)
                    run = run_sessions(eng, prompt, n, c, a.tokens)
                    rows_per_s = run.decode_rate() / (n * c)
                    ms[str(c)] = round(1000.0 / rows_per_s, 3) if rows_per_s > 0 else None
                base = ms[str(streams[0])]
                res[f"sessions_{n}"] = {
                    "step_ms": ms,
                    "ratio_to_c1": {c: round(v / base, 3) for c, v in ms.items() if v and base},
                }
            row[mode] = res
            eng.shutdown()
        out[shape] = row
    return out


def streams_section(check: Check) -> dict[str, Any]:
    """Two engines of one process, each on its own CUDA stream: how much their forwards
    overlap on the GPU (CUDA events) and what that buys in wall time.

    ``forward_on_stream`` is what a serving instance does (``use_own_cuda_stream``: only the
    forward on the instance's stream; packing and reading logits stay on the shared default
    stream); ``step_on_stream`` runs the whole step there, the shape "several engines in one
    process" would need.
    """
    if not check.cuda:
        return {"skipped": "needs CUDA"}
    from backend.serving.instance import use_own_cuda_stream

    a = check.args
    shape = check.shapes[0]
    path = check.checkpoint(shape)
    prompt = prompts(SHAPES[shape]["vocab_size"], 1, a.prompt_len, seed=6)[0]
    out: dict[str, Any] = {"shape": shape}
    n = min(16, max(int(s) for s in a.sessions.split(",")))
    ref = torch.cuda.Event(enable_timing=True)
    ref.record()
    for variant in ("forward_on_stream", "step_on_stream"):
        for mode in ("eager", "graphs"):
            engines, spans = [], []
            for _ in range(2):
                eng = engine_for(path, check.device, check.dtype, sessions=n, context=a.context)
                if mode == "graphs":
                    _graphs(eng)
                spans.append(_event_spans(eng, ref))  # inside the stream switch: on the engine's stream
                stream = torch.cuda.Stream(device=torch.device(check.device))
                if variant == "forward_on_stream":
                    use_own_cuda_stream(eng, stream)
                else:
                    _step_on_stream(eng, stream)
                run_sessions(eng, prompt, n, 1, 4)
                engines.append(eng)
            alone = []
            for eng in engines:
                t = time.perf_counter()
                run_sessions(eng, prompt, n, 1, a.tokens)
                alone.append(time.perf_counter() - t)
            for s in spans:
                s.clear()
            t = time.perf_counter()
            threads = [
                threading.Thread(target=run_sessions, args=(eng, prompt, n, 1, a.tokens)) for eng in engines
            ]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            both = time.perf_counter() - t
            torch.cuda.synchronize()
            intervals = [s.intervals() for s in spans]
            busy = [sum(e - b for b, e in iv) for iv in intervals]
            inter = _intersection(intervals[0], intervals[1])
            out.setdefault(variant, {})[mode] = {
                "sessions_per_engine": n,
                "alone_s": [round(x, 3) for x in alone],
                "together_s": round(both, 3),
                "speedup_vs_sequential": round(sum(alone) / both, 3),
                "forward_overlap_fraction": round(inter / min(busy), 3) if min(busy) > 0 else None,
            }
            for eng in engines:
                eng.shutdown()
    return out


def _step_on_stream(engine: Engine, stream: torch.cuda.Stream) -> None:
    """Runs every step of ``engine`` (packing, forward, reading logits) on ``stream``."""
    step = engine.step

    def stepped() -> None:
        stream.wait_stream(torch.cuda.default_stream(stream.device))  # prefix imports go there
        with torch.cuda.stream(stream):
            step()

    engine.step = stepped


class _Spans:
    """Start/end CUDA events of every forward of one engine, as ms since ``ref``."""

    def __init__(self, ref: torch.cuda.Event) -> None:
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.ref = ref

    def clear(self) -> None:
        self.events.clear()

    def intervals(self) -> list[tuple[float, float]]:
        return [(self.ref.elapsed_time(b), self.ref.elapsed_time(e)) for b, e in self.events]


def _event_spans(engine: Engine, ref: torch.cuda.Event) -> _Spans:
    """Records a start/end CUDA event around every forward of ``engine`` (current stream)."""
    spans = _Spans(ref)
    forward = engine.model.forward

    def timed(*args: Any, **kw: Any) -> torch.Tensor:
        b, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        b.record()
        out = forward(*args, **kw)
        e.record()
        spans.events.append((b, e))
        return out

    engine.model.forward = timed
    return spans


def _intersection(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    total, i, j = 0.0, 0, 0
    a, b = sorted(a), sorted(b)
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# ---------------------------------------------------------------------- child processes
class Child:
    """A ``python -m bench.gpu_check --child ...`` process speaking a line protocol:
    it prints ``READY {json}``, waits for ``GO``, prints ``DONE {json}``, waits for ``EXIT``.
    Its stdout is read by a thread (other lines are ignored), its stderr goes to a file."""

    def __init__(self, role: str, spec: dict[str, Any], env: dict[str, str] | None = None):
        import queue

        cmd = [sys.executable, "-m", "bench.gpu_check", "--child", role, "--child-spec", json.dumps(spec)]
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def _stderr_tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-2000:]

    def expect(self, word: str, timeout: float = 300.0) -> dict[str, Any]:
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(
                    f"child did not say {word} in {timeout:.0f} s: {self._stderr_tail()}"
                ) from None
            if line is None:
                self.proc.wait(timeout=10)
                raise RuntimeError(f"child exited before {word}: {self._stderr_tail()}")
            if line.startswith(word + " "):
                return json.loads(line[len(word) + 1 :])

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.say("EXIT")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self.stderr.close()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=10)


def child_main(role: str, spec: dict[str, Any]) -> int:
    """The child side of :class:`Child`."""

    def say(word: str, payload: dict[str, Any]) -> None:
        print(f"{word} {json.dumps(payload)}", flush=True)

    def wait_for(word: str) -> None:
        for line in sys.stdin:
            if line.strip() == word:
                return
        sys.exit(0)

    device = spec["device"]
    if role == "load":
        eng = engine_for(
            Path(spec["path"]), device, spec["dtype"], sessions=spec["sessions"], context=spec["context"]
        )
        if spec.get("graphs"):
            _graphs(eng)
        prompt = spec["prompt"]
        run_sessions(eng, prompt, spec["sessions"], 1, 4)
        say("READY", {})
        wait_for("GO")
        t = time.perf_counter()
        run = run_sessions(eng, prompt, spec["sessions"], 1, spec["tokens"])
        say("DONE", {"wall_s": time.perf_counter() - t, "tok_s": run.decode_rate()})
        wait_for("EXIT")
        eng.shutdown()
        return 0
    if role == "weights":
        from backend.engine.config import resolve_dtype
        from backend.models import load_model

        dtype = resolve_dtype(spec["dtype"], device)
        path = Path(spec["path"])
        if device.startswith("cuda"):
            torch.cuda.init()
            torch.zeros(1, device=device)  # the CUDA context exists before the figure is taken
        if spec["share"]:
            share = sw.WeightShare(spec["root"], spec["key"], timeout_s=120)
            shared = share.load(lambda: load_model(path, dtype=dtype, device=device))
            role_name, note, model = shared.role, shared.note, shared.model
        else:
            model, role_name, note = load_model(path, dtype=dtype, device=device), "own copy", "not shared"
        # Touch every weight (a forward would): mapped pages count once they are read.
        checksum = sum(float(t.float().sum()) for t in sw.model_tensors(model).values())
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the figure is what the instance keeps, not its loading scratch
        say("READY", {"role": role_name, "note": note, "checksum": checksum, "pid": os.getpid()})
        wait_for("EXIT")
        return 0
    raise SystemExit(f"unknown child role {role!r}")


def processes_section(check: Check) -> dict[str, Any]:
    """Two processes decoding on one GPU: alone, together, and together under MPS."""
    if not check.cuda:
        return {"skipped": "needs CUDA"}
    a = check.args
    shape = check.shapes[0]
    path = check.checkpoint(shape)
    n = min(16, max(int(s) for s in a.sessions.split(",")))
    spec = {
        "device": check.device,
        "dtype": check.dtype,
        "path": str(path),
        "sessions": n,
        "context": a.context,
        "tokens": a.tokens,
        "graphs": True,
        "prompt": prompts(SHAPES[shape]["vocab_size"], 1, a.prompt_len, seed=8)[0],
    }

    def together(env: dict[str, str] | None = None, count: int = 2) -> dict[str, Any]:
        kids = [Child("load", spec, env) for _ in range(count)]
        try:
            for k in kids:
                k.expect("READY")
            t = time.perf_counter()
            for k in kids:
                k.say("GO")
            done = [k.expect("DONE") for k in kids]
            return {
                "wall_s": round(time.perf_counter() - t, 3),
                "tok_s": [round(d["tok_s"], 1) for d in done],
            }
        finally:
            for k in kids:
                k.close()

    out: dict[str, Any] = {"shape": shape, "sessions_per_process": n}
    out["alone"] = together(count=1)
    out["two_without_mps"] = together()
    out["speedup_without_mps"] = round(2 * out["alone"]["wall_s"] / out["two_without_mps"]["wall_s"], 3)
    mps = shutil.which("nvidia-cuda-mps-control")
    if mps is None:
        out["two_with_mps"] = {"skipped": "nvidia-cuda-mps-control not found"}
        return out
    pipe = check.tmp / "mps-pipe"
    log = check.tmp / "mps-log"
    pipe.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipe), "CUDA_MPS_LOG_DIRECTORY": str(log)}
    started = subprocess.run(
        [mps, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=30
    )
    if started.returncode != 0:
        out["two_with_mps"] = {"skipped": f"MPS daemon did not start: {started.stderr.strip()[:300]}"}
        return out
    try:
        out["two_with_mps"] = together(env)
        out["speedup_with_mps"] = round(2 * out["alone"]["wall_s"] / out["two_with_mps"]["wall_s"], 3)
    except Exception as exc:  # noqa: BLE001 - keep the figures without MPS
        out["two_with_mps"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        subprocess.run(
            [mps], input="quit\n", env={**os.environ, **env}, capture_output=True, text=True, timeout=30
        )
    return out


def _private_mib(pid: int) -> float | None:
    """Memory of ``pid`` not shared with anyone (Private_Clean + Private_Dirty), MiB."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    kib = sum(
        int(line.split()[1])
        for line in text.splitlines()
        if line.startswith(("Private_Clean", "Private_Dirty"))
    )
    return kib / 1024


def weights_section(check: Check) -> dict[str, Any]:
    """Memory an extra instance adds: attaching to the owner's weights vs loading its own.

    GPU: device-wide free memory before and after each process (its CUDA context included).
    CPU: the process's private memory (mapped weights are shared pages, not private).
    """
    shape = check.shapes[-1]
    path = check.checkpoint(shape)
    root = check.tmp / "weights"
    key = sw.share_key(path, torch.bfloat16 if check.dtype == "bfloat16" else torch.float32, check.device)
    spec = {"device": check.device, "dtype": check.dtype, "path": str(path), "root": str(root), "key": key}

    def used_mib() -> float:
        free, total = torch.cuda.mem_get_info(torch.device(check.device))
        return (total - free) / 2**20

    out: dict[str, Any] = {"shape": shape, "measure": "device memory in use" if check.cuda else "private RSS"}
    plan = [("owner", True)] + [("attached", True)] * check.args.weights_attached + [("own copy", False)]
    kids: list[Child] = []
    rows: list[dict[str, Any]] = []

    def start(label: str, share: bool) -> tuple[str, Child]:
        kids.append(Child("weights", {**spec, "share": share}))
        return label, kids[-1]

    def record(label: str, ready: dict[str, Any], added: float | None) -> None:
        rows.append(
            {
                "expected": label,
                "role": ready["role"],
                "note": ready["note"],
                "mib": round(added or 0.0, 1),
                "checksum": ready["checksum"],
            }
        )

    try:
        if check.cuda:  # one at a time: the figure is the device-wide difference
            for label, share in plan:
                before = used_mib()
                _, kid = start(label, share)
                ready = kid.expect("READY")
                record(label, ready, used_mib() - before)
        else:  # the owner first, then the rest at once (private memory is per process)
            label, kid = start(*plan[0])
            ready = kid.expect("READY")
            record(label, ready, _private_mib(ready["pid"]))
            rest = [start(*p) for p in plan[1:]]
            for label, kid in rest:
                ready = kid.expect("READY")
                record(label, ready, _private_mib(ready["pid"]))
        out["instances"] = rows
        owner, attached, own = rows[0], rows[1:-1], rows[-1]
        out["mib_per_extra_instance_shared"] = (
            round(statistics.fmean(r["mib"] for r in attached), 1) if attached else None
        )
        out["mib_per_extra_instance_own_copy"] = own["mib"]
        out["weights_mib"] = round(sum(t.numel() * t.element_size() for t in _tensors_of(path)) / 2**20, 1)
        out["same_weights"] = all(math.isclose(r["checksum"], owner["checksum"], rel_tol=1e-9) for r in rows)
        out["roles_as_expected"] = [r["role"] for r in rows] == [r["expected"] for r in rows]
    finally:
        for kid in reversed(kids):
            kid.close()
    return out


def _tensors_of(path: Path) -> list[torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return [f.get_tensor(k) for k in f.keys()]


def trtllm_section(check: Check) -> dict[str, Any]:
    """TensorRT-LLM's prefill (through the connector) vs the torch engine's: KV and first token."""
    from backend.serving import trtllm_prefill as tp

    ok, detail = tp.trtllm_available()
    if not (ok and check.cuda):
        return {"skipped": detail if not ok else "needs CUDA"}
    a = check.args
    shape = check.shapes[0]
    path = check.checkpoint(shape)
    engine = engine_for(path, check.device, check.dtype, sessions=4, context=a.context)
    adapter = tp.TrtllmPrefill(path, max_context=a.context, kv_fraction=0.1)
    out: dict[str, Any] = {
        "tensorrt_llm": detail,
        "targets": tp.TRTLLM_VERSION,
        "shape": shape,
        "layouts": {},
    }
    try:
        for p in prompts(SHAPES[shape]["vocab_size"], 2, a.prompt_len, seed=9):
            ref = engine.prefill_export(p)
            for layout in tp.LAYOUTS:
                got = adapter.export_with_layout(p, layout)
                kv_ref, kv_got = ref.kv.float(), got.kv.float().to(ref.kv.device)
                row = out["layouts"].setdefault(layout, [])
                row.append(
                    {
                        "kv_shape_matches": list(kv_got.shape) == list(kv_ref.shape),
                        "kv_cosine": round(
                            torch.nn.functional.cosine_similarity(
                                kv_ref.flatten(), kv_got.flatten(), dim=0
                            ).item(),
                            6,
                        )
                        if kv_got.shape == kv_ref.shape
                        else None,
                        "kv_max_abs_diff": round((kv_ref - kv_got).abs().max().item(), 5)
                        if kv_got.shape == kv_ref.shape
                        else None,
                        "first_token_matches": int(ref.logits[-1].argmax()) == int(got.logits[-1].argmax()),
                        "logit_cosine": round(
                            torch.nn.functional.cosine_similarity(
                                ref.logits[-1].float().cpu(), got.logits[-1].float().cpu(), dim=0
                            ).item(),
                            6,
                        ),
                    }
                )
        probe = [2 + i for i in range(40)]
        try:  # the start-up proof a serving prefill instance runs (trtllm_prefill.attach)
            layout, scores = tp.choose_layout(adapter.export_with_layout, engine.prefill_export(probe), probe)
            out["chosen_layout"] = {"layout": layout, "kv_cosine": scores}
        except RuntimeError as exc:
            out["chosen_layout"] = {"error": str(exc)}
    finally:
        adapter.shutdown()
        engine.shutdown()
    return out


# ---------------------------------------------------------------------- main
#: Sections in run order, with the time each needs on an H200 (s), for the budget.
SECTIONS: dict[str, tuple[Callable[[Check], Any], float]] = {
    "env": (env_section, 0),
    "agreement": (agreement_section, 20),
    "handoff": (handoff_section, 10),
    "throughput": (throughput_section, 30),
    "row_step": (row_step_section, 30),
    "streams": (streams_section, 20),
    "processes": (processes_section, 60),
    "weights": (weights_section, 40),
    "trtllm": (trtllm_section, 60),
}


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    check = Check(args)
    skip = set(filter(None, args.skip.split(",")))
    if not args.trtllm:
        skip.add("trtllm")
    try:
        for name, (fn, need_s) in SECTIONS.items():
            if name in skip:
                check.out["skipped"][name] = "--trtllm not given" if name == "trtllm" else "--skip"
                continue
            check.section(name, lambda fn=fn: fn(check), need_s=need_s)
    finally:
        check.close()
    out = check.out
    out["elapsed_s"] = round(time.monotonic() - check.t0, 1)
    verdicts = {
        "handoff_identical": out.get("handoff", {}).get("identical"),
        "graphs_same_tokens": all(
            r.get("graphs_vs_eager_tokens", {}).get("identical", False)
            for k, r in out.get("throughput", {}).items()
            if isinstance(r, dict) and "graphs_vs_eager_tokens" in r
        )
        if "throughput" in out
        else None,
        "weights_shared": (
            out.get("weights", {}).get("roles_as_expected") and out["weights"].get("same_weights")
        )
        if "weights" in out
        else None,
    }
    trt = out.get("trtllm", {})
    verdicts["trtllm_layout_proven"] = (
        ("layout" in trt.get("chosen_layout", {})) if "chosen_layout" in trt else None
    )
    out["ok"] = not out["errors"] and all(v is not False for v in verdicts.values())
    out["verdicts"] = verdicts
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument(
        "--dtype", default="bfloat16", help="the device engines' dtype (compared with CPU float32)"
    )
    ap.add_argument(
        "--shapes",
        default=None,
        help=f"comma list of {', '.join(SHAPES)} (default: GPU shapes on CUDA, tiny on CPU)",
    )
    ap.add_argument("--sessions", default="1,16,64", help="session counts for tokens/s")
    ap.add_argument("--streams", default="1,2,4,8", help="streams per session for the row step")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per stream in timed runs")
    ap.add_argument("--agree-tokens", type=int, default=24, help="greedy tokens compared per prompt")
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=450.0, help="sections that would not fit are skipped")
    ap.add_argument(
        "--trtllm", action="store_true", help="also compare the TensorRT-LLM prefill (its image only)"
    )
    ap.add_argument("--skip", default="", help=f"comma list of sections to skip ({', '.join(SECTIONS)})")
    ap.add_argument("--cpu-threads", type=int, default=None, help="torch threads of CPU engines")
    ap.add_argument(
        "--weights-attached", type=int, default=2, help="instances that attach to the owner's weights"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object (else indented)")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda":
        args.device = "cuda:0"
    if args.shapes is None:
        args.shapes = ",".join(GPU_SHAPES) if args.device.startswith("cuda") else "tiny"
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        ap.error(f"--shapes: unknown {sorted(unknown)}; known: {', '.join(SHAPES)}")
    unknown = set(filter(None, args.skip.split(","))) - set(SECTIONS)
    if unknown:
        ap.error(f"--skip: unknown {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    global CPU_THREADS
    args = parse_args(argv)
    CPU_THREADS = args.cpu_threads
    if args.child:
        return child_main(args.child, json.loads(args.child_spec))
    result = run_check(args)
    text = json.dumps(result) if args.json else json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
