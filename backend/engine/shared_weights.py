"""Weights once per device: the first instance loads them, the others map the same memory.

Why: every Triton Python instance is its own process, and each prefill, decode and
reasoning instance loaded its own copy of the checkpoint (three copies of an 8B model are
48 GB of GPU memory). Here the first instance on a device takes a lock file, loads the
weights and publishes a manifest; every later instance on that device maps the owner's
tensors instead of loading:

- CUDA: CUDA IPC handles of the owner's tensors (``torch.multiprocessing``'s own
  reduction, the mechanism ``torch.multiprocessing`` queues use, written to a file instead
  of a pipe). The owner must outlive the others; it does, as every instance lives as long
  as the server. An instance whose owner died (its pid is gone) loads its own copy.
- CPU: one file of raw tensor bytes that every instance ``mmap``s shared, so the pages
  exist once. Serving keeps CPU instances on their own copies (their engine thread must be
  the one that loads, ``Engine.from_model_dir``); ``bench.gpu_check --device cpu`` uses it
  to measure the same protocol without a GPU.

The model object is rebuilt from the flat ``{name: tensor}`` view (:func:`model_tensors`,
:func:`rebuild`), which is also how a model moves between devices (:func:`to_device`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import io
import json
import os
import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from backend.models.config import ModelConfig
from backend.models.llama import LayerWeights, LlamaModel

#: Manifest format; an attaching instance refuses another version and loads its own copy.
MANIFEST_VERSION = 1
#: How long a later instance waits for the owner to publish (s): loading an 8B model from a
#: cold disk takes minutes.
ATTACH_TIMEOUT_S = 900.0
_ALIGN = 64
#: Lock files of the weights this process owns: closing one would let another process take
#: ownership while our tensors are still what the manifest points to.
_HELD: list[Any] = []


# ---------------------------------------------------------------------- flat view of a model
def model_tensors(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Every weight tensor of ``model`` by a stable name (tied heads appear once, as ``embed``).

    Quantized copies (``LayerWeights.q4``) are not weights of the checkpoint: an instance
    that attaches builds its own.
    """
    out: dict[str, torch.Tensor] = {"embed": model.embed, "final_norm": model.final_norm}
    if model.lm_head is not model.embed:
        out["lm_head"] = model.lm_head
    if model.channel_embedding is not None:
        out["channel_embedding"] = model.channel_embedding
    for i, layer in enumerate(model.layers):
        for f in dataclasses.fields(layer):
            value = getattr(layer, f.name)
            if isinstance(value, torch.Tensor):
                out[f"layers.{i}.{f.name}"] = value
    return out


def rebuild(
    cfg: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device | str, dtype: torch.dtype
) -> LlamaModel:
    """A :class:`LlamaModel` over ``tensors`` (not copied): the inverse of :func:`model_tensors`."""
    layers = []
    for i in range(cfg.num_layers):
        prefix = f"layers.{i}."
        kwargs: dict[str, Any] = {f.name: None for f in dataclasses.fields(LayerWeights)}
        kwargs.update({name[len(prefix) :]: t for name, t in tensors.items() if name.startswith(prefix)})
        layers.append(LayerWeights(**kwargs))
    embed = tensors["embed"]
    return LlamaModel(
        cfg,
        embed,
        layers,
        tensors["final_norm"],
        tensors.get("lm_head", embed),
        tensors.get("channel_embedding"),
        torch.device(device),
        dtype,
    )


def to_device(model: LlamaModel, device: torch.device | str, dtype: torch.dtype | None = None) -> LlamaModel:
    """A copy of ``model``'s weights on ``device`` (in ``dtype``); ties stay ties."""
    dtype = dtype or model.dtype
    moved = {name: t.to(device=device, dtype=dtype) for name, t in model_tensors(model).items()}
    return rebuild(model.cfg, moved, device, dtype)


# ---------------------------------------------------------------------- transports
def _publish_cuda(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    from torch.multiprocessing.reductions import reduce_tensor

    return {name: reduce_tensor(t) for name, t in tensors.items()}


def _attach_cuda(handles: dict[str, Any], _path: Path) -> dict[str, torch.Tensor]:
    return {name: rebuild_fn(*args) for name, (rebuild_fn, args) in handles.items()}


def _publish_file(tensors: dict[str, torch.Tensor], path: Path) -> dict[str, Any]:
    """Writes every tensor's bytes into ``path`` (aligned); returns where each one lies."""
    layout: dict[str, Any] = {}
    offset = 0
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        for name, t in tensors.items():
            raw = t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes()
            pad = (-offset) % _ALIGN
            f.write(b"\0" * pad)
            offset += pad
            layout[name] = {
                "offset": offset,
                "nbytes": len(raw),
                "dtype": str(t.dtype),
                "shape": list(t.shape),
            }
            f.write(raw)
            offset += len(raw)
    os.replace(tmp, path)
    return {"file": str(path), "size": offset, "tensors": layout}


def _attach_file(handles: dict[str, Any], _path: Path) -> dict[str, torch.Tensor]:
    size = int(handles["size"])
    flat = torch.from_file(handles["file"], shared=True, size=max(size, 1), dtype=torch.uint8)
    out = {}
    for name, spec in handles["tensors"].items():
        dtype = getattr(torch, spec["dtype"].removeprefix("torch."))
        raw = flat[spec["offset"] : spec["offset"] + spec["nbytes"]]
        out[name] = raw.view(dtype).view(spec["shape"])
    return out


# ---------------------------------------------------------------------- the protocol
@dataclasses.dataclass
class Shared:
    """What :meth:`WeightShare.load` returns."""

    model: LlamaModel
    #: ``owner`` (loaded and published), ``attached`` (maps the owner's memory) or ``own copy``
    #: (sharing impossible: the reason is in :attr:`note`).
    role: str
    note: str = ""


def share_key(model_dir: str | Path, dtype: torch.dtype, device: torch.device | str) -> str:
    """One key per (checkpoint, dtype, physical device): instances that may share."""
    device = torch.device(device)
    ident = str(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        ident = str(getattr(props, "uuid", "")) or f"cuda:{device.index}"
    text = json.dumps([str(Path(model_dir).resolve()), str(dtype), ident])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WeightShare:
    """Owner election and manifest exchange in ``root`` for one :func:`share_key`."""

    def __init__(self, root: str | Path, key: str, timeout_s: float = ATTACH_TIMEOUT_S, poll_s: float = 0.05):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = key
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.lock_path = self.root / f"{key}.lock"
        self.manifest_path = self.root / f"{key}.manifest"
        self.data_path = self.root / f"{key}.bin"

    def _try_lock(self) -> Any | None:
        fh = open(self.lock_path, "a+")  # noqa: SIM115 - held for the process lifetime
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None
            raise
        return fh

    def load(self, loader: Callable[[], LlamaModel]) -> Shared:
        """The model: published by us (first on the device), mapped from the owner, or loaded.

        ``loader`` loads the checkpoint the usual way; it runs in the owner, and in any
        instance that cannot attach (owner died, timed out, transport failed).
        """
        deadline = time.monotonic() + self.timeout_s
        while True:
            lock = self._try_lock()
            if lock is not None:
                return self._own(lock, loader)
            manifest = self._read_manifest()
            if manifest is not None:
                try:
                    return Shared(self._attach(manifest), "attached")
                except Exception as exc:  # noqa: BLE001 - any failure: fall back to our own copy
                    return Shared(loader(), "own copy", f"attaching failed: {type(exc).__name__}: {exc}")
            if time.monotonic() > deadline:
                return Shared(
                    loader(), "own copy", f"no manifest from the owner after {self.timeout_s:.0f} s"
                )
            time.sleep(self.poll_s)

    def _own(self, lock: Any, loader: Callable[[], LlamaModel]) -> Shared:
        with contextlib.suppress(FileNotFoundError):
            self.manifest_path.unlink()  # a dead owner's: its handles are dangling
        model = loader()
        tensors = model_tensors(model)
        cuda = model.device.type == "cuda"
        if cuda:
            handles = _publish_cuda(tensors)
        else:
            handles = _publish_file(tensors, self.data_path)
            # Map our own copy to the file too, so the pages exist once, not twice.
            model = _with_tensors(model, _attach_file(handles, self.data_path))
        manifest = {
            "version": MANIFEST_VERSION,
            "pid": os.getpid(),
            "transport": "cuda_ipc" if cuda else "file",
            "cfg": dataclasses.asdict(model.cfg),
            "dtype": str(model.dtype),
            "device": str(model.device),
            "handles": handles,
        }
        buf = io.BytesIO()
        pickle.dump(manifest, buf)
        tmp = self.manifest_path.with_name(self.manifest_path.name + f".{os.getpid()}.tmp")
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, self.manifest_path)
        _HELD.append((lock, model, tensors))
        return Shared(model, "owner")

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            manifest = pickle.loads(self.manifest_path.read_bytes())
        except (FileNotFoundError, EOFError, pickle.UnpicklingError):
            return None
        if manifest.get("version") != MANIFEST_VERSION or not _pid_alive(int(manifest.get("pid", -1))):
            return None
        return manifest

    def _attach(self, manifest: dict[str, Any]) -> LlamaModel:
        attach = _attach_cuda if manifest["transport"] == "cuda_ipc" else _attach_file
        tensors = attach(manifest["handles"], self.data_path)
        cfg = ModelConfig(**manifest["cfg"])
        dtype = getattr(torch, manifest["dtype"].removeprefix("torch."))
        return rebuild(cfg, tensors, manifest["device"], dtype)


def _with_tensors(model: LlamaModel, tensors: dict[str, torch.Tensor]) -> LlamaModel:
    return rebuild(model.cfg, tensors, model.device, model.dtype)


def engine_with_shared_weights(model_dir: str | Path, config: Any, root: str | Path) -> Any:
    """An :class:`~backend.engine.Engine` whose weights are shared with the device's other
    instances (first one loads, the others attach); ``engine.weights_role`` says which."""
    from backend.engine.config import resolve_dtype, resolve_quantization
    from backend.engine.engine import Engine
    from backend.model_store import validate_model_dir
    from backend.models import load_model
    from backend.tokenizer import Tokenizer

    model_dir = Path(model_dir)
    validate_model_dir(model_dir)
    dtype = resolve_dtype(config.dtype, config.device, config.quantization)
    share = WeightShare(root, share_key(model_dir, dtype, config.device))
    shared = share.load(lambda: load_model(model_dir, dtype=dtype, device=config.device))
    shared.model.quantize(resolve_quantization(config.quantization, shared.model.device, shared.model.dtype))
    engine = Engine(shared.model, Tokenizer.from_dir(model_dir), config)
    engine.weights_role = shared.role
    print(
        f"[weights] {shared.role} ({model_dir.name}, {config.device}){': ' + shared.note if shared.note else ''}",
        flush=True,
    )
    return engine


def weights_root(model_repository: str | None = None) -> Path:
    """Where lock files and manifests live: the run directory, else one per repository
    (the same rule as the session mailboxes, ``backend.serving.session_control``)."""
    run_dir = os.environ.get("MULTISTREAM_RUN_DIR")
    if run_dir:
        return Path(run_dir) / "weights"
    import tempfile

    repo = Path(model_repository).resolve().parent if model_repository else Path.cwd()
    digest = hashlib.sha1(str(repo).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"multistream-weights-{digest}"


def sharing_wanted(setting: str, device: str | torch.device) -> bool:
    """The ``share_weights`` model parameter: ``auto`` (on for CUDA), ``on`` or ``off``."""
    setting = (setting or "auto").lower()
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"share_weights must be auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and torch.device(device).type == "cuda")


__all__ = [
    "Shared",
    "engine_with_shared_weights",
    "WeightShare",
    "model_tensors",
    "rebuild",
    "share_key",
    "sharing_wanted",
    "to_device",
    "weights_root",
]
