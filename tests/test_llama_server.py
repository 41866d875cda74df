"""``bench.llama_server`` and system (d) of ``bench.compare``: llama.cpp's own server as the peer.

The build options are checked without building. The end-to-end test runs the real
``llama-server`` (code nobody here wrote) through ``bench.compare`` when this machine has
built it, and skips with the reason otherwise: the build takes several minutes on 2 cores,
more than a test may spend (``python -m bench.llama_server build`` or a full
``python -m bench.compare`` builds it once).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import llama_server as ls
from bench.compare_common import repeated_prefix_prompts

REPO_ROOT = Path(__file__).resolve().parent.parent
SAPPHIRE_RAPIDS = {
    "avx",
    "avx2",
    "fma",
    "f16c",
    "bmi2",
    "avx512f",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
}


def test_build_names_instruction_sets_and_never_amx() -> None:
    """These VMs advertise AMX and trap on it: the build must not use it even when advertised."""
    opts = ls.cmake_options(SAPPHIRE_RAPIDS)
    assert opts["GGML_NATIVE"] == "OFF"
    assert opts["GGML_AVX512"] == "ON" and opts["GGML_AVX512_BF16"] == "ON" and opts["GGML_AVX2"] == "ON"
    assert all(opts[k] == "OFF" for k in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"))
    assert opts["GGML_AVX512_VNNI"] == "OFF"  # not in the flags given
    assert opts["LLAMA_USE_PREBUILT_UI"] == "OFF"  # nothing is fetched during the build
    assert ls.cmake_options({"avx2"})["GGML_AVX512"] == "OFF"


def test_server_args_turn_the_prompt_cache_off_and_on(tmp_path: Path) -> None:
    off = ls.LlamaServerConfig(model=tmp_path / "m.gguf", threads=2, parallel=16).serving_args()
    assert "--no-cache-prompt" in off and off[off.index("--cache-ram") + 1] == "0"
    assert off[off.index("-np") + 1] == "16" and "--cont-batching" in off and "--jinja" in off
    on = ls.LlamaServerConfig(model=tmp_path / "m.gguf", prompt_cache=True).serving_args()
    assert "--cache-prompt" in on and "--no-cache-prompt" not in on


def test_repeated_prefix_prompts_share_the_passage_and_differ_in_the_question() -> None:
    long_prompt = (
        "passage " * 50 + "\n\nSummarize the disagreement in three sentences and propose one fair next step."
    )
    prompts = repeated_prefix_prompts(long_prompt, 4)
    assert len(set(prompts)) == 4
    assert all(p.startswith("passage " * 50) for p in prompts)


@pytest.mark.slow
@pytest.mark.server
def test_quick_compare_drives_a_real_llama_server(tmp_path: Path) -> None:
    if ls.find_binary() is None:
        pytest.skip("llama-server is not built here (python -m bench.llama_server build, several minutes)")
    out = tmp_path / "compare"
    cmd = [sys.executable, "-m", "bench.compare", "--quick", "--json", "--out", str(out)]
    cmd += ["--systems", "llama_server", "--concurrency", "1,2", "--max-tokens", "8", "--prompts", "2"]
    cmd += ["--long-tokens", "128", "--prefix-requests", "3"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    system = report["systems"]["llama_server"]
    assert system["available"], system.get("skipped")
    # the same prompts: llama-server's own count of the ids it rendered from our text
    # equals the project's templated prompt lengths
    assert system["prompt_tokens"] == report["workload"]["prompt_tokens"]
    assert system["long_prompt"]["prompt_tokens"] == report["workload"]["long_prompt_tokens"]
    for level in ("1", "2"):
        agg = system["aggregate"][level]
        assert agg["tok_s"] > 0 and agg["output_tokens"] > 0, agg
    assert system["requests"]["ttft_p50_s"] > 0
    prefix = system["repeated_prefix"]
    assert prefix["requests"] == 3 and prefix["ttft_p50_s"] > 0
    assert "--no-cache-prompt" in system["info"]["args"]
    assert system["peak_rss_mib"] > 0
