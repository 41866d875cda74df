"""The prefill -> decode / reasoning hand-off through DLPack: GPU tensors, BF16 on the wire.

Why a helper beside ``backend.serving.handoff``: on CPU the hand-off is FP32 numpy arrays
(exact, tested, unchanged). On a GPU that path would copy the prompt's KV device -> host ->
shared memory -> host -> device for every request, in FP32 (twice the bytes of a bf16
engine's KV). Here the tensors go out through ``pb_utils.Tensor.from_dlpack`` where they
are (the GPU), in the dtype the model config declares; Triton moves GPU tensors between
stubs through its CUDA memory pool (``--cuda-memory-pool-byte-size``), and a receiver
whose config sets ``FORCE_CPU_ONLY_INPUT_TENSORS: no`` gets them on the GPU.

What decides the wire: the ``data_type`` of ``prompt_kv`` / ``prompt_logits`` in this
model's own config.pbtxt (``launcher.gpu.render_handoff`` writes ``TYPE_BF16`` for a GPU
deployment with a bf16 engine). So both ends read the same declaration, and the CPU
default (``TYPE_FP32``, CPU tensors) never reaches this module's DLPack path.

BF16 is exact for a bf16 engine (its KV *is* bf16); ``prompt_logits`` stay FP32 (the
engine computes logits in fp32, and they are small). The receiver copies the KV onto its
engine's device (a request's tensors are not ours once it ends) and the logits to the host,
where the engine samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from backend.engine import PrefixKV
from backend.serving import handoff

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

#: Triton data types the hand-off may declare, and the torch dtype each one carries.
WIRE_DTYPES = {"TYPE_FP32": torch.float32, "TYPE_BF16": torch.bfloat16, "TYPE_FP16": torch.float16}


@dataclass(frozen=True)
class Wire:
    """How this process sends / expects the hand-off tensors."""

    kv: torch.dtype = torch.float32
    logits: torch.dtype = torch.float32
    #: The engine's device: where received KV goes.
    device: torch.device = torch.device("cpu")

    @property
    def plain(self) -> bool:
        """FP32 on both tensors: the numpy path of ``backend.serving.handoff`` applies on CPU."""
        return self.kv == torch.float32 and self.logits == torch.float32


_WIRE = Wire()


def declared_wire(model_config: dict[str, Any], device: str | torch.device = "cpu") -> Wire:
    """The wire ``model_config`` (Triton's JSON of config.pbtxt) declares for the hand-off.

    prefill declares the tensors as outputs, decode and reasoning as inputs; a model that
    declares neither (preprocessing, session_control) gets the FP32 default.
    """
    found: dict[str, torch.dtype] = {}
    for name, data_type in handoff.declared_types(model_config).items():
        if data_type not in WIRE_DTYPES:
            raise ValueError(
                f"{name}: data_type {data_type} is not a hand-off type; use one of {sorted(WIRE_DTYPES)}"
            )
        found[name] = WIRE_DTYPES[data_type]
    return Wire(
        kv=found.get("prompt_kv", torch.float32),
        logits=found.get("prompt_logits", torch.float32),
        device=torch.device(device),
    )


def configure(model_config: dict[str, Any], device: str | torch.device) -> Wire:
    """Records this instance's wire (one model per stub process); called at initialize."""
    global _WIRE
    _WIRE = declared_wire(model_config, device)
    return _WIRE


def current() -> Wire:
    return _WIRE


def uses_dlpack(prefix: PrefixKV, wire: Wire | None = None) -> bool:
    """Whether ``prefix`` goes out through DLPack: it lives on a GPU, or the wire is not FP32."""
    wire = wire or _WIRE
    return prefix.kv.device.type != "cpu" or not wire.plain


def to_wire(prefix: PrefixKV, wire: Wire | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt_kv`` ``[1, layers, 2, kv_heads, P, head_dim]`` and ``prompt_logits``
    ``[1, k * vocab]`` in the wire's dtypes, on the prefix's device, contiguous."""
    wire = wire or _WIRE
    kv = prefix.kv.to(wire.kv).unsqueeze(0).contiguous()
    logits = prefix.logits.to(wire.logits).reshape(1, -1).contiguous()
    _settle(kv)
    return kv, logits


def _settle(t: torch.Tensor) -> None:
    """Waits for the kernels that wrote ``t``: Triton reads (and later reuses) DLPack memory
    on its own streams, which know nothing of ours."""
    if t.device.type == "cuda":
        torch.cuda.current_stream(t.device).synchronize()


def from_wire(kv: torch.Tensor, logits: torch.Tensor, vocab_size: int, wire: Wire | None = None) -> PrefixKV:
    """Inverse of :func:`to_wire`, as owned tensors: KV on the engine's device (its dtype
    is kept: the pool converts on import), logits in fp32 on the host."""
    wire = wire or _WIRE
    kv = kv.reshape(kv.shape[-5:]).to(wire.device, copy=True)
    flat = logits.reshape(-1).to("cpu", torch.float32, copy=True)
    _settle(kv)  # our copy is done before Triton may reuse the request's buffer
    if flat.numel() == 0 or flat.numel() % vocab_size:
        raise ValueError(
            f"prompt_logits has {flat.numel()} values, not a multiple of the vocabulary ({vocab_size})"
        )
    return PrefixKV(kv=kv, logits=flat.reshape(-1, vocab_size))


def to_tensors(prefix: PrefixKV) -> list[Any]:
    """The hand-off as ``pb_utils.Tensor`` outputs, through DLPack (no host copy on a GPU)."""
    kv, logits = to_wire(prefix)
    return [
        pb_utils.Tensor.from_dlpack("prompt_kv", torch.utils.dlpack.to_dlpack(kv)),
        pb_utils.Tensor.from_dlpack("prompt_logits", torch.utils.dlpack.to_dlpack(logits)),
    ]


def from_request(request: Any, vocab_size: int) -> PrefixKV | None:
    """The hand-off of a decode / reasoning request read through DLPack, or None when it is
    the plain FP32 host case (``backend.serving.handoff.from_arrays`` reads that one)."""
    kv_t = pb_utils.get_input_tensor_by_name(request, "prompt_kv")
    logits_t = pb_utils.get_input_tensor_by_name(request, "prompt_logits")
    if kv_t is None or logits_t is None:
        return None
    if _WIRE.plain and kv_t.is_cpu() and logits_t.is_cpu():
        return None
    return from_wire(
        torch.utils.dlpack.from_dlpack(kv_t.to_dlpack()),
        torch.utils.dlpack.from_dlpack(logits_t.to_dlpack()),
        vocab_size,
    )


__all__ = [
    "WIRE_DTYPES",
    "Wire",
    "configure",
    "current",
    "declared_wire",
    "from_request",
    "from_wire",
    "to_tensors",
    "to_wire",
    "uses_dlpack",
]
