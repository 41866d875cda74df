"""``prefill`` computing prompts: prompt rows -> KV cache + last-row logits, for ``decode``.

Why a model of its own: prefill is compute-bound and decode is latency-bound; separate
instances let a long prompt run without stalling the decode loop of running sessions,
and on GPU this step is where a TensorRT-LLM engine plugs in. The engine side is
:meth:`Engine.prefill_export`; what crosses to decode is ``backend.serving.handoff``. Used by
``backend.serving.prefill`` when prompts are computed here (``prefill_at = prefill``).
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

from backend.serving import handoff
from backend.serving.engine_model import EngineModel, error_message
from backend.serving.request import RequestConfig
from backend.serving.tensors import input_ids, request_json

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


class PrefillEngineModel(EngineModel):
    """Not decoupled: answers in ``execute``; the requests of one call prefill together."""

    role = "prefill"
    stats_period = 1.0

    def setup(self, args: dict[str, Any]) -> None:
        # Requests of one execute() are submitted together so the engine batches them.
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="prefill")

    def _one(self, request: Any) -> Any:
        cfg = RequestConfig.from_json(request_json(request))
        rules = cfg.grid_rules() if cfg.layout == "paper" else None
        prefix = self.engine.prefill_export(handoff.prefix_of(input_ids(request), cfg), rules=rules)
        return pb_utils.InferenceResponse(handoff.to_tensors(prefix))

    def execute(self, requests: list[Any]) -> list[Any]:
        futures = [self.pool.submit(self._one, r) for r in requests]
        responses = []
        for fut in futures:
            try:
                responses.append(fut.result())
            except Exception as e:  # noqa: BLE001 - any failure becomes this request's error
                message = error_message(self.role, e)
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"prefill failed: {message}"))
                )
        return responses

    def teardown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
