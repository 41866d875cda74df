"""Triton model ``prefill``: where a prompt is computed is decided here, once, at load.

- ``prefill_at = prefill`` (GPU deployments, TensorRT-LLM, a non-FP32 wire): this instance
  computes the prompt's KV and hands it to decode (``backend.serving.prefill_engine``);
- ``prefill_at = decode`` (the CPU default, ``handoff.resolve_prefill_at``): decode and
  reasoning compute prompts in their own steps and this instance only passes the request on
  with an empty hand-off. Then it builds no engine and imports no torch: it would otherwise
  hold ~200 MiB (an interpreter with torch, an engine, a share of the weights) for nothing.
"""

from __future__ import annotations

import json
from typing import Any

from backend.serving import handoff
from backend.serving.crash_traces import enable_crash_traces
from backend.serving.parameters import instance_device, instance_parameters

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None


class PrefillModel:
    """Decides ``prefill_at`` from this instance's config, then computes or passes on."""

    def initialize(self, args: dict[str, Any]) -> None:
        enable_crash_traces()
        params = instance_parameters(args)
        self.prefill_at = handoff.resolve_prefill_at(
            params.get("prefill_at", "auto"),
            device=instance_device(args),
            prefill_backend=params.get("prefill_backend", "auto"),
            plain_wire=handoff.plain_wire(json.loads(args["model_config"])),
        )
        print(f"[prefill] prompts computed by {self.prefill_at}", flush=True)
        self.engine_model = None
        if self.prefill_at == "prefill":
            from backend.serving.prefill_engine import PrefillEngineModel

            self.engine_model = PrefillEngineModel()
            self.engine_model.initialize(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        if self.engine_model is not None:
            return self.engine_model.execute(requests)
        empty = handoff.empty_arrays()
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in empty.items()]) for _ in requests
        ]

    def finalize(self) -> None:
        if self.engine_model is not None:
            self.engine_model.finalize()
