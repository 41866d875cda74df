"""Reads back the ``parameters`` that the launcher renders into every config.pbtxt.

Why a module of its own: the Triton stubs need this at run time (model dir, dtype, threads,
...), and runtime code must not import the launcher (``launcher.deploy_config`` writes these
parameters; this only reads them). Inside ``model.py``::

    params = model_parameters(json.loads(args["model_config"]))
    threads = int(params.get("threads", "1")); model_dir = params["model_dir"]
"""

from __future__ import annotations

import json
from typing import Any

#: Default of the ``max_queued`` parameter: sessions an engine instance lets wait for a KV slot
#: before it answers "server busy" (read by ``instance.engine_config``; the launcher sizes
#: Triton's python thread pool with it).
DEFAULT_MAX_QUEUED = 16


def model_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """``{key: string_value}`` from a parsed Triton model config (``json.loads(args["model_config"])``).

    Triton hands every parameter over as ``{"string_value": ...}``; a model without a
    ``parameters`` section gets an empty dict rather than an error.
    """
    return {k: v.get("string_value", "") for k, v in (model_config.get("parameters") or {}).items()}


def instance_parameters(args: dict[str, Any]) -> dict[str, str]:
    """The string ``parameters`` of this model's config (``args`` of ``initialize``)."""
    return model_parameters(json.loads(args["model_config"]))


def instance_device(args: dict[str, Any]) -> str:
    """``cuda:N`` for a ``KIND_GPU`` instance when CUDA is usable, else ``cpu`` (torch is
    imported only for a GPU instance: a CPU ``prefill`` that passes prompts on has none)."""
    kind = str(args.get("model_instance_kind", "CPU")).upper()
    if kind != "GPU":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(args.get('model_instance_device_id', 0) or 0)}"
    return "cpu"


def parse_auto_bool(name: str, value: str | None) -> bool | None:
    """A tri-state parameter: ``auto`` (or empty) -> None, ``true`` / ``false`` -> bool.

    ``ValueError`` names the parameter and the values it takes: a typo in a deployment's
    config must stop the model from loading, not silently pick the default.
    """
    text = (value or "auto").strip().lower()
    if text == "auto":
        return None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"parameter {name} must be auto, true or false, got {value!r}")
