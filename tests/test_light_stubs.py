"""The models that only validate and route requests load without torch.

Why: preprocessing, ``tensorrt_llm_bls`` and ``session_control`` are Triton stubs of their
own; torch costs each ~130 MiB of private memory (``bench.memory``), a fifth of the default
server's. An eager ``import torch`` anywhere on their import path brings it back silently,
so each entry point is imported in a fresh interpreter and torch must be absent.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("model", ["preprocessing", "tensorrt_llm_bls", "session_control"])
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
