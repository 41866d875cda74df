"""A JSON object carried as a ``[1, n]`` BF16 tensor between two models (BLS calls).

Why BF16: ``reasoning_wire``'s workaround 1. Any other output tensor of a decoupled BLS
response becomes a numpy array on a stub thread without the GIL and crashes the caller
under load; BF16 has no numpy representation, so nothing is built until the caller reads
the bytes on its own thread, through DLPack. Decode reads reasoning's deltas this way and
the ``tensorrt_llm_bls`` model reads decode's responses this way.

Reading needs no torch (:func:`decode` walks the DLPack struct with ctypes), because the BLS
model is otherwise a light process: torch would cost it ~135 MiB. Writing (:func:`encode`)
is done by decode and reasoning, which have torch loaded anyway.
"""

from __future__ import annotations

import ctypes
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

try:  # only inside the Triton python stub
    import triton_python_backend_utils as pb_utils
except ImportError:  # pragma: no cover
    pb_utils = None

#: The one output a BLS caller requests to get packets (config.pbtxt: TYPE_BF16, dims [-1]).
PACKET = "delta_packet"


def wants_packet(request: Any) -> bool:
    """Whether this request is a BLS call that asks for the packet alone.

    Exactly alone: a client that names no output is given every output of the config by
    Triton, the packet included, and must get the model's ordinary tensors (CONTRACTS).
    """
    try:
        return set(request.requested_output_names()) == {PACKET}
    except AttributeError:  # pragma: no cover - a request object without the method
        return False


def output(obj: Any) -> Any:
    """``obj`` as the ``delta_packet`` output tensor of a response."""
    return pb_utils.Tensor.from_dlpack(PACKET, encode(obj))


def encode(obj: Any) -> torch.Tensor:
    """``obj`` as compact UTF-8 JSON viewed as a ``[1, n]`` BF16 tensor (space-padded to an
    even length: JSON ignores trailing whitespace)."""
    import numpy as np
    import torch

    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(raw) % 2:
        raw += b" "
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).copy()).view(torch.bfloat16).reshape(1, -1)


def decode(packet: Any) -> Any:
    """Inverse of :func:`encode`: ``packet`` is anything with ``__dlpack__`` (a Triton
    ``pb_utils.Tensor``, a torch tensor) or a DLPack capsule."""
    if hasattr(packet, "to_dlpack"):  # pb_utils.Tensor
        capsule = packet.to_dlpack()
    elif hasattr(packet, "__dlpack__"):
        capsule = packet.__dlpack__()
    else:
        capsule = packet
    return json.loads(dlpack_bytes(capsule).decode("utf-8"))


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    """``DLTensor`` of dlpack.h; a ``DLManagedTensor`` starts with one."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_KDL_CPU, _KDL_CUDA_HOST = 1, 3
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def dlpack_bytes(capsule: Any) -> bytes:
    """A copy of the bytes of a contiguous host-memory DLPack tensor.

    The capsule is read, not consumed: it keeps its ``dltensor`` name, so its own destructor
    calls the producer's deleter when it is dropped (as for a capsule nobody imported).
    """
    t = _DLTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
    if t.device.device_type not in (_KDL_CPU, _KDL_CUDA_HOST):
        raise ValueError(
            f"packet: a tensor in host memory expected, got DLPack device type {t.device.device_type}"
        )
    shape = [t.shape[i] for i in range(t.ndim)]
    expected = 1
    for i in reversed(range(t.ndim)):
        if t.strides and shape[i] != 1 and t.strides[i] != expected:
            raise ValueError(f"packet: a contiguous tensor expected, got shape {shape}")
        expected *= shape[i]
    size = expected * t.dtype.lanes * ((t.dtype.bits + 7) // 8)
    return ctypes.string_at(t.data + t.byte_offset, size) if size else b""
