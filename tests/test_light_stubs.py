"""The models that only validate and route requests load without torch.

Why: preprocessing, ``tensorrt_llm_bls``, ``session_control`` and, where prompts are
computed in decode (the CPU default), ``prefill`` are Triton stubs of their own; torch costs
each ~135 MiB (``bench.memory``, PSS), a fifth of the default server's. An eager
``import torch`` anywhere on their import path brings it back silently, so each entry point
is imported in a fresh interpreter, and the running default server's stubs are checked.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


LIGHT = ("preprocessing", "tensorrt_llm_bls", "session_control", "prefill")


@pytest.mark.parametrize("model", LIGHT)
def test_a_light_model_imports_no_torch(model: str) -> None:
    entry = ROOT / "model_repository" / model / "1" / "model.py"
    code = (
        "import runpy, sys\n"
        f"runpy.run_path({str(entry)!r})\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(len(loaded))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split()[-1] == "0", f"{model} imports torch"


def test_the_default_server_runs_its_light_stubs_without_torch(triton_server) -> None:
    """On the default (CPU) server prefill passes prompts on, so no light stub maps libtorch;
    decode, which computes, does (the check can fail)."""
    stubs = triton_server.stubs()
    mapped = {name: "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text() for name, pid in stubs.items()}
    light = {name: m for name, m in mapped.items() if name.startswith(LIGHT)}
    assert light and not any(light.values()), mapped
    assert all(m for name, m in mapped.items() if name.startswith("decode")), mapped
