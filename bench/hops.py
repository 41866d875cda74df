"""Where a streamed token's time goes between the engine and the client: ``python -m bench.hops --json``.

Starts the default server with ``MULTISTREAM_HOP_TRACE`` (``backend.serving.hop_trace``), so
every decode request writes, per response, when the engine made the token, when decode's
request thread took it, and when ``response_sender.send`` started and returned; the client
(the project's gRPC client) stamps each response as it arrives. All stamps are
CLOCK_MONOTONIC, one clock for every process of the machine. Per answer token:

- ``engine_to_thread``: engine event -> decode's request thread (a ``queue.Queue`` hop);
- ``thread_to_send``: the request thread's own work before ``send`` (grouping, tensors);
- ``send_to_client``: ``send`` called -> the client library has the response: the Python
  backend's IPC into tritonserver, the ensemble, gRPC, the client's parsing;
- ``send_blocks``: how long ``send`` holds the request thread (the response can reach the
  client before ``send`` returns, so this overlaps the previous hop);
- ``total``: engine event -> client.

For 1 client and for ``--clients`` concurrent ones (default 16), p50 / p90 / mean in ms,
next to the client's inter-token gap (what one engine step plus the hops cost a stream).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HOPS = ("engine_to_thread", "thread_to_send", "send_to_client", "send_blocks", "total")
PROMPT = "Write a short story about a robot who learns to paint."


def _log(msg: str) -> None:
    print(f"[bench.hops {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_request(url: str, max_tokens: int) -> tuple[str | None, list[float]]:
    """(session id, client receive time of every answer response that carried tokens)."""
    from client import MultiStreamClient
    from client.events import Done, StreamDelta

    got: list[float] = []
    sid = None
    with MultiStreamClient(url, protocol="grpc") as c:
        for ev in c.generate(PROMPT, max_tokens=max_tokens, stream=True):
            if isinstance(ev, StreamDelta) and ev.stream == "output" and ev.token_ids:
                got.append(ev.t_received)
            elif isinstance(ev, Done):
                sid = ev.session_id
    return sid, got


def join(trace_dir: Path, sid: str, received: list[float]) -> list[dict[str, float]]:
    """One row of hop durations (ms) per answer response, server and client stamps zipped in order."""
    path = trace_dir / f"{sid}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    sent = [r for r in rows if r["stream"] == "output" and r["tokens"] and r["t_event"] is not None]
    out = []
    for r, t_client in zip(sent, received, strict=False):
        out.append(
            {
                "engine_to_thread": 1e3 * (r["t_dequeue"] - r["t_event"]),
                "thread_to_send": 1e3 * (r["t_send0"] - r["t_dequeue"]),
                "send_to_client": 1e3 * (t_client - r["t_send0"]),
                "send_blocks": 1e3 * (r["t_send1"] - r["t_send0"]),
                "total": 1e3 * (t_client - r["t_event"]),
            }
        )
    return out


def summary(rows: list[dict[str, float]], gaps: list[float]) -> dict[str, Any]:
    def stats(values: list[float]) -> dict[str, float]:
        v = sorted(values)
        if not v:
            return {}
        return {
            "p50_ms": round(v[len(v) // 2], 3),
            "p90_ms": round(v[int(len(v) * 0.9)], 3),
            "mean_ms": round(statistics.fmean(v), 3),
        }

    return {
        "tokens": len(rows),
        **{hop: stats([r[hop] for r in rows]) for hop in HOPS},
        "client_inter_token": stats(gaps),
    }


def run_level(url: str, trace_dir: Path, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    rows: list[dict[str, float]] = []
    gaps: list[float] = []
    lock = threading.Lock()
    todo = list(range(requests))

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            sid, received = one_request(url, max_tokens)
            time.sleep(0.2)  # the request's trace file is written as its loop ends
            joined = join(trace_dir, sid, received) if sid else []
            with lock:
                rows.extend(joined)
                gaps.extend(1e3 * (b - a) for a, b in zip(received, received[1:], strict=False))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"clients": clients, "requests": requests, **summary(rows, gaps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=4, help="sequential requests of the 1-client level")
    args = p.parse_args(argv)
    if abs(time.monotonic() - time.perf_counter()) > 0.01:
        _log("time.perf_counter is not CLOCK_MONOTONIC here: client and server stamps cannot be joined")
        return 2
    from launcher.serve import start_server

    trace_dir = Path(tempfile.mkdtemp(prefix="hop-trace-"))
    os.environ["MULTISTREAM_HOP_TRACE"] = str(trace_dir)
    report: dict[str, Any] = {
        "command": "python -m bench.hops " + " ".join(argv or sys.argv[1:]),
        "levels": [],
    }
    with start_server(model_dir="default", log_level="warning", max_sessions=max(16, args.clients)) as h:
        one_request(h.grpc_url, 4)  # warm-up
        _log("1 client ...")
        report["levels"].append(run_level(h.grpc_url, trace_dir, 1, args.requests, args.max_tokens))
        if args.clients > 1:
            _log(f"{args.clients} clients ...")
            report["levels"].append(
                run_level(h.grpc_url, trace_dir, args.clients, args.clients, args.max_tokens)
            )
    report["load_average"] = os.getloadavg()
    for lv in report["levels"]:
        _log(
            f"{lv['clients']} client(s), {lv['tokens']} tokens: "
            + ", ".join(f"{hop} p50 {lv[hop].get('p50_ms')} ms" for hop in HOPS)
            + f"; client inter-token p50 {lv['client_inter_token'].get('p50_ms')} ms"
        )
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
