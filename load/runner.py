"""``python -m load``: run the locust load test headless and judge the result.

Why a wrapper around the ``locust`` command: it can start the server itself
(``launcher.serve.start_server``) when no ``--url`` is given, it fixes the file
layout (DIR/locust_*.csv, DIR/report.html), and it turns "any failed request
or no request at all" into a non-zero exit code that CI can use.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load", description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=4, help="concurrent simulated users")
    p.add_argument(
        "--spawn-rate", type=float, default=None, help="users started per second (default: --users)"
    )
    p.add_argument("--seconds", type=int, default=30, help="run time")
    p.add_argument("--out", type=Path, required=True, help="folder for locust_*.csv and report.html")
    p.add_argument("--url", default=None, help="gRPC host:port of a running server (else one is started)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--reasoning-streams", type=int, default=1)
    p.add_argument("--reasoning-budget", type=int, default=32)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument(
        "--stop-timeout", type=int, default=120, help="seconds users get to finish in-flight requests"
    )
    return p


@contextlib.contextmanager
def _server(url: str | None, users: int) -> Iterator[str]:
    if url:
        yield url
        return
    from launcher.serve import start_server  # only needed when we own the server

    print("starting tritonserver (launcher.serve.start_server) ...", flush=True)
    with start_server(max_sessions=max(8, users), log_level="warning") as srv:
        print(f"server ready at {srv.grpc_url}", flush=True)
        yield srv.grpc_url


def read_stats(csv_path: Path) -> dict[str, dict[str, float]]:
    """``{name: {"requests": n, "failures": n, "median_ms": x, "p95_ms": x}}`` from locust_stats.csv."""
    out: dict[str, dict[str, float]] = {}
    with csv_path.open(newline="") as f:
        for row in csv.DictReader(f):
            out[row["Name"]] = {
                "requests": float(row["Request Count"]),
                "failures": float(row["Failure Count"]),
                "median_ms": float(row.get("Median Response Time") or 0),
                "p95_ms": float(row.get("95%") or 0),
            }
    return out


def read_final_counts(json_path: Path) -> dict[str, tuple[int, int]]:
    """``{name: (requests, failures)}`` from locust's ``--json-file`` output, plus "Aggregated".

    Why not only the CSV: locust rewrites the CSV every second while running,
    so requests that finish during the stop phase can be missing from it; the
    JSON file is written once, at shutdown, from the final stats.
    """
    entries = json.loads(json_path.read_text())
    out: dict[str, tuple[int, int]] = {}
    for e in entries:
        req, fail = int(e.get("num_requests", 0)), int(e.get("num_failures", 0))
        prev = out.get(e["name"], (0, 0))
        out[e["name"]] = (prev[0] + req, prev[1] + fail)
    out["Aggregated"] = (sum(r for r, _ in out.values()), sum(f for _, f in out.values()))
    return out


def locust_command(args: argparse.Namespace, url: str) -> list[str]:
    rate = args.spawn_rate if args.spawn_rate is not None else args.users
    return [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless",
        "-u", str(args.users),
        "-r", str(rate),
        "-t", f"{args.seconds}s",
        "--host", url,
        "--csv", str(args.out / "locust"),
        "--html", str(args.out / "report.html"),
        "--json-file", str(args.out / "locust_stats"),
        "--stop-timeout", str(args.stop_timeout),
        "--only-summary",
        "--loglevel", "WARNING",
    ]  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.users < 1 or args.seconds < 1:
        print("error: --users and --seconds must be >= 1", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["MULTISTREAM_MAX_TOKENS"] = str(args.max_tokens)
    env["MULTISTREAM_REASONING_STREAMS"] = str(args.reasoning_streams)
    env["MULTISTREAM_REASONING_BUDGET"] = str(args.reasoning_budget)
    if args.temperature is not None:
        env["MULTISTREAM_TEMPERATURE"] = str(args.temperature)
    try:
        with _server(args.url, args.users) as url:
            env["MULTISTREAM_URL"] = url
            rc = subprocess.run(locust_command(args, url), env=env, cwd=REPO_ROOT).returncode
    except Exception as exc:  # noqa: BLE001 - server start failure: one clear line
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stats_path = args.out / "locust_stats.csv"
    if not stats_path.exists():
        print(f"error: locust wrote no {stats_path} (exit code {rc})", file=sys.stderr)
        return rc or 1
    stats = read_stats(stats_path)
    json_path = args.out / "locust_stats.json"
    if json_path.exists():
        for name, (req, fail) in read_final_counts(json_path).items():
            stats.setdefault(name, {"median_ms": 0.0, "p95_ms": 0.0})
            stats[name]["requests"], stats[name]["failures"] = float(req), float(fail)
    total = stats.get("Aggregated", {"requests": 0.0, "failures": 0.0})
    print(f"\n{'name':<16}{'requests':>10}{'failures':>10}{'median ms':>11}{'p95 ms':>10}")
    for name, s in stats.items():
        print(
            f"{name:<16}{s['requests']:>10.0f}{s['failures']:>10.0f}{s['median_ms']:>11.0f}{s['p95_ms']:>10.0f}"
        )
    print(f"CSV: {args.out}/locust_stats.csv  HTML: {args.out}/report.html")
    if total["requests"] == 0:
        print("FAIL: no requests completed", file=sys.stderr)
        return 1
    if total["failures"] > 0:
        fails = args.out / "locust_failures.csv"
        if fails.exists():
            print(fails.read_text(), file=sys.stderr)
        print(f"FAIL: {total['failures']:.0f} failed requests", file=sys.stderr)
        return 1
    return 0 if rc == 0 else rc
