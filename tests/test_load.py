"""``python -m load`` against the real server: 4 users for 20 s must complete requests with no failure."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_load_runner(triton_server, tmp_path):
    out = tmp_path / "load"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "load",
            "--users",
            "4",
            "--seconds",
            "20",
            "--url",
            triton_server.grpc_url,
            "--out",
            str(out),
            "--max-tokens",
            "16",
            "--reasoning-budget",
            "16",
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = out / "locust_stats.csv"
    assert stats.exists() and (out / "report.html").exists()
    rows = {r["Name"]: r for r in csv.DictReader(stats.open())}
    assert int(rows["Aggregated"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert int(rows["full_response"]["Request Count"]) > 0 and int(rows["ttft_output"]["Request Count"]) > 0
    # Concurrent reasoning through BLS is what crashed decode stubs (reasoning_wire.py).
    assert not triton_server.dead_stubs(), triton_server.log_tail(80)


def test_engine_stubs_run_the_off_gil_check(triton_server):
    """The guard against Triton's off-GIL allocations (tests/support/gil_check.c) is really on."""
    so = os.environ.get("MULTISTREAM_GIL_CHECK")
    if not so:
        pytest.skip("no C compiler here: the stubs run without the off-GIL check")
    stubs = {
        n: p
        for n, p in triton_server.stubs().items()
        if n.startswith(("decode", "reasoning", "prefill", "tensorrt_llm_bls"))
    }
    assert stubs
    for name, pid in stubs.items():
        assert so in Path(f"/proc/{pid}/maps").read_text(), f"{name} has not loaded {so}"


def test_bench_reasoning_burst_runs(triton_server, capsys):
    """``bench.reasoning_burst`` (the deadlock's reproduction, docs/reliability.md) completes
    requests with reasoning streams and reads the server's heartbeats: a short, light run
    must finish with no error, no stall and no stale heartbeat."""
    import json

    from bench import reasoning_burst

    reasoning_burst.main(
        [
            "--grpc", triton_server.grpc_url, "--clients", "2", "--seconds", "3",
            "--max-tokens", "8", "--run-dir", str(triton_server.run_dir), "--json",
        ]
    )  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert got["completed"] >= 2 and got["errors"] == 0 and got["stalls"] == 0, got
    assert got["stale_heartbeats"] == [] and got["hung"] is False, got
