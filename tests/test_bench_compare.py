"""``python -m bench.compare --quick`` end to end, on the cheap systems only.

Why a subprocess: the benchmark starts its own server and child processes and is meant to
be run as a command; this checks the command, the JSON it writes and the chart, not the
figures (which depend on the shared machine's load). llama-server and think-then-answer
are left out: the first takes minutes to build (``tests/test_llama_server.py`` runs it when
it is built), the second spends a reasoning budget per request.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.compare_common import Workload, percentile
from launcher.serve import DEFAULT_REPOSITORY, list_models

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 95) == 5.0
    assert percentile([], 50) is None


def test_each_worker_runs_several_requests_per_level() -> None:
    """A level is closed-loop steady state, not one wave of ``concurrency`` requests."""
    prompts = [f"prompt {i}" for i in range(12)]
    w = Workload(prompts=prompts, long_prompt="x", requests_per_worker=3)
    assert len(w.requests_at(16)) == 48
    assert len(w.requests_at(1)) == 12  # never fewer than the whole prompt set
    assert w.requests_at(16)[:12] == prompts and w.requests_at(16)[12] == prompts[0]
    assert len(Workload(prompts=prompts, long_prompt="x", requests_per_worker=1).requests_at(16)) == 16


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and value > 0


@pytest.mark.slow
@pytest.mark.server
def test_quick_compare_writes_json_and_chart(tmp_path: Path) -> None:
    if not list_models(DEFAULT_REPOSITORY):
        pytest.skip(f"{DEFAULT_REPOSITORY} has no models yet")
    out = tmp_path / "compare"
    cmd = [sys.executable, "-m", "bench.compare", "--quick", "--json", "--out", str(out)]
    cmd += ["--systems", "multistream,hf", "--concurrency", "1,2", "--max-tokens", "8", "--prompts", "2"]
    cmd += ["--reasoning-prompts", "1", "--reasoning-budget", "16", "--long-tokens", "128"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 1000

    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["threads"] >= 1
    assert machine["dtype"] and machine["versions"]["torch"]
    assert report["workload"]["concurrency"] == [1, 2]
    assert 100 <= report["workload"]["long_prompt_tokens"] <= 140

    for name in ("multistream", "hf"):
        system = report["systems"][name]
        assert system["available"], system.get("skipped")
        req = system["requests"]
        assert _positive(req["ttft_p50_s"]) and _positive(req["ttft_p95_s"]), req
        assert _positive(req["decode_tok_s_mean"]), req
        for level in ("1", "2"):
            assert _positive(system["aggregate"][level]["tok_s"]), system["aggregate"]
        assert _positive(system["long_prompt"]["ttft_s"])
        assert _positive(system["peak_rss_mib"])
    assert report["systems"]["hf"]["one_at_a_time"] is True
    reasoning = report["systems"]["multistream"]["with_reasoning"]
    assert _positive(reasoning["ttft_p50_s"])

    ratios = report["ratios"]
    assert _positive(ratios["aggregate_vs_hf"]["value"])
    assert ratios["aggregate_vs_hf"]["concurrency"] == 2
    # llama-server and think-then-answer were not run: their ratios are absent, not invented
    assert ratios["aggregate_vs_llama_server_at_2"]["value"] is None
    assert ratios["repeated_prefix_ttft_vs_llama_server"]["value"] is None
    assert ratios["reasoning_answer_ttft_speedup"]["value"] is None


def test_param_specs_become_server_parameters() -> None:
    """``--param MODEL.KEY=VALUE`` (repeatable, ``*`` = every model) merged with the prefix-cache
    switch of the throughput levels; a malformed spec names itself and the form."""
    from bench.compare import _server_parameters

    specs = ["prefill.prefill_at=decode", "decode.int4_prompts=true", "*.max_step_tokens=128"]
    assert _server_parameters(specs, prefix_cache=True) == {
        "prefill": {"prefill_at": "decode"},
        "decode": {"int4_prompts": "true"},
        "*": {"max_step_tokens": "128"},
    }
    off = _server_parameters(specs, prefix_cache=False)
    assert off["*"] == {"max_step_tokens": "128", "prefix_cache_mb": "0"}
    assert _server_parameters([], prefix_cache=True) is None
    for bad in ("prefill_at=decode", "prefill.prefill_at", ".x=1"):
        with pytest.raises(ValueError, match="expected MODEL.KEY=VALUE"):
            _server_parameters([bad], prefix_cache=True)
