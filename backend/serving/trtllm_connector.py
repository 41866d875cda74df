"""The KV cache connector TensorRT-LLM calls: it hands each prompt's KV blocks to the caller.

Kept apart from ``backend.serving.trtllm_prefill`` because it subclasses TensorRT-LLM's own
connector ABCs (``tensorrt_llm._torch.pyexecutor.kv_cache_connector``, TensorRT-LLM 1.1.0),
and importing ``tensorrt_llm`` costs seconds: only a prefill instance that uses the
TensorRT-LLM backend (TensorRT-LLM imports this by name) and the tests import this module.
Without TensorRT-LLM (CPU tests) the bases are small stand-ins with the same methods.

The split is TensorRT-LLM's: :class:`PromptKVScheduler` sees each step's scheduled requests
and their blocks (``build_connector_meta``), :class:`PromptKVWorker` runs at the end of every
forward (``wait_for_save``) with the metadata the scheduler built for it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from backend.serving.trtllm_prefill import SINK, Capture, gather_prompt_kv

try:  # only in the TensorRT-LLM image
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (
        KvCacheConnectorScheduler as _SchedulerBase,
    )
    from tensorrt_llm._torch.pyexecutor.kv_cache_connector import (
        KvCacheConnectorWorker as _WorkerBase,
    )
except Exception:  # noqa: BLE001 - no usable TensorRT-LLM: stand-ins (the CPU tests)

    class _SchedulerBase:  # type: ignore[no-redef]
        def __init__(self, llm_args: Any):
            self._llm_args = llm_args

    class _WorkerBase:  # type: ignore[no-redef]
        def __init__(self, llm_args: Any):
            self._llm_args = llm_args
            self._metadata: Any = None

        def bind_connector_meta(self, metadata: Any) -> None:
            self._metadata = metadata

        def get_connector_meta(self) -> Any:
            return self._metadata

        def register_forward_pass_callable(self) -> None:
            return None


class PromptKVScheduler(_SchedulerBase):
    """Scheduler half: tracks each request's blocks; says when its prompt is computed."""

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self._prompts: dict[int, tuple[int, ...]] = {}
        self._blocks: dict[int, list[int]] = {}

    def build_connector_meta(self, scheduler_output: Any) -> list[Capture]:
        captures: list[Capture] = []
        for req in scheduler_output.new_requests:
            self._prompts[req.request_id] = tuple(req.new_tokens)
            self._blocks[req.request_id] = list(req.new_block_ids)
            self._check(req, captures)
        for req in scheduler_output.cached_requests:
            if req.request_id in self._blocks:
                self._blocks[req.request_id].extend(req.new_block_ids)
                self._check(req, captures)
        return captures

    def _check(self, req: Any, captures: list[Capture]) -> None:
        prompt = self._prompts[req.request_id]
        if req.computed_position + req.num_scheduled_tokens >= len(prompt):
            captures.append(Capture(req.request_id, prompt, list(self._blocks.pop(req.request_id))))
            del self._prompts[req.request_id]

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False  # nothing to load: this connector only reads

    def update_state_after_alloc(self, request: Any, block_ids: list[int]) -> None:
        pass

    def request_finished(self, request: Any, cache_block_ids: list[int]) -> bool:
        rid = getattr(request, "request_id", None)
        self._prompts.pop(rid, None)
        self._blocks.pop(rid, None)
        return False  # the gather already happened, synchronously ordered on the stream


class PromptKVWorker(_WorkerBase):
    """Worker half: at the end of a forward, gathers the blocks of the prompts it completed."""

    def __init__(self, llm_args: Any):
        super().__init__(llm_args)
        self.pool: torch.Tensor | None = None
        self.sink = SINK

    def register_kv_caches(self, kv_cache_tensor: torch.Tensor) -> None:
        self.pool = kv_cache_tensor

    def start_load_kv(self, stream: Any) -> None:
        pass

    def wait_for_layer_load(self, layer_idx: int, stream: Any) -> None:
        pass

    def save_kv_layer(self, layer_idx: int, stream: Any) -> None:
        pass

    def wait_for_save(self, stream: Any) -> None:
        captures: list[Capture] = self.get_connector_meta() or []
        if not captures:
            return
        if self.pool is None:
            raise RuntimeError("the KV pool was never registered with the prompt_kv connector")
        ctx = (
            torch.cuda.stream(stream)
            if stream is not None and self.pool.is_cuda
            else contextlib.nullcontext()
        )
        with ctx:
            for cap in captures:
                kv = gather_prompt_kv(
                    self.pool,
                    cap.block_ids,
                    len(cap.prompt),
                    num_kv_heads=self.sink.num_kv_heads,
                    head_dim=self.sink.head_dim,
                    layout=self.sink.layout,
                )
                ready = None
                if kv.is_cuda:
                    ready = torch.cuda.Event()
                    ready.record(stream)
                self.sink.deliver(cap.prompt, (kv, ready))

    def get_finished(
        self, finished_gen_req_ids: list[int], started_loading_req_ids: list[int]
    ) -> tuple[list, list]:
        return [], []


__all__ = ["PromptKVScheduler", "PromptKVWorker"]
