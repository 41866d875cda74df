"""The engine-instance helper: parameters -> EngineConfig, device placement, own CUDA stream."""

from __future__ import annotations

import json
import queue
import threading

import pytest
import torch

from backend.serving.instance import engine_config
from backend.serving.parameters import instance_device, instance_parameters


def _args(kind: str = "CPU", device_id: str = "0", **params: str) -> dict:
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    return {
        "model_config": json.dumps(config),
        "model_instance_kind": kind,
        "model_instance_device_id": device_id,
    }


def test_parameters_to_engine_config() -> None:
    params = instance_parameters(
        _args(
            dtype="float32",
            threads="3",
            max_sessions="5",
            max_context="512",
            quantization="none",
            kv_dtype="bf16",
        )
    )
    cfg = engine_config(params, "cpu", prefill_chunk=64)
    assert (
        cfg.dtype,
        cfg.threads,
        cfg.max_sessions,
        cfg.max_context,
        cfg.quantization,
        cfg.kv_dtype,
        cfg.prefill_chunk,
    ) == (
        "float32",
        3,
        5,
        512,
        "none",
        "bf16",
        64,
    )
    assert engine_config({}, "cpu").threads is None  # no parameter: torch decides
    assert engine_config({}, "cpu").kv_dtype == "auto"


def test_device_placement() -> None:
    assert instance_device(_args("CPU")) == "cpu"
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"  # KIND_GPU without CUDA falls back
    assert instance_device(_args("GPU", "0")) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_own_cuda_stream_gives_the_same_tokens(default_model_dir) -> None:  # pragma: no cover - GPU only
    """Every forward runs on the engine's thread with the given stream current (a wrapper
    that ignored the stream would still give the same tokens), and the tokens do not change."""
    from backend.engine import Engine, EngineConfig, SamplingParams, StreamSpec
    from backend.serving.instance import use_own_cuda_stream

    def run(stream: torch.cuda.Stream | None) -> tuple[list[int], list[tuple[object, object]]]:
        engine = Engine.from_model_dir(
            default_model_dir, EngineConfig(device="cuda:0", max_sessions=1, max_context=256)
        )
        seen: list[tuple[object, object]] = []  # (thread, current stream) of every forward
        inner = engine.model.forward

        def spy(*a, **kw):
            seen.append((threading.current_thread(), torch.cuda.current_stream()))
            return inner(*a, **kw)

        engine.model.forward = spy
        if stream is not None:
            use_own_cuda_stream(engine, stream)
        q: queue.Queue = queue.Queue()
        prompt = engine.tokenizer.encode("The capital of France is")
        engine.submit(prompt, [StreamSpec("output", sampling=SamplingParams(max_tokens=12))], on_event=q.put)
        ids = []
        try:
            while True:
                ev = q.get(timeout=60)
                ids += ev.token_ids
                if ev.finished:
                    break
        finally:
            thread = engine._thread
            engine.shutdown()
        assert seen and all(t is thread for t, _ in seen), "a forward ran off the engine thread"
        return ids, [s for _, s in seen]

    own = torch.cuda.Stream()
    assert own != torch.cuda.default_stream()
    with_stream, streams = run(own)
    assert all(s == own for s in streams), f"forwards ran on {set(map(str, streams))}, not on {own}"
    plain, default_streams = run(None)
    assert all(s == torch.cuda.default_stream() for s in default_streams)
    assert with_stream == plain
