"""What a checkpoint folder holds: the hyper-parameters the forward needs and its tensors.

Shared by every model family in ``backend.models``; the error messages name the file and
the key, because a user pointing ``--model-dir`` at the wrong folder only sees the message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import safe_open

if TYPE_CHECKING:  # imported where tensors are made: the config is read by torch-free processes too
    import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
#: Families whose attention normalises q and k per head (RMSNorm) before RoPE.
QK_NORM_FAMILIES = ("qwen3",)
#: Names under which a stream-trained checkpoint may carry its channel embedding.
CHANNEL_EMBEDDING_KEYS = (
    "channel_embedding.embedding.weight",
    "model.channel_embedding.embedding.weight",
    "model.channel_embedding.weight",
    "channel_embedding.weight",
)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelConfig:
    """The few hyper-parameters the forward needs, read from ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    architecture: str
    #: Per-head RMSNorm of q and k before RoPE (Qwen3).
    qk_norm: bool = False
    #: Channels of a stream-trained checkpoint (the paper's ``num_channels``); None otherwise.
    num_channels: int | None = None

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config.json") -> ModelConfig:
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        family = family_of(cfg, arch, source)
        rope_params = cfg.get("rope_parameters") or {}
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                # transformers >= 5 writes theta and scaling under ``rope_parameters``.
                rope_theta=float(cfg.get("rope_theta") or rope_params.get("rope_theta") or 10000.0),
                rope_scaling=cfg.get("rope_scaling") or rope_params or None,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
                architecture=arch,
                qk_norm=family in QK_NORM_FAMILIES,
                num_channels=int(cfg["num_channels"]) if cfg.get("num_channels") else None,
            )
        except KeyError as exc:
            raise CheckpointError(f"{source}: required key {exc.args[0]!r} is missing") from None

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        cfg_path = Path(path) / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(f"{cfg_path}: file not found (a model folder needs config.json)")
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({exc})") from None
        return cls.from_dict(cfg, str(cfg_path))


def family_of(cfg: dict, arch: str, source: str = "config.json") -> str:
    """The model family the forward runs (``llama``, ``qwen2``, ``qwen3``), or a clear error.

    Accepted: the stock architectures, and the paper's stream-trained classes (any
    ``architectures`` name, with ``num_channels`` in the config) whose ``model_type`` is a
    supported family. Refused with the reason: what this forward cannot compute.
    """
    model_type = str(cfg.get("model_type", "")).lower()
    if cfg.get("role_gating_enabled"):
        raise CheckpointError(f"{source}: role_gating_enabled: true is not supported (the paper's role gate)")
    if cfg.get("num_experts") or cfg.get("num_local_experts") or "moe" in model_type or "Moe" in arch:
        raise CheckpointError(f"{source}: mixture-of-experts checkpoints ({arch}) are not supported")
    layer_types = cfg.get("layer_types") or []
    if "linear_attention" in layer_types or model_type.startswith("qwen3_5") or "Qwen3_5" in arch:
        raise CheckpointError(
            f"{source}: {arch} mixes linear-attention (Gated DeltaNet) layers with attention layers; "
            "only full-attention decoders are supported"
        )
    stock = {
        "LlamaForCausalLM": "llama",
        "MistralForCausalLM": "llama",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
    }
    if arch in stock:
        return stock[arch]
    if cfg.get("num_channels") and model_type in ("llama", "mistral", "qwen2", "qwen3"):
        return {"mistral": "llama"}.get(model_type, model_type)
    raise CheckpointError(
        f"{source}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}, "
        "or a stream-trained class with num_channels and model_type llama / qwen2 / qwen3"
    )


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies with the checkpoint's theta and scaling (HF ``rope_type`` semantics)."""
    import torch

    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old_ctx / low, old_ctx / high
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind not in ("default", None):
        raise CheckpointError(f"config.json: rope_scaling type {kind!r} is not supported")
    return inv.float()


class TensorSource:
    """Reads tensors by name across one or more safetensors shards."""

    def __init__(self, files: list[Path]):
        self._where: dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    self._where[key] = f
        self._handles = {f: safe_open(str(f), framework="pt") for f in files}

    def has(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            shards = ", ".join(p.name for p in self._handles)
            raise CheckpointError(f"{shards}: tensor {name!r} is missing")
        return self._handles[self._where[name]].get_tensor(name)


def channel_embedding_rows(path: Path | str) -> int | None:
    """Rows of the checkpoint's learned channel embedding (under any of
    :data:`CHANNEL_EMBEDDING_KEYS`), or None for an ordinary checkpoint. Reads only the
    safetensors headers, so it is cheap enough for a process that never loads the weights."""
    for f in safetensors_files(Path(path)):
        with safe_open(str(f), framework="numpy") as fh:  # "pt" would import torch
            keys = set(fh.keys())
            for key in CHANNEL_EMBEDDING_KEYS:
                if key in keys:
                    return int(fh.get_slice(key).get_shape()[0])
    return None


def safetensors_files(path: Path) -> list[Path]:
    """The weight shards of a folder (``model.safetensors`` or an index of shards)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index}: lists shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weight file found")
    return files
