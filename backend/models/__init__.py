"""Model code: decoder families written directly in torch, shaped for packed multi-stream rows.

``load_model`` picks the family from ``config.json``; each family turns a checkpoint folder
into weights plus a forward over a :class:`~backend.models.inputs.PackedBatch`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from backend.lazy import lazy_exports
from backend.models.config import CheckpointError, ModelConfig

if TYPE_CHECKING:
    import torch

    from backend.models.inputs import PackedBatch, PackedSplit
    from backend.models.llama import LlamaModel

__getattr__ = lazy_exports(
    __name__, {"PackedBatch": "inputs", "PackedSplit": "inputs", "LlamaModel": "llama"}
)

__all__ = ["CheckpointError", "LlamaModel", "ModelConfig", "PackedBatch", "PackedSplit", "load_model"]


def load_model(
    path: Path | str, dtype: torch.dtype, device: str | torch.device = "cpu", quantization: str | None = None
) -> LlamaModel:
    """The model of a checkpoint folder, in ``dtype`` on ``device``.

    With ``quantization`` (``int4`` / ``none``) on CPU, the weights come already fused and
    packed from the machine's packed file (``backend.models.packed``), mapped read-only and
    shared by every process; without it, or with ``MULTISTREAM_PACKED_WEIGHTS=0`` (a cache
    folder that cannot be written, or ``bench.memory``'s comparison), the checkpoint is read
    into this process.
    """
    import torch

    from backend.models.llama import LlamaModel

    packed_ok = os.environ.get("MULTISTREAM_PACKED_WEIGHTS", "1") != "0"
    if quantization is not None and packed_ok and torch.device(device).type == "cpu":
        from backend.models import packed

        return packed.load(path, dtype, quantization)
    model = LlamaModel.from_dir(path, dtype=dtype, device=device)
    return model.quantize(quantization) if quantization is not None else model
