"""``python -m bench.cancel_probe --json``: do hung-up clients stop costing anything?

The probe of issue 14: N clients each ask for ``--max-tokens`` (900) tokens, read one response
and then hang up; we time how long each session keeps running on the server. It is run through
every entry point a user can reach:

- ``ensemble-grpc-cancel``: the ``multistream`` ensemble over gRPC, the stream cancelled
  (``stop_stream(cancel_requests=True)``), no ``session_control`` call;
- ``ensemble-http-disconnect``: ``generate_stream`` on the ensemble, the connection closed;
- ``bls-grpc-cancel`` / ``bls-http-disconnect``: the same against ``tensorrt_llm_bls``;
- ``openai-disconnect``: the OpenAI front (``python -m frontend``), the connection closed.

"Running" is asked of the server itself: each client, right after its hang-up, asks
``session_control`` (action ``status``) every 10 ms until it answers that the session is not
running (its decode loop has unregistered it, after the engine freed the KV). A session still running after ``--give-up-s`` counts as leaked. The
engine's step time (the answer's inter-token gap, measured on one ordinary request first) is
the yardstick: "freed within one engine step" of the hang-up, plus the cancel's own polling.

With ``--trace DIR`` (the ``MULTISTREAM_HOP_TRACE`` folder the server and the front were
started with, ``backend.serving.hop_trace.cancel_hop``) the answer also says where the time
went, hop by hop, in ms after the hang-up: ``bls_seen`` (the BLS watcher saw
``is_cancelled()``), ``front_seen`` (the front saw the disconnect), ``mailbox_posted``,
``decode_read`` (decode had handed the cancel to the engine), ``engine_ended`` (the engine
ended the session at a step boundary), ``unregistered`` (decode let the session go: ``status``
says so from then on); and, counted from the engine's own token times, how many engine steps
each session still ran after its hang-up and after decode read the cancel (one answer token
per step), which a loaded machine does not blur the way it blurs milliseconds.

Needs a running server (``--grpc``, ``--http``) and, for the front, ``--openai``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import queue
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

PROMPT = "Write a very long story about a lighthouse keeper, with many chapters."


def _inputs(module: Any, sid: str, max_tokens: int) -> list[Any]:
    vals = {
        "text_input": (np.array([[PROMPT.encode()]], dtype=np.object_), "BYTES"),
        "max_tokens": (np.array([[max_tokens]], dtype=np.int32), "INT32"),
        "stream": (np.array([[True]], dtype=bool), "BOOL"),
        "session_id": (np.array([[sid.encode()]], dtype=np.object_), "BYTES"),
        "temperature": (np.array([[0.8]], dtype=np.float32), "FP32"),  # no early EOS by chance
    }
    out = []
    for name, (arr, dtype) in vals.items():
        t = module.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        out.append(t)
    return out


class Status:
    """``session_control`` action ``status``: is the session still running?"""

    def __init__(self, grpc_url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.m = grpcclient
        self.c = grpcclient.InferenceServerClient(grpc_url)
        batched = self.c.get_model_config("session_control").config.max_batch_size > 0
        self.shape = [1, 1] if batched else [1]

    def running(self, sid: str) -> bool:
        ins = []
        for name, v in (("session_id", sid), ("action", "status")):
            t = self.m.InferInput(name, self.shape, "BYTES")
            t.set_data_from_numpy(np.array([v.encode()], dtype=np.object_).reshape(self.shape))
            ins.append(t)
        try:
            self.c.infer("session_control", ins)
            return True
        except Exception as e:  # noqa: BLE001 - "not a running session" is the answer
            if "not a running session" in str(e) or "was lost" in str(e):
                return False
            raise


def grpc_client(url: str, model: str, sid: str, max_tokens: int) -> float:
    """Start a stream, read one response, cancel it; the time of the hang-up."""
    import tritonclient.grpc as grpcclient

    got: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: got.put(error or result))
    c.async_stream_infer(model, _inputs(grpcclient, sid, max_tokens))
    first = got.get(timeout=300)
    if isinstance(first, Exception):
        raise first
    t = time.monotonic()
    c.stop_stream(cancel_requests=True)
    c.close()
    return t


def http_client(url: str, model: str, sid: str, max_tokens: int) -> float:
    """``generate_stream``, read one event, close the connection; the time of the hang-up."""
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    body = {
        "text_input": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        "session_id": sid,
        "temperature": 0.8,
    }
    conn.request(
        "POST", f"/v2/models/{model}/generate_stream", json.dumps(body), {"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    resp.readline()
    t = time.monotonic()
    resp.close()
    conn.close()
    return t


def openai_client(url: str, _model: str, sid: str, max_tokens: int) -> float:
    host, port = url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    body = {
        "model": "multistream",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
        "session_id": sid,
        "temperature": 0.8,
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    resp.readline()
    t = time.monotonic()
    resp.close()
    conn.close()
    return t


ENTRY_POINTS = {
    "ensemble-grpc-cancel": (grpc_client, "grpc", "multistream"),
    "ensemble-http-disconnect": (http_client, "http", "multistream"),
    "bls-grpc-cancel": (grpc_client, "grpc", "tensorrt_llm_bls"),
    "bls-http-disconnect": (http_client, "http", "tensorrt_llm_bls"),
    "openai-disconnect": (openai_client, "openai", ""),
}


def step_ms(grpc_url: str) -> float:
    """The engine's step time: the median gap between answer tokens of one ordinary request."""
    from client import MultiStreamClient

    with MultiStreamClient(grpc_url) as c:
        times = [
            ev.t_received for ev in c.generate(PROMPT, max_tokens=24) if getattr(ev, "stream", "") == "output"
        ]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return 1000.0 * statistics.median(gaps) if gaps else float("nan")


def probe(
    entry: str,
    urls: dict[str, str],
    clients: int,
    max_tokens: int,
    give_up_s: float,
    trace: Path | None = None,
) -> dict[str, Any]:
    fn, proto, model = ENTRY_POINTS[entry]
    status = Status(urls["grpc"])
    sids = [f"probe-{entry}-{uuid.uuid4().hex[:10]}" for _ in range(clients)]
    hung: dict[str, float] = {}
    freed: dict[str, float] = {}
    errors: list[str] = []

    def run(sid: str) -> None:
        """One client: its hang-up, then its own ``status`` poll until the server let it go.

        Why each client polls its own session at once: polled together after every client
        had hung up, an early hang-up waited for the slowest client's first response (its
        prefill) and the serial ``status`` calls of the others, which read as cancel latency.
        """
        try:
            mine = Status(urls["grpc"])  # connected before the hang-up: not part of the time
            t0 = hung[sid] = fn(urls[proto], model, sid, max_tokens)
            deadline = t0 + give_up_s
            while time.monotonic() < deadline:
                if not mine.running(sid):
                    freed[sid] = (time.monotonic() - t0) * 1000.0
                    return
                time.sleep(0.01)
        except Exception as e:  # noqa: BLE001 - reported in the JSON
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(s,)) for s in sids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    leaked = [s for s in hung if s not in freed]
    for sid in leaked:  # leave the server clean for the next entry point
        try:
            status.c.infer(
                "session_control",
                [_control(status, "session_id", sid), _control(status, "action", "cancel")],
            )
        except Exception:  # noqa: BLE001, S110 - it may have ended meanwhile
            pass
    times = sorted(freed.values())
    out = {
        "clients": clients,
        "hung_up": len(hung),
        "errors": errors,
        "leaked_after_s": {"seconds": give_up_s, "still_running": len(leaked)},
        "freed_ms": _p50_max(times),
    }
    if trace is not None:
        out["sessions"] = sessions = session_hops(trace, hung)
        out["trace"] = hops(sessions)
    return out


def _p50_max(values: list[float]) -> dict[str, float | None]:
    return {
        "p50": statistics.median(values) if values else None,
        "max": max(values) if values else None,
    }


def session_hops(trace: Path, hung: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Per session: ms from its hang-up to each hop of its cancel, and engine steps it still ran.

    Every process stamps ``time.monotonic()`` (CLOCK_MONOTONIC: one clock per machine), so the
    stamps compare with the probe's own hang-up times directly. ``token`` rows are the engine
    times of the session's last answer tokens, one per engine step: ``steps_after_hang_up``
    counts those made after the hang-up, ``steps_after_decode_read`` those made after decode
    had handed the cancel to the engine (the step then in flight: at most one), and
    ``step_ms`` is the session's own median token gap (the step time under this load).
    """
    from backend.serving.hop_trace import CANCEL_FILE

    path = trace / CANCEL_FILE
    rows: dict[str, list[dict[str, Any]]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        row = json.loads(line)
        if row["sid"] in hung:
            rows.setdefault(row["sid"], []).append(row)
    out: dict[str, dict[str, Any]] = {}
    for sid, mine in rows.items():
        t0 = hung[sid]
        stamps: dict[str, float] = {}
        for r in mine:
            if r["hop"] != "token":
                stamps.setdefault(r["hop"], r["t"])  # the first, should a hop repeat
        tokens = sorted(r["t"] for r in mine if r["hop"] == "token")
        gaps = [b - a for a, b in zip(tokens, tokens[1:], strict=False)]
        read = stamps.get("decode_read")
        out[sid] = {
            "hops_ms": {hop: (t - t0) * 1000.0 for hop, t in sorted(stamps.items(), key=lambda kv: kv[1])},
            "steps_after_hang_up": sum(t > t0 for t in tokens),
            "steps_after_decode_read": None if read is None else sum(t > read for t in tokens),
            "step_ms": 1000.0 * statistics.median(gaps) if gaps else None,
        }
    return out


def hops(sessions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """:func:`session_hops` summed up: p50 / max of each hop and of the step counts."""
    per_hop: dict[str, list[float]] = {}
    for one in sessions.values():
        for hop, ms in one["hops_ms"].items():
            per_hop.setdefault(hop, []).append(ms)
    out: dict[str, Any] = {
        "hops_ms": {hop: _p50_max(sorted(v)) for hop, v in sorted(per_hop.items(), key=lambda kv: min(kv[1]))}
    }
    for key in ("steps_after_hang_up", "steps_after_decode_read", "step_ms"):
        values = sorted(one[key] for one in sessions.values() if one[key] is not None)
        out[key] = _p50_max(values)
    return out


def _control(status: Status, name: str, value: str) -> Any:
    t = status.m.InferInput(name, status.shape, "BYTES")
    t.set_data_from_numpy(np.array([value.encode()], dtype=np.object_).reshape(status.shape))
    return t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cancel_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc", default="localhost:8001")
    p.add_argument("--http", default="localhost:8000")
    p.add_argument("--openai", default=None, help="host:port of python -m frontend (skipped when unset)")
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--max-tokens", type=int, default=900)
    p.add_argument("--give-up-s", type=float, default=30.0)
    p.add_argument("--entry", action="append", choices=sorted(ENTRY_POINTS), help="default: all reachable")
    p.add_argument(
        "--trace", type=Path, default=None, help="the server's MULTISTREAM_HOP_TRACE folder: hop by hop times"
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    urls = {"grpc": args.grpc, "http": args.http, "openai": args.openai or ""}
    entries = args.entry or [e for e, (_, proto, _) in ENTRY_POINTS.items() if urls[proto]]
    out: dict[str, Any] = {"step_ms": step_ms(args.grpc), "max_tokens": args.max_tokens, "entry_points": {}}
    for entry in entries:
        out["entry_points"][entry] = res = probe(
            entry, urls, args.clients, args.max_tokens, args.give_up_s, args.trace
        )
        if not args.json:
            print(
                f"{entry:26s} still running after {args.give_up_s:g}s: {res['leaked_after_s']['still_running']:2d}"
                f"/{res['hung_up']}   freed p50 {res['freed_ms']['p50']} ms, max {res['freed_ms']['max']} ms"
                + (f"   errors: {res['errors'][:2]}" if res["errors"] else ""),
                flush=True,
            )
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"engine step (answer inter-token gap): {out['step_ms']:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
