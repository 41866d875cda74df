"""A LoRA adapter folder (``python -m train``'s output) merged into an ordinary checkpoint folder.

Why merge instead of running LoRA at serve time: the engine's forward is fused matmuls over
the checkpoint's weights (``backend.models.llama``); ``W + scale * B @ A`` folded in once
costs nothing per step, and the merged folder is a stream-trained checkpoint like the
paper's (``model.channel_embedding.weight``, ``num_channels`` in config.json), served by
the same code path. Reads peft's adapter format without importing peft (not a serving
dependency): ``adapter_config.json`` (``r``, ``lora_alpha``, ``use_rslora``) and
``adapter_model.safetensors`` (``base_model.model.<module>.lora_A.weight`` / ``lora_B``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

CHANNEL_EMBEDDING_KEY = "model.channel_embedding.weight"
CHANNEL_EMBEDDING_FILE = "channel_embedding.safetensors"
STREAM_CONFIG_FILE = "stream_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
#: Files of the base folder copied as they are.
_COPIED = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter folder that cannot be merged; the message names the file and the problem."""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path}: missing") from None
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: not valid JSON ({exc})") from None


def lora_scale(adapter_config: dict[str, Any]) -> float:
    """peft's scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    return alpha / math.sqrt(r) if adapter_config.get("use_rslora") else alpha / r


def merge_adapter(base_dir: Path | str, adapter_dir: Path | str, out_dir: Path | str) -> dict[str, Any]:
    """Writes ``base + adapter`` into ``out_dir`` (which must exist); returns a summary.

    ``out_dir`` gets ``model.safetensors`` (fp32, the channel embedding included),
    ``config.json`` (the base's plus ``num_channels`` and ``silence_token_id``) and the
    base's tokenizer files.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    acfg = _read_json(adapter_dir / ADAPTER_CONFIG_FILE)
    scfg = _read_json(adapter_dir / STREAM_CONFIG_FILE)
    if acfg.get("fan_in_fan_out"):
        raise AdapterError(f"{adapter_dir / ADAPTER_CONFIG_FILE}: fan_in_fan_out adapters are not supported")
    for key in ("r", "lora_alpha"):
        if key not in acfg:
            raise AdapterError(f"{adapter_dir / ADAPTER_CONFIG_FILE}: required key {key!r} is missing")
    scale = lora_scale(acfg)
    weights_path = adapter_dir / ADAPTER_WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"{weights_path}: missing")
    lora = load_file(str(weights_path))
    base_files = sorted(base_dir.glob("*.safetensors"))
    if len(base_files) != 1:
        raise AdapterError(
            f"{base_dir}: expected one model.safetensors, found {[f.name for f in base_files]}"
        )
    with safe_open(str(base_files[0]), framework="pt") as fh:
        state = {k: fh.get_tensor(k).float() for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__

    merged = 0
    for key, a in lora.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(_PREFIX) : -len(".lora_A.weight")] if key.startswith(_PREFIX) else None
        b = lora.get(key.replace(".lora_A.", ".lora_B."))
        if module is None or b is None or f"{module}.weight" not in state:
            raise AdapterError(f"{weights_path}: {key!r} does not match a weight of {base_files[0].name}")
        w = state[f"{module}.weight"]
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise AdapterError(
                f"{weights_path}: {key!r} is {tuple(b.shape)} x {tuple(a.shape)} for {tuple(w.shape)}"
            )
        state[f"{module}.weight"] = (w + scale * (b.float() @ a.float())).contiguous()
        merged += 1
    if not merged:
        raise AdapterError(f"{weights_path}: no lora_A/lora_B pairs")

    chan = load_file(str(adapter_dir / CHANNEL_EMBEDDING_FILE))[CHANNEL_EMBEDDING_KEY].float()
    num_channels = int(scfg["num_channels"])
    if chan.shape[0] != num_channels:
        raise AdapterError(
            f"{adapter_dir / CHANNEL_EMBEDDING_FILE}: {chan.shape[0]} rows, stream_config says {num_channels}"
        )
    state[CHANNEL_EMBEDDING_KEY] = chan.contiguous()
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    config = _read_json(base_dir / "config.json")
    config["num_channels"] = num_channels
    config["silence_token_id"] = int(scfg["silence_token_id"])
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in _COPIED:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out_dir / name)
    return {"merged_modules": merged, "scale": scale, "num_channels": num_channels}
