"""What a training run ships: an adapter folder that ``backend.adapter`` merges into a checkpoint.

The folder is peft's own format (``adapter_config.json`` + ``adapter_model.safetensors``, so
``peft.PeftModel.from_pretrained`` loads it too), plus the two things peft knows nothing of:
``channel_embedding.safetensors`` (``model.channel_embedding.weight`` [C, hidden]) and
``stream_config.json`` (``num_channels``, the silence token, how it was trained).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from backend.adapter import CHANNEL_EMBEDDING_FILE, CHANNEL_EMBEDDING_KEY, STREAM_CONFIG_FILE
from train.model import StreamModel


def export_adapter(model: StreamModel, out: Path | str, silence_token_id: int, info: dict[str, Any]) -> Path:
    """Writes the adapter folder ``out`` and returns it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.lm.save_pretrained(str(out))
    save_file(
        {CHANNEL_EMBEDDING_KEY: model.channel_embedding.detach().float().contiguous()},
        str(out / CHANNEL_EMBEDDING_FILE),
        metadata={"format": "pt"},
    )
    cfg = {"num_channels": model.num_channels, "silence_token_id": silence_token_id, **info}
    (out / STREAM_CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    # peft writes a README model card full of placeholders: not ours to ship
    (out / "README.md").unlink(missing_ok=True)
    return out
