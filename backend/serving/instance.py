"""Builds the torch :class:`~backend.engine.Engine` of one Triton model instance.

Why a helper: prefill, decode and reasoning each own an engine, configured from the same
``parameters`` that ``launcher.serve`` renders into every config.pbtxt (model dir, dtype,
threads, max_sessions, max_context), and placed by Triton's ``instance_group``. Triton
gives a ``KIND_GPU`` instance a device but no CUDA stream of its own, so each GPU
instance creates one here and runs every forward on it: prefill, decode and reasoning
instances then overlap on one GPU instead of serialising on the default stream.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import torch

from backend.engine import Engine, EngineConfig, cuda_graphs, shared_weights
from backend.serving import gpu_handoff, trtllm_prefill
from backend.serving.parameters import (
    DEFAULT_MAX_QUEUED,
    instance_device,
    instance_parameters,
    parse_auto_bool,
)


def engine_config(params: dict[str, str], device: str, **overrides: Any) -> EngineConfig:
    """EngineConfig from rendered parameters (strings), with per-model overrides."""
    cfg = EngineConfig(
        dtype=params.get("dtype", "auto") or "auto",
        device=device,
        threads=int(params.get("threads", "0") or 0) or None,
        max_sessions=int(params.get("max_sessions", "16")),
        max_context=int(params.get("max_context", "2048")),
        # Sessions an instance lets wait for a KV slot before answering "server busy": this
        # bounds the memory of queued requests (each holds its prompt KV). README, Reliability.
        max_queued=int(params.get("max_queued", str(DEFAULT_MAX_QUEUED))),
        # auto = int4 decode weights where the kernel exists (CPU + bf16), dense otherwise.
        quantization=params.get("quantization", "auto") or "auto",
        # auto = fp32 on CPU (attention runs in fp32 there), the model dtype on GPU.
        kv_dtype=params.get("kv_dtype", "auto") or "auto",
        # KV of recent prompt prefixes reused by later requests, in whichever instance
        # computes prompts (prefill's parameter prefill_at). 0 = off.
        prefix_cache_mb=int(params.get("prefix_cache_mb", "128") or 0),
        # Tokens of one step (decode rows first, prompt chunks take the rest), and of one
        # session's prompt per step: what a prompt computed inside decode may cost a step.
        max_step_tokens=int(params.get("max_step_tokens", "0") or 0) or EngineConfig.max_step_tokens,
        prefill_chunk=int(params.get("prefill_chunk", "0") or 0) or EngineConfig.prefill_chunk,
        # "true": prompt tokens of a small step take the int4 weights (the fused C++ step);
        # "auto" (default): wherever decode rows take our int4 kernel (EngineConfig.int4_prompts).
        int4_prompts=parse_auto_bool("int4_prompts", params.get("int4_prompts", "auto")),
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_engine(args: dict[str, Any], role: str | None = None, **overrides: Any) -> Engine:
    """The engine of this instance. On CUDA (docs/gpu.md): weights shared with the device's
    other instances (parameter ``share_weights``), steps replayed as CUDA graphs
    (``cuda_graphs``), forwards on the instance's own ``torch.cuda.Stream``; a ``prefill``
    instance may hand plain prompts to TensorRT-LLM (``prefill_backend``)."""
    from backend.model_store import resolve_model_dir

    params = instance_parameters(args)
    device = instance_device(args)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    gpu_handoff.configure(json.loads(args["model_config"]), device)
    model_dir = resolve_model_dir(params.get("model_dir") or "default")
    config = engine_config(params, device, **overrides)
    if shared_weights.sharing_wanted(params.get("share_weights", "auto"), device):
        root = shared_weights.weights_root(args.get("model_repository"))
        engine = shared_weights.engine_with_shared_weights(model_dir, config, root)
    else:
        engine = Engine.from_model_dir(model_dir, config)
    if device.startswith("cuda"):
        if cuda_graphs.graphs_wanted(params.get("cuda_graphs", "auto"), device):
            cuda_graphs.install(engine)
        use_own_cuda_stream(engine, torch.cuda.Stream(device=torch.device(device)))
    if role == "prefill":
        trtllm_prefill.attach(engine, params, model_dir, device)
    return engine


def use_own_cuda_stream(engine: Engine, stream: torch.cuda.Stream) -> None:
    """Runs the engine's forwards on ``stream``.

    The scheduler thread is the engine's; rather than changing it, the model's forward is
    wrapped: it waits for work queued on the default stream (KV imports) before starting,
    and the default stream waits for it before the logits are read back, so ordering within
    the instance is kept while other instances' kernels can interleave.
    """
    model = engine.model
    forward: Callable[..., Any] = model.forward

    def forward_on_stream(*a: Any, **kw: Any) -> Any:
        default = torch.cuda.current_stream(stream.device)
        stream.wait_stream(default)
        with torch.cuda.stream(stream):
            out = forward(*a, **kw)
        default.wait_stream(stream)
        return out

    model.forward = forward_on_stream  # type: ignore[method-assign]
    engine.cuda_stream = stream  # type: ignore[attr-defined]


class StatsPoller:
    """Calls ``update(engine.stats())`` every ``period`` seconds on a daemon thread.

    Gauges (active sessions, KV use) must fall back to idle when sessions end even if no
    request arrives afterwards; polling is simpler and cheaper than hooking the engine.
    """

    def __init__(self, engine: Engine, update: Callable[[dict], None], period: float = 0.25):
        self._engine = engine
        self._update = update
        self._period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stats-poller", daemon=True)
        self._thread.start()

    def poll_now(self) -> None:
        try:
            self._update(self._engine.stats())
        except Exception:  # noqa: BLE001 - metrics must never break serving
            pass

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.poll_now()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
