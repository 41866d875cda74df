"""The prefill -> decode / reasoning hand-off: a prefix's KV and last-row logits on the wire.

Why one module: both ends of the hand-off must agree on names, dtypes and shapes, and
before this module they were spread over ``prefill.py``, ``tensors.prompt_state`` and the
engine. The engine side is :meth:`Engine.prefill_export` -> :class:`PrefixKV` ->
``Engine.submit(prefix_kv=...)``; this module only moves a :class:`PrefixKV` through
Triton tensors:

- ``prompt_kv``: ``[1, layers, 2, kv_heads, P, head_dim]`` FP32 (the leading 1 is the
  ensemble's batch dim). FP32 is exact for bf16 and fp32 engines; the cost of the copy is
  measured in ``bench/serving.py``.
- ``prompt_logits``: ``[1, k * vocab]`` FP32, the k entries of the prefix's last row
  flattened (k = 1 for a prompt, C for a grid row of the paper's layout). Flat because
  the config declares ``dims: [ -1 ]``; the receiver knows its vocabulary size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from backend.engine.session import Prefix
from backend.serving.request import RequestConfig
from backend.serving.tensors import input_array

if TYPE_CHECKING:  # torch where tensors are made: a prefill that passes prompts on has none
    from backend.engine import PrefixKV

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

#: The two tensors of the hand-off, in the order the ensemble maps them.
HANDOFF_INPUTS = ("prompt_kv", "prompt_logits")

#: Where prompts are computed (the prefill model's parameter ``prefill_at``).
PREFILL_AT = ("prefill", "decode")


def resolve_prefill_at(
    setting: str, *, device: str, prefill_backend: str = "auto", plain_wire: bool = True
) -> str:
    """``decode`` (the default on CPU deployments: this instance hands over nothing; decode
    and reasoning compute the prompt in their own steps, between the rows of running
    sessions, as llama-server's continuous batching does) or ``prefill`` (this instance
    computes the prompt and hands its KV over: the default on GPU, where TensorRT-LLM or the
    device hand-off needs the split).

    Why decode on a CPU: a separate prefill process competes with decode's thread team for a
    few shared cores, prompts queue behind it under load, and every prompt's KV crosses a
    process boundary. Measured with ``bench.compare`` on 2 cores (AVX-512, int4 prompts,
    docs/benchmarks.md run 10): 101.8 / 155.6 / 134.9 tok/s at 1 / 4 / 16 clients against
    70.7 / 102.1 / 122.9 with ``prefill``, answer TTFT p50 at 16 clients 0.76 s against 2.70 s,
    a repeated 512-token prefix 0.070 s against 0.229 s, 1.2 GB less memory; on an AVX2-only
    machine (run 9) it lost at 1 and 4 clients (1.09x / 1.13x llama-server against 1.22x /
    1.37x) and won at 16, on TTFT and on the repeated prefix.
    """
    setting = (setting or "auto").lower()
    if setting not in (*PREFILL_AT, "auto"):
        raise ValueError(f"prefill_at must be one of auto, {', '.join(PREFILL_AT)}, got {setting!r}")
    gpu = str(device).startswith("cuda")
    trtllm = (prefill_backend or "auto").lower() == "trtllm"
    if setting == "auto":
        return "prefill" if gpu or trtllm or not plain_wire else "decode"
    if setting == "decode":
        if trtllm:
            raise ValueError("prefill_at=decode leaves nothing for prefill_backend=trtllm to compute")
        if not plain_wire or gpu:
            raise ValueError("prefill_at=decode is for CPU deployments (the FP32 host hand-off wire)")
    return setting


def declared_types(model_config: dict[str, Any]) -> dict[str, str]:
    """The Triton ``data_type`` this model's config declares for each hand-off tensor
    (prefill as outputs, decode and reasoning as inputs; the first declaration wins)."""
    found: dict[str, str] = {}
    for section in ("output", "input"):
        for entry in model_config.get(section, []) or []:
            name = entry.get("name")
            if name in HANDOFF_INPUTS and name not in found:
                found[name] = str(entry.get("data_type", "TYPE_FP32"))
    return found


def plain_wire(model_config: dict[str, Any]) -> bool:
    """FP32 on both hand-off tensors: the host numpy path (``gpu_handoff.Wire.plain``)."""
    return all(t == "TYPE_FP32" for t in declared_types(model_config).values())


def empty_arrays() -> dict[str, np.ndarray]:
    """The hand-off of ``prefill_at=decode``: no KV, no logits (decode computes the prompt)."""
    return {
        "prompt_kv": np.zeros((1, 0, 0, 0, 0, 0), dtype=np.float32),
        "prompt_logits": np.zeros((1, 0), dtype=np.float32),
    }


def prefix_of(ids: list[int], cfg: RequestConfig) -> Prefix:
    """The rows ``input_ids`` stand for: a prompt (one token per row) or, in the paper's
    layout, whole grid rows of ``cfg.num_channels`` tokens. prefill and decode both read it
    from here, so the KV one computes is the KV the other expects."""
    if cfg.layout == "paper":
        c = cfg.num_channels
        if not ids or len(ids) % c:
            raise ValueError(f"input_ids: {len(ids)} tokens are not whole rows of {c} channels")
        return Prefix.grid([ids[i : i + c] for i in range(0, len(ids), c)])
    return Prefix.prompt(ids)


def to_arrays(prefix: PrefixKV) -> dict[str, np.ndarray]:
    """The hand-off tensors of ``prefix`` as numpy arrays (with the batch dim)."""
    return {
        "prompt_kv": prefix.kv.float().cpu().numpy()[None],
        "prompt_logits": prefix.logits.float().cpu().reshape(1, -1).numpy().astype(np.float32),
    }


def to_tensors(prefix: PrefixKV) -> list[Any]:
    """The hand-off as ``pb_utils.Tensor`` outputs of ``prefill`` (GPU / BF16: ``gpu_handoff``)."""
    from backend.serving import gpu_handoff

    if gpu_handoff.uses_dlpack(prefix):
        return gpu_handoff.to_tensors(prefix)
    return [pb_utils.Tensor(name, arr) for name, arr in to_arrays(prefix).items()]


def from_arrays(kv: np.ndarray | None, logits: np.ndarray | None, vocab_size: int) -> PrefixKV | None:
    """Inverse of :func:`to_arrays`, as owned tensors; None for :func:`empty_arrays`.

    Copies: a request's shared-memory buffers are not ours once ``execute`` returns, and the
    engine keeps the prefix until the session is admitted.
    """
    if kv is None or logits is None:
        raise ValueError("prompt_kv / prompt_logits are missing (the prefill -> decode hand-off)")
    if kv.size == 0 and logits.size == 0:
        return None  # prefill_at=decode: the receiving engine computes the prompt itself
    import torch

    from backend.engine import PrefixKV

    kv_t = torch.from_numpy(np.ascontiguousarray(kv.reshape(kv.shape[-5:]), dtype=np.float32).copy())
    flat = np.ascontiguousarray(logits.reshape(-1), dtype=np.float32).copy()
    if flat.size == 0 or flat.size % vocab_size:
        raise ValueError(
            f"prompt_logits has {flat.size} values, not a multiple of the vocabulary ({vocab_size})"
        )
    return PrefixKV(kv=kv_t, logits=torch.from_numpy(flat).reshape(-1, vocab_size))


def from_request(request: Any, vocab_size: int) -> PrefixKV | None:
    """The :class:`PrefixKV` that ``prefill`` sent, read from a decode / reasoning request;
    None when prefill handed the prompt over to be computed here (``prefill_at=decode``)."""
    from backend.serving import gpu_handoff

    prefix = gpu_handoff.from_request(request, vocab_size)  # GPU / BF16 tensors, else None
    if prefix is not None:
        return prefix
    return from_arrays(input_array(request, "prompt_kv"), input_array(request, "prompt_logits"), vocab_size)
