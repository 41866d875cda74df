"""What a GPU deployment decides from the rendered repository (``python -m launcher.gpu``).

Three decisions, all read from the rendered ``config.pbtxt`` files, so the container's
entrypoint (``docker/entrypoint.sh``) and the repository can never disagree:

- **MPS**: every Triton Python instance is its own process, and kernels of different
  processes do not run at the same time on one GPU unless NVIDIA MPS runs. So when the
  repository places more than one ``KIND_GPU`` instance on some GPU, the entrypoint starts
  ``nvidia-cuda-mps-control -d`` before tritonserver (:func:`plan`).
- **The CUDA memory pool**: Triton moves GPU tensors between a stub and the server through
  a per-GPU pool (``--cuda-memory-pool-byte-size``, 64 MiB by default). The prefill ->
  decode hand-off (``backend.serving.gpu_handoff``) is one prompt's KV: sized here for
  ``max_context`` tokens times the hand-offs that can be in flight (:func:`handoff_bytes`).
- **The hand-off wire**: ``prompt_kv`` is BF16 on a GPU deployment with a bf16 engine
  (exact: the KV is bf16) and FP32 otherwise; decode and reasoning on a GPU take their
  inputs where they are (``FORCE_CPU_ONLY_INPUT_TENSORS: no``). :func:`render_handoff` writes
  both into each config.pbtxt while ``launcher.serve`` renders it.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from launcher.deploy_config import HEAVY_MODELS, DeployConfig, _top_level_blocks, is_ensemble

#: Models that receive the hand-off and so must accept GPU inputs.
HANDOFF_RECEIVERS = ("decode", "reasoning")
#: Triton's own default pool size, the floor of ours.
DEFAULT_POOL_BYTES = 64 << 20
_MIB = 1 << 20


# ---------------------------------------------------------------------- rendering
def handoff_type(cfg: DeployConfig, kind: str) -> str:
    """``TYPE_BF16`` or ``TYPE_FP32`` for ``prompt_kv`` under ``cfg.handoff_dtype``."""
    setting = (cfg.handoff_dtype or "auto").lower()
    if setting in ("float32", "fp32"):
        return "TYPE_FP32"
    if setting in ("bfloat16", "bf16"):
        return "TYPE_BF16"
    if setting != "auto":
        raise ValueError(f"handoff_dtype must be auto, float32 or bfloat16, not {cfg.handoff_dtype!r}")
    bf16_engine = (cfg.dtype or "auto").lower() in ("auto", "bfloat16", "bf16")
    return "TYPE_BF16" if kind == "KIND_GPU" and bf16_engine else "TYPE_FP32"


def handoff_params(model: str, kind: str) -> dict[str, str]:
    """Extra parameters for ``model``: a GPU receiver takes its inputs on the GPU."""
    if kind == "KIND_GPU" and model in HANDOFF_RECEIVERS:
        return {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
    return {}


_KV_DECL = re.compile(r'(name\s*:\s*"prompt_kv"\s+data_type\s*:\s*)(TYPE_\w+)')


def render_handoff(pbtxt: str, model: str, wire_type: str) -> str:
    """``pbtxt`` with ``prompt_kv`` declared as ``wire_type`` (heavy models only)."""
    if model not in HEAVY_MODELS or is_ensemble(pbtxt):
        return pbtxt
    text, n = _KV_DECL.subn(lambda m: m.group(1) + wire_type, pbtxt)
    if n == 0 and "prompt_kv" in pbtxt:
        raise ValueError(
            f"{model}/config.pbtxt: prompt_kv is declared in a form launcher.gpu does not recognise "
            '(expected `name: "prompt_kv" data_type: TYPE_...`)'
        )
    return text


# ---------------------------------------------------------------------- reading a rendered repository
@dataclass
class Group:
    """One ``instance_group`` entry."""

    count: int
    kind: str
    gpus: list[int] | None = None


@dataclass
class ModelPlan:
    name: str
    groups: list[Group]
    params: dict[str, str]
    max_batch_size: int
    kv_type: str | None


@dataclass
class Plan:
    """The GPU decisions for one rendered repository on ``gpus`` GPUs."""

    gpus: int
    instances_per_gpu: dict[int, int]
    mps: bool
    pool_bytes: int
    handoff_bytes: int
    models: dict[str, ModelPlan] = field(default_factory=dict)

    def tritonserver_args(self) -> list[str]:
        return [f"--cuda-memory-pool-byte-size={g}:{self.pool_bytes}" for g in range(self.gpus)]

    def as_dict(self) -> dict:
        return {
            "gpus": self.gpus,
            "instances_per_gpu": self.instances_per_gpu,
            "mps": self.mps,
            "cuda_memory_pool_byte_size": self.pool_bytes,
            "handoff_bytes": self.handoff_bytes,
            "tritonserver_args": self.tritonserver_args(),
        }


_ENTRY = re.compile(r"\{([^{}]*)\}")
_PARAM = re.compile(r'key\s*:\s*"([^"]*)"\s*value\s*:?\s*\{\s*string_value\s*:\s*"((?:[^"\\]|\\.)*)"\s*\}')


def _groups(pbtxt: str) -> list[Group]:
    groups = []
    for start, end in _top_level_blocks(pbtxt, "instance_group"):
        for entry in _ENTRY.findall(pbtxt[start:end]):
            count = re.search(r"count\s*:\s*(\d+)", entry)
            kind = re.search(r"kind\s*:\s*(KIND_\w+)", entry)
            gpus = re.search(r"gpus\s*:\s*\[([^\]]*)\]", entry)
            groups.append(
                Group(
                    count=int(count.group(1)) if count else 1,
                    kind=kind.group(1) if kind else "KIND_AUTO",
                    gpus=[int(g) for g in re.findall(r"\d+", gpus.group(1))] if gpus else None,
                )
            )
    return groups


def read_model(path: Path) -> ModelPlan:
    text = path.read_text(encoding="utf-8")
    mbs = re.search(r"max_batch_size\s*:\s*(\d+)", text)
    kv = _KV_DECL.search(text)
    return ModelPlan(
        name=path.parent.name,
        groups=_groups(text),
        params={k: v for k, v in _PARAM.findall(text)},
        max_batch_size=int(mbs.group(1)) if mbs else 0,
        kv_type=kv.group(2) if kv else None,
    )


def read_repository(repo: Path) -> dict[str, ModelPlan]:
    models = {}
    for cfg in sorted(Path(repo).glob("*/config.pbtxt")):
        if not is_ensemble(cfg.read_text(encoding="utf-8")):
            models[cfg.parent.name] = read_model(cfg)
    return models


def instances_per_gpu(models: dict[str, ModelPlan], gpus: int) -> dict[int, int]:
    """Python stub processes per GPU: a ``KIND_GPU`` group without ``gpus`` puts ``count``
    instances on *every* GPU (Triton's rule); with ``gpus``, on each GPU listed."""
    per = dict.fromkeys(range(gpus), 0)
    for m in models.values():
        for g in m.groups:
            if g.kind != "KIND_GPU":
                continue
            for gpu in g.gpus if g.gpus is not None else range(gpus):
                per[gpu] = per.get(gpu, 0) + g.count
    return per


def handoff_bytes(models: dict[str, ModelPlan]) -> int:
    """Bytes of one prefill -> decode hand-off at ``max_context`` tokens (0 if unknown)."""
    prefill = models.get("prefill")
    if prefill is None or not prefill.params.get("model_dir"):
        return 0
    model_dir = Path(prefill.params["model_dir"])
    try:
        cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
        max_context = int(prefill.params.get("max_context", "2048"))
    except (OSError, ValueError, KeyError, TypeError):  # the model's own loader says what is wrong
        return 0
    elem = 2 if prefill.kv_type in ("TYPE_BF16", "TYPE_FP16") else 4
    return layers * 2 * kv_heads * head_dim * max_context * elem + vocab * 4


def plan(repo: Path, gpus: int) -> Plan:
    """MPS or not, and the pool size, for the rendered repository ``repo`` on ``gpus`` GPUs.

    Hand-offs in flight: every prefill instance's whole batch (its outputs wait in the pool
    until decode takes them), plus one per decode instance (what it forwards to reasoning).
    """
    models = read_repository(repo)
    per = instances_per_gpu(models, gpus)
    one = handoff_bytes(models)
    count = {name: sum(g.count for g in m.groups) for name, m in models.items()}
    prefill_batch = max(1, models["prefill"].max_batch_size) if "prefill" in models else 1
    in_flight = count.get("prefill", 1) * prefill_batch + count.get("decode", 1)
    pool = max(DEFAULT_POOL_BYTES, one * in_flight)
    pool = -(-pool // (16 * _MIB)) * (16 * _MIB)
    return Plan(
        gpus=gpus,
        instances_per_gpu=per,
        mps=any(n > 1 for n in per.values()),
        pool_bytes=pool,
        handoff_bytes=one,
        models=models,
    )


def visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: no GPU
        return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("repository", help="a rendered model repository (python -m launcher --render-only DIR)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to plan for (default: the ones torch sees)")
    p.add_argument("--format", choices=("json", "env"), default="json", help="env: shell assignments")
    args = p.parse_args(argv)
    result = plan(Path(args.repository), visible_gpus() if args.gpus is None else args.gpus)
    if args.format == "env":
        print(f"MPS_NEEDED={int(result.mps)}")
        print(f"POOL_ARGS={shlex.quote(' '.join(result.tritonserver_args()))}")
        print(f"INSTANCES_PER_GPU={shlex.quote(json.dumps(result.instances_per_gpu))}")
    else:
        print(json.dumps(result.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
