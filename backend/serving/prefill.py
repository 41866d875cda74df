"""Triton model ``prefill``: prompt rows -> KV cache + last-row logits, for ``decode``.

Why a model of its own: prefill is compute-bound and decode is latency-bound; separate
instances let a long prompt run without stalling the decode loop of running sessions,
and on GPU this step is where a TensorRT-LLM engine plugs in (a later issue). The engine
interface is :meth:`Engine.prefill_export`; the KV crosses processes as FP32 tensors
(exact for bf16 and fp32 engines; the hand-off cost is measured in ``bench/serving.py``).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import numpy as np

from backend.serving.instance import StatsPoller, build_engine, enable_crash_traces
from backend.serving.metrics import ServingMetrics
from backend.serving.tensors import input_ids

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


class PrefillModel:
    def initialize(self, args: dict[str, Any]) -> None:
        enable_crash_traces()
        self.engine = build_engine(args)
        self.metrics = ServingMetrics("prefill", args.get("model_instance_name", "prefill"))
        self.poller = StatsPoller(self.engine, self.metrics.engine_stats, period=1.0)
        # Requests of one execute() are submitted together so the engine batches them.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="prefill")

    def _one(self, request: Any) -> Any:
        ids = input_ids(request)
        kv, logits = self.engine.prefill_export(ids)
        return pb_utils.InferenceResponse(
            [
                pb_utils.Tensor("prompt_kv", kv.float().cpu().numpy()[None]),
                pb_utils.Tensor("prompt_logits", logits.float().cpu().numpy().astype(np.float32)[None]),
            ]
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        futures = [self.pool.submit(self._one, r) for r in requests]
        responses = []
        for fut in futures:
            try:
                responses.append(fut.result())
            except Exception as e:  # noqa: BLE001 - any failure becomes this request's error
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"prefill failed: {e}"))
                )
        return responses

    def finalize(self) -> None:
        self.poller.stop()
        self.metrics.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.engine.shutdown()
