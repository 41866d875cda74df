"""``backend.models.packed``: weights packed once per machine, mapped read-only by every process."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from backend.engine.kv_cache import KVPool
from backend.models import LlamaModel, load_model, packed
from tests.engine_helpers import prompt_batch

REPO_ROOT = Path(__file__).resolve().parent.parent


def logits(model: LlamaModel, ids: list[int], decode_rows: bool) -> torch.Tensor:
    c = model.cfg
    pool = KVPool(c.num_layers, c.num_kv_heads, c.head_dim, 1, 64, torch.float32)
    batch = prompt_batch(ids, decode_rows)
    return model.forward(batch, pool.k, pool.v)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private folder for packed files (the built kernels stay in the machine's cache)."""
    folder = tmp_path / "packed"
    monkeypatch.setattr(packed, "packed_dir", lambda: folder)
    return folder


@pytest.mark.parametrize("dtype,quantization", [(torch.bfloat16, "int4"), (torch.float32, "none")])
def test_the_packed_model_computes_exactly_what_the_checkpoint_does(
    default_model_dir, cache, dtype, quantization
) -> None:
    ids = [1, 504, 3458, 314, 260, 7051, 3485, 47]
    direct = LlamaModel.from_dir(default_model_dir, dtype=dtype).quantize(quantization)
    mapped = load_model(default_model_dir, dtype, "cpu", quantization=quantization)
    assert len(list(cache.glob("*.safetensors"))) == 1
    for decode_rows in (False, True) if quantization == "int4" else (False,):
        assert torch.equal(logits(mapped, ids, decode_rows), logits(direct, ids, decode_rows))
    assert mapped.quantization == direct.quantization and mapped.int4_kernel == direct.int4_kernel
    assert mapped.lm_head is mapped.embed  # tied stays tied: one copy in the file


def test_weights_are_views_of_one_read_only_mapping(default_model_dir, cache) -> None:
    model = load_model(default_model_dir, torch.bfloat16, "cpu", quantization="int4")
    (path,) = cache.glob("*.safetensors")
    maps = [line for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(str(path))]
    assert maps and all(line.split()[1].startswith("r-") for line in maps), maps  # mapped, not writable
    lo_hi = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps]
    for t in (model.embed, model.layers[3].qkv, model.layers[3].q4["down"].dp[0], model.head_q8.packed):
        assert any(lo <= t.data_ptr() < hi for lo, hi in lo_hi), "a weight was copied out of the mapping"


def test_a_changed_checkpoint_gets_a_new_file(default_model_dir, cache, tmp_path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(default_model_dir, copy)
    first = packed.packed_path(copy, torch.float32, "none")
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert packed.packed_path(copy, torch.float32, "none") != first
    assert packed.packed_path(copy, torch.bfloat16, "none") != packed.packed_path(copy, torch.float32, "none")


def test_concurrent_first_starts_write_one_file_and_skip_a_killed_writers_leftovers(
    default_model_dir, cache
) -> None:
    target = packed.packed_path(default_model_dir, torch.float32, "none")
    cache.mkdir(parents=True)
    leftover = cache / f".packing-{target.stem}-dead"
    leftover.write_bytes(b"half a file")
    script = textwrap.dedent(
        f"""
        import torch
        from pathlib import Path
        from backend.models import load_model, packed
        packed.packed_dir = lambda: Path({str(cache)!r})
        m = load_model({str(default_model_dir)!r}, torch.float32, "cpu", quantization="none")
        print(float(m.final_norm.float().sum()))
        """
    )
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0] == outs[1]
    assert [
        p.name for p in cache.iterdir() if not p.name.startswith(".") or p.name.startswith(".packing")
    ] == [target.name]
    assert not leftover.exists()


def test_files_of_deleted_checkpoints_are_collected(default_model_dir, cache, tmp_path) -> None:
    """Temporary checkpoints (tests, tools) must not leave their packed files behind forever."""
    gone = tmp_path / "temporary-model"
    shutil.copytree(default_model_dir, gone)
    load_model(gone, torch.float32, "cpu", quantization="none")
    (old,) = cache.glob("temporary-model-*.safetensors")
    shutil.rmtree(gone)
    load_model(default_model_dir, torch.float32, "cpu", quantization="none")  # writes, then collects
    assert not old.exists()
    assert [p.name.split("-")[0] for p in cache.glob("*.safetensors")] == ["SmolLM2"]
