"""Packed weights written once per machine and mapped read-only by every model instance.

Why: each Triton model instance is its own process, and each used to load the checkpoint,
fuse q/k/v and gate/up, quantize to int4 and keep its own copy of everything: with the
default server idle, prefill, decode and reasoning held about 1.75 GB of PSS between them
for a model whose bf16 weights are 270 MB, and the paper's 8B checkpoint would need a copy
of 16 GB per instance. Here the first process to need a (checkpoint, dtype, quantization,
kernel) combination writes every tensor the forward reads, already fused and packed
(``LlamaModel.runtime_tensors``), into one safetensors file in the cache; every process
then maps that file read-only (``np.memmap``), so the page cache holds the weights once
whatever the number of instances, pages a process never reads (the dense copies a decode
instance does not use) are never loaded, and a start does no packing at all.

Safety: the file name hashes the checkpoint's shards (names, sizes, modification times), the
dtype, the quantization, which int4 kernel packing and LM head format were used, and this
module's format version, so a changed checkpoint or machine gets a new file. The file is
written under an ``flock`` (released if the writer dies) to a temporary name and renamed
into place, so a reader sees a complete file or none. The mapping is read-only: a stray
in-place write to a weight is a crash, not a silent change shared by every instance.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from backend.locks import exclusive_lock
from backend.models.config import ModelConfig, safetensors_files
from backend.models.llama import LlamaModel

log = logging.getLogger(__name__)

FORMAT = 1
_DTYPES = {
    "BF16": (np.uint16, torch.bfloat16),
    "F16": (np.float16, torch.float16),
    "F32": (np.float32, torch.float32),
    "U8": (np.uint8, torch.uint8),
    "I8": (np.int8, torch.int8),
    "I32": (np.int32, torch.int32),
    "I64": (np.int64, torch.int64),
}


def packed_dir() -> Path:
    from backend.model_store import default_cache_dir

    return default_cache_dir() / "packed"


def packed_path(model_dir: Path, dtype: torch.dtype, quantization: str) -> Path:
    """Where the packed file of this checkpoint and setting lives (written or not)."""
    from backend.kernels import int4, native

    h = hashlib.sha256()
    for f in safetensors_files(model_dir):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    int4_packing = int4.prebuild() if quantization == "int4" else "none"
    head = (
        "int8" if quantization == "int4" and int4_packing == "bf16dp" and native.has("int8_mm") else "dense"
    )
    h.update(repr((FORMAT, str(dtype), quantization, int4_packing, head, torch.__version__)).encode())
    return packed_dir() / f"{Path(model_dir).name}-{h.hexdigest()[:16]}.safetensors"


def write(model: LlamaModel, path: Path, source: Path) -> None:
    """Writes ``model``'s runtime tensors to ``path`` atomically (temp file, then rename)."""
    from safetensors.torch import save_file

    tensors, meta = model.runtime_tensors()
    meta["source"] = str(Path(source).resolve())
    seen: dict[int, str] = {}
    flat: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():  # safetensors refuses shared storage: keep one of each
        if t.data_ptr() in seen:
            meta.setdefault("aliases", {})[name] = seen[t.data_ptr()]
            continue
        seen[t.data_ptr()] = name
        flat[name] = t.detach().contiguous().cpu()
    fd, tmp = tempfile.mkstemp(prefix=f".packing-{path.stem}-", dir=path.parent)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata={"multistream": json.dumps(meta)})
        os.chmod(tmp, 0o644)  # readable by every instance, whoever packed it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _header(path: Path) -> tuple[dict, dict, int]:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    return header, json.loads(header.pop("__metadata__")["multistream"]), n


def collect_garbage(folder: Path) -> list[Path]:
    """Removes packed files whose checkpoint folder no longer exists (temporary checkpoints
    of tests and tools would otherwise pile up); returns what it removed. A file that a live
    process is still writing is skipped: its lock is held."""
    removed = []
    for f in folder.glob("*.safetensors"):
        try:
            source = _header(f)[1].get("source")
        except (OSError, ValueError, KeyError, struct.error):
            continue
        if not source or Path(source).exists():
            continue
        lock = folder / f".{f.stem}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            f.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
            removed.append(f)
        finally:
            os.close(fd)
    return removed


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Maps a packed file read-only; every tensor is a view into the mapping (no copy)."""
    header, meta, n = _header(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    base = 8 + n
    tensors: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # read-only on purpose: torch warns that it cannot write through these tensors
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, info in header.items():
            np_dtype, torch_dtype = _DTYPES[info["dtype"]]
            lo, hi = info["data_offsets"]
            arr = mm[base + lo : base + hi]
            if (base + lo) % np.dtype(np_dtype).itemsize:  # never with safetensors' ordering
                arr = np.array(arr)
            t = torch.from_numpy(arr.view(np_dtype).reshape(info["shape"]))
            tensors[name] = t.view(torch_dtype) if t.dtype != torch_dtype else t
    for alias, target in meta.pop("aliases", {}).items():
        tensors[alias] = tensors[target]
    return tensors, meta


def _release_freed_memory() -> None:
    """Hands the heap the packing freed back to the OS (glibc keeps it otherwise), so the
    process that packed does not stay the size of an unpacked checkpoint while serving."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def load(model_dir: Path | str, dtype: torch.dtype, quantization: str) -> LlamaModel:
    """The CPU model of ``model_dir`` from its packed file, written first if this machine has none."""
    model_dir = Path(model_dir)
    path = packed_path(model_dir, dtype, quantization)
    if not path.is_file():
        with exclusive_lock(path.parent / f".{path.stem}.lock"):
            if not path.is_file():  # not written by the process we waited for
                for stale in path.parent.glob(f".packing-{path.stem}-*"):  # a killed writer's
                    stale.unlink(missing_ok=True)
                t0 = time.monotonic()
                model = LlamaModel.from_dir(model_dir, dtype=dtype).quantize(quantization)
                write(model, path, model_dir)
                log.info("packed %s into %s in %.1f s", model_dir, path, time.monotonic() - t0)
                del model
                _release_freed_memory()
        collect_garbage(path.parent)
    tensors, meta = read(path)
    return LlamaModel.from_runtime_tensors(ModelConfig.from_dir(model_dir), tensors, meta)
