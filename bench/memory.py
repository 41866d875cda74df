"""Memory benchmark: ``python -m bench.memory --json [--qwen3-1.7b] [--no-compare]``.

Starts the default server (every model of the repository, the launcher's default instance
counts), sends one short request so that each instance has touched what serving touches,
waits until it is idle, then reads the proportional set size (PSS, ``/proc/PID/smaps_rollup``)
of tritonserver and every Python stub. PSS splits a shared page between the processes that
map it, so the sum is what the whole server costs the machine: the weights mapped from the
packed file (``backend.models.packed``) count once however many instances map them.

Reported per run: total PSS, PSS per process, the packed file's bytes, the KV in use (the
``multistream_kv_cache_used_tokens`` gauges times the pool's bytes per token), and
``pss_total / (packed bytes + KV in use)`` against the target of 1.5. With ``--compare``
(default for the default model) the same server is measured a second time with
``MULTISTREAM_PACKED_WEIGHTS=0`` (every process loads and packs its own copy, as before
packed files), in the same run. ``--qwen3-1.7b`` adds a random-weight checkpoint in
Qwen3-1.7B's shape (28 layers, hidden 2048, 16 / 8 heads, vocab 151936; 3.4 GB in bf16),
written once to the cache: the case where the weights, not the interpreters, dominate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

QWEN3_1_7B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "num_hidden_layers": 28,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
}


def _log(msg: str) -> None:
    print(f"[bench.memory {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def random_qwen3_checkpoint(folder: Path) -> Path:
    """A random checkpoint in Qwen3-1.7B's shape (the default model's tokenizer), written once."""
    import torch
    from safetensors.torch import save_file

    from backend.model_store import ensure_default_model

    done = folder / ".complete"
    if done.is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    src = ensure_default_model(progress=False)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((src / name).read_bytes())
    c = QWEN3_1_7B
    (folder / "config.json").write_text(json.dumps(c, indent=1))
    g = torch.Generator().manual_seed(0)
    h, inter, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd

    def r(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    layers_per_shard = 4
    for s in range(0, c["num_hidden_layers"], layers_per_shard):
        shard: dict[str, torch.Tensor] = {}
        for i in range(s, min(s + layers_per_shard, c["num_hidden_layers"])):
            p = f"model.layers.{i}."
            shard |= {
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "self_attn.q_proj.weight": r(q, h),
                p + "self_attn.k_proj.weight": r(kv, h),
                p + "self_attn.v_proj.weight": r(kv, h),
                p + "self_attn.o_proj.weight": r(h, q),
                p + "self_attn.q_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
                p + "self_attn.k_norm.weight": torch.ones(hd, dtype=torch.bfloat16),
                p + "mlp.gate_proj.weight": r(inter, h),
                p + "mlp.up_proj.weight": r(inter, h),
                p + "mlp.down_proj.weight": r(h, inter),
            }
        name = f"model-{s // layers_per_shard:05d}.safetensors"
        save_file(shard, str(folder / name))
        weight_map |= dict.fromkeys(shard, name)
    last = {
        "model.embed_tokens.weight": r(c["vocab_size"], h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
    }
    save_file(last, str(folder / "model-embed.safetensors"))
    weight_map |= dict.fromkeys(last, "model-embed.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    done.write_text("ok")
    return folder


def pss_of_tree(pid: int) -> dict[str, int]:
    """``{process name: PSS bytes}`` of ``pid`` and its descendants."""
    import psutil

    out: dict[str, int] = {}
    root = psutil.Process(pid)
    stubs = {p: n for n, p in _stub_names(pid).items()}
    for p in [root, *root.children(recursive=True)]:
        try:
            name = stubs.get(p.pid) or p.name()
            out[f"{name} ({p.pid})"] = int(p.memory_full_info().pss)
        except psutil.Error:
            continue
    return out


def _stub_names(server_pid: int) -> dict[str, int]:
    from launcher.serve import python_stubs

    return python_stubs(server_pid)


def gauge(metrics_url: str, family: str) -> float:
    """The sum over instances of one gauge family on Triton's /metrics."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(family + "{"))


def kv_bytes_per_token(model_dir: Path) -> int:
    from backend.models.config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    return 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # fp32 pool on CPU


def measure(model_dir: str, packed_weights: bool, settle_s: float) -> dict[str, Any]:
    """One server: start, one request, idle, PSS of every process."""
    import torch

    from backend.engine import resolve_dtype
    from backend.engine.config import resolve_quantization
    from backend.model_store import resolve_model_dir
    from backend.models import packed
    from client import MultiStreamClient
    from launcher.serve import start_server

    path = resolve_model_dir(model_dir)
    env_key = "MULTISTREAM_PACKED_WEIGHTS"
    old = os.environ.get(env_key)
    os.environ[env_key] = "1" if packed_weights else "0"
    try:
        t0 = time.monotonic()
        with start_server(model_dir=str(path), log_level="warning", ready_timeout=1800) as handle:
            startup_s = time.monotonic() - t0
            with MultiStreamClient(handle.grpc_url, protocol="grpc") as c:
                done = c.generate("Why is the sky blue? Answer in two sentences.", max_tokens=16).result()
            time.sleep(settle_s)
            kv_tokens = gauge(handle.metrics_url, "multistream_kv_cache_used_tokens")
            per_process = pss_of_tree(handle.process.pid)
    finally:
        if old is None:
            os.environ.pop(env_key, None)
        else:
            os.environ[env_key] = old
    dtype = resolve_dtype("auto")
    quantization = resolve_quantization("auto", torch.device("cpu"), dtype)
    packed_file = packed.packed_path(path, dtype, quantization)
    packed_bytes = packed_file.stat().st_size if packed_file.is_file() else None
    kv_bytes = int(kv_tokens * kv_bytes_per_token(path))
    total = sum(per_process.values())
    return {
        "model_dir": str(path),
        "packed_weights": packed_weights,
        "startup_s": round(startup_s, 1),
        "answer_tokens": int(done.tokens.get("output", 0)),
        "pss_total_mib": round(total / 2**20, 1),
        "pss_mib": {k: round(v / 2**20, 1) for k, v in sorted(per_process.items())},
        "packed_file": str(packed_file),
        "packed_mib": round(packed_bytes / 2**20, 1) if packed_bytes else None,
        "kv_in_use_mib": round(kv_bytes / 2**20, 2),
        "pss_vs_packed_plus_kv": round(total / (packed_bytes + kv_bytes), 2) if packed_bytes else None,
        "target": "<= 1.5",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--model-dir", default="default")
    p.add_argument("--no-compare", action="store_true", help="skip the run without packed files")
    p.add_argument(
        "--qwen3-1.7b", dest="qwen3", action="store_true", help="also a random Qwen3-1.7B-shaped model"
    )
    p.add_argument("--settle-s", type=float, default=3.0, help="idle time before reading PSS")
    args = p.parse_args(argv)
    report: dict[str, Any] = {
        "command": "python -m bench.memory " + " ".join(argv or sys.argv[1:]),
        "runs": [],
    }
    _log(f"{args.model_dir}: packed weights ...")
    report["runs"].append(measure(args.model_dir, True, args.settle_s))
    if not args.no_compare:
        _log(f"{args.model_dir}: every process its own copy (MULTISTREAM_PACKED_WEIGHTS=0) ...")
        report["runs"].append(measure(args.model_dir, False, args.settle_s))
        a, b = report["runs"][0]["pss_total_mib"], report["runs"][1]["pss_total_mib"]
        report["own_copies_vs_packed"] = round(b / a, 2)
    if args.qwen3:
        from backend.model_store import default_cache_dir

        _log("random Qwen3-1.7B-shaped checkpoint (written once, 3.4 GB) ...")
        folder = random_qwen3_checkpoint(default_cache_dir() / "random-qwen3-1.7b")
        _log("... packed weights (the first start packs them: minutes) ...")
        report["runs"].append(measure(str(folder), True, args.settle_s))
    for run in report["runs"]:
        _log(
            f"{Path(run['model_dir']).name} packed={run['packed_weights']}: PSS {run['pss_total_mib']} MiB, "
            f"packed file {run['packed_mib']} MiB, KV {run['kv_in_use_mib']} MiB, ratio {run['pss_vs_packed_plus_kv']}"
        )
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
