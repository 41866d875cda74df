"""``python -m bench.soak --minutes 10 --rate 0.5 --json``: a steady-rate locust soak.

Why: leaks (a thread per cancelled session, KV slots never freed, metric buffers that grow)
do not show in a 20 s load test; they show as memory that climbs over minutes at a steady
request rate. This runs the project's locust user (``load/locustfile.py``) at a fixed
arrival rate (``constant_pacing``) against a server it starts (or ``--url``), samples the
RSS of the whole server process tree (tritonserver + every Python stub) while it runs, and
reports requests, failures, p50/p99 TTFT of the answer, and RSS at start and end.

Pass: zero failed requests and memory flat (end RSS within ``--max-growth`` of start, after
a warm-up). A benchmark, not part of the test suite: it runs for minutes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from load.runner import LOCUSTFILE, REPO_ROOT, read_final_counts

PROMPT = "Name three uses of copper."


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and its descendants (MiB), from /proc: the server and its stubs."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stat = (proc / "stat").read_text()
                ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total / 2**20


def rss_by_process_mb(pid: int) -> dict[str, float]:
    """RSS (MiB) of tritonserver and of each stub (by instance name): who grows, if anything."""
    from launcher.serve import python_stubs

    out: dict[str, float] = {}
    for name, p in {"tritonserver": pid, **python_stubs(pid)}.items():
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[name] = round(int(line.split()[1]) / 1024, 1)
        except OSError:
            pass
    return out


def percentiles(csv_path: Path, name: str) -> dict[str, float]:
    """p50/p99 (ms) and count of one locust request name from locust_stats.csv."""
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Name"] == name:
                return {
                    "count": float(row["Request Count"]),
                    "p50_ms": float(row.get("50%") or 0),
                    "p99_ms": float(row.get("99%") or 0),
                }
    return {"count": 0.0, "p50_ms": 0.0, "p99_ms": 0.0}


def warm_up(url: str, concurrency: int, rounds: int = 3) -> None:
    """Concurrent requests first, so start RSS includes torch's one-off buffers for batched
    steps (measured: +10% RSS in the first 30 s without this; that is not a leak)."""
    from concurrent.futures import ThreadPoolExecutor

    from client import MultiStreamClient

    with MultiStreamClient(url, idle_timeout_s=120) as client, ThreadPoolExecutor(concurrency) as pool:
        for _ in range(rounds):
            list(
                pool.map(
                    lambda _: client.generate(
                        PROMPT, max_tokens=32, reasoning_streams=1, reasoning_budget=32
                    ).result(),
                    range(concurrency),
                )
            )


def run(args: argparse.Namespace, url: str, server_pid: int | None) -> dict[str, Any]:
    out = Path(args.out or tempfile.mkdtemp(prefix="soak-"))
    out.mkdir(parents=True, exist_ok=True)
    warm_up(url, args.users)
    pacing = args.users / args.rate
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(
        MULTISTREAM_URL=url,
        MULTISTREAM_PACING_S=f"{pacing:.3f}",
        MULTISTREAM_MAX_TOKENS=str(args.max_tokens),
        MULTISTREAM_REASONING_STREAMS=str(args.reasoning_streams),
        MULTISTREAM_REASONING_BUDGET=str(args.reasoning_budget),
    )
    seconds = int(args.minutes * 60)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(args.users), "-r", str(args.users), "-t", f"{seconds}s", "--host", url,
        "--csv", str(out / "locust"), "--json-file", str(out / "locust_stats"),
        "--stop-timeout", "120", "--only-summary", "--loglevel", "WARNING",
    ]  # fmt: skip
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.is_set():
            if server_pid:
                samples.append((time.monotonic() - t0, tree_rss_mb(server_pid)))
            stop.wait(args.sample_s)

    rss_start = tree_rss_mb(server_pid) if server_pid else math.nan
    by_process_start = rss_by_process_mb(server_pid) if server_pid else {}
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    rc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.DEVNULL).returncode
    wall = time.monotonic() - t0
    stop.set()
    sampler.join()
    time.sleep(2)  # let the last sessions end before the final RSS
    rss_end = tree_rss_mb(server_pid) if server_pid else math.nan
    by_process_end = rss_by_process_mb(server_pid) if server_pid else {}
    counts = read_final_counts(out / "locust_stats.json")
    full = counts.get("full_response", (0, 0))
    ttft = percentiles(out / "locust_stats.csv", "ttft_output")
    # Flat memory: compare the mean of the last quarter with the mean of the first quarter
    # of the samples (single samples are noisy), and end vs start.
    q = max(1, len(samples) // 4)
    first = sum(r for _, r in samples[:q]) / q if samples else math.nan
    last = sum(r for _, r in samples[-q:]) / q if samples else math.nan
    growth = (rss_end - rss_start) / rss_start if server_pid else math.nan
    steady_growth = (last - first) / first if server_pid and samples else math.nan
    return {
        "minutes": args.minutes,
        "rate_per_s": args.rate,
        "users": args.users,
        "pacing_s": round(pacing, 3),
        "wall_s": round(wall, 1),
        "requests": full[0],
        "failures": full[1],
        "all_failures": counts.get("Aggregated", (0, 0))[1],
        "achieved_rate_per_s": round(full[0] / wall, 3) if wall else 0.0,
        "ttft_output_p50_ms": ttft["p50_ms"],
        "ttft_output_p99_ms": ttft["p99_ms"],
        "rss_start_mb": round(rss_start, 1),
        "rss_end_mb": round(rss_end, 1),
        "rss_max_mb": round(max((r for _, r in samples), default=math.nan), 1),
        "rss_first_quarter_mb": round(first, 1),
        "rss_last_quarter_mb": round(last, 1),
        "rss_growth": round(growth, 4),
        "rss_growth_first_to_last_quarter": round(steady_growth, 4),
        # Flat: the last quarter of the run holds no more than max_growth over the first.
        "memory_flat": bool(steady_growth <= args.max_growth) if server_pid else None,
        "rss_by_process_start_mb": by_process_start,
        "rss_by_process_end_mb": by_process_end,
        "rss_series_mb": [[round(t), round(r)] for t, r in samples],
        "locust_rc": rc,
        "out": str(out),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=0.5, help="requests per second (steady)")
    p.add_argument("--users", type=int, default=2, help="locust users sharing the rate")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reasoning-streams", type=int, default=1)
    p.add_argument("--reasoning-budget", type=int, default=32)
    p.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth, fraction of start")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument("--url", default=None, help="gRPC host:port of a running server (RSS then not measured)")
    p.add_argument("--out", default=None, help="folder for locust's CSV/JSON (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    if args.rate <= 0 or args.users < 1 or args.minutes <= 0:
        p.error("--rate, --users and --minutes must be positive")
    if args.url:
        result = run(args, args.url, None)
    else:
        from launcher.serve import start_server

        with start_server(max_sessions=8, max_context=1024, log_level="warning") as srv:
            result = run(args, srv.grpc_url, srv.process.pid)
            result["server_alive"] = srv.alive()
            result["dead_stubs"] = srv.dead_stubs()
    ok = result["failures"] == 0 and result["all_failures"] == 0 and result["requests"] > 0
    ok = ok and result["memory_flat"] is not False and not result.get("dead_stubs")
    result["pass"] = ok
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
