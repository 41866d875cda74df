"""``python -m bench.aiperf --json``: NVIDIA's ``aiperf`` against the OpenAI front, and the
front's own cost against the project's gRPC client on the same requests.

1. ``aiperf profile`` (from PyPI, in its own virtual environment under the cache, created on
   first use: its dependencies must not touch the interpreter Triton embeds), offline, with
   the local tokenizer folder (nothing is fetched), streaming chat at each
   ``--concurrency`` level (1, 4, 16): TTFT, inter-token latency, output throughput; and once
   more with reasoning streams on (``--extra-inputs reasoning_streams:2``), where the time to
   the first *answer* token is what a user waits for.
2. ``bench.front_cost``: the same greedy prompts straight to Triton (``AsyncMultiStreamClient``),
   through the front with a minimal HTTP client, and through it with the ``openai`` SDK, in
   interleaved rounds at each level: what the front adds to TTFT (target: <= 2 ms at p50) and
   its share of throughput at 16 (target: >= 95%), and what the SDK adds in its own process.

Needs a running Triton (``--grpc``, ``--http``); starts its own front on a free port, as the
launcher does (``launcher.serve.front_argv``), unless ``--front``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
import venv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from backend.model_store import default_cache_dir, resolve_model_dir
from bench import front_cost

AIPERF_REQUIREMENT = "aiperf>=0.13"


def aiperf_bin(cache: Path | None = None) -> Path:
    """The ``aiperf`` executable of the bench's own venv, installed from PyPI on first use."""
    root = (cache or default_cache_dir()) / "aiperf-venv"
    exe = root / "bin" / "aiperf"
    if not exe.exists():
        print(
            f"bench.aiperf: installing {AIPERF_REQUIREMENT} into {root} (once) ...",
            file=sys.stderr,
            flush=True,
        )
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
        subprocess.run(
            [
                str(root / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                AIPERF_REQUIREMENT,
            ],
            check=True,
        )
    return exe


@contextlib.contextmanager
def running_front(grpc_url: str, http_url: str, front: str | None) -> Iterator[str]:
    """``host:port`` of the front: the given one, or one started here for the run, as the
    launcher starts it (``launcher.serve.front_argv``)."""
    if front:
        yield front
        return
    from launcher.serve import free_port, front_argv

    port = free_port()
    child = subprocess.Popen(
        [*front_argv(grpc_url, http_url, port), "--max-concurrent", "256"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        child.terminate()
        child.wait(timeout=20)


def run_aiperf(
    exe: Path, front: str, tokenizer: Path, concurrency: int, requests: int, max_tokens: int, extra: list[str]
) -> dict[str, Any]:
    """One ``aiperf profile`` run; its JSON export's metrics (ms, tokens/s)."""
    with tempfile.TemporaryDirectory(prefix="aiperf-") as out:
        argv = [
            str(exe),
            "profile",
            "--model",
            "multistream",
            "--url",
            f"http://{front}",
            "--endpoint-type",
            "chat",
            "--streaming",
            "--tokenizer",
            str(tokenizer),
            "--concurrency",
            str(concurrency),
            "--request-count",
            str(max(requests, concurrency)),
            "--synthetic-input-tokens-mean",
            "64",
            "--synthetic-input-tokens-stddev",
            "0",
            "--output-tokens-mean",
            str(max_tokens),
            "--output-tokens-stddev",
            "0",
            "--random-seed",
            "1",
            "--artifact-dir",
            out,
            "--ui-type",
            "none",
        ]
        for item in ["ignore_eos:true", *extra]:  # fixed-length answers: comparable throughput
            argv += ["--extra-inputs", item]
        # Offline by construction: the tokenizer is a local folder (an absolute path aiperf loads
        # from disk). Not HF_HUB_OFFLINE: aiperf 0.13 then looks the name up in the hub cache
        # (snapshot_download) and refuses a plain folder.
        env = os.environ | {"HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
        exports = sorted(Path(out).rglob("profile_export_aiperf.json"))
        if proc.returncode != 0 or not exports:
            return {"error": (proc.stderr or proc.stdout)[-2000:], "returncode": proc.returncode}
        return summarise(json.loads(exports[0].read_text()))


#: aiperf's metric tags we report, with the statistic taken.
METRICS = {
    "time_to_first_token": "ttft_ms",
    "time_to_first_output_token": "ttfot_ms",
    "inter_token_latency": "itl_ms",
    "output_token_throughput": "output_tokens_per_s",
    "request_throughput": "requests_per_s",
    "request_latency": "request_latency_ms",
}


def summarise(export: dict[str, Any]) -> dict[str, Any]:
    """The metrics we report from aiperf's ``profile_export_aiperf.json`` (top-level records)."""
    out: dict[str, Any] = {}
    for tag, name in METRICS.items():
        rec = export.get(tag)
        if isinstance(rec, dict):
            out[name] = {k: rec[k] for k in ("p50", "p90", "avg") if rec.get(k) is not None}
    for tag in ("request_count", "reasoning_token_count", "output_token_count"):
        if isinstance(export.get(tag), dict):
            out[tag] = export[tag].get("avg")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.aiperf", description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc", default="localhost:8001", help="Triton's gRPC address")
    p.add_argument("--http", default="localhost:8000", help="Triton's HTTP address (the front's upstream)")
    p.add_argument("--front", default=None, help="host:port of a running front (default: start one)")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--requests", type=int, default=32, help="requests per level (at least the concurrency)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--model-dir", default="default", help="the tokenizer folder aiperf counts tokens with")
    p.add_argument("--skip-aiperf", action="store_true", help="only the front-vs-gRPC comparison")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.concurrency.split(",")]
    result: dict[str, Any] = {"max_tokens": args.max_tokens, "levels": levels}
    with running_front(args.grpc, args.http, args.front) as front:
        if not args.skip_aiperf:
            exe = aiperf_bin()
            tok = resolve_model_dir(args.model_dir)
            result["aiperf"] = {
                str(c): run_aiperf(exe, front, tok, c, args.requests, args.max_tokens, []) for c in levels
            }
            result["aiperf_reasoning"] = {
                str(c): run_aiperf(
                    exe,
                    front,
                    tok,
                    c,
                    args.requests,
                    args.max_tokens,
                    ["reasoning_streams:2", f"reasoning_budget:{args.max_tokens}"],
                )
                for c in levels
            }
        result["front_vs_grpc"] = front_cost.compare(
            f"http://{front}", args.grpc, levels, args.requests, args.max_tokens, extra={"ignore_eos": True}
        )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for c, r in result["front_vs_grpc"].items():
            same = r["ttft_added_ms_p50_same_time"]
            side = f" ({same:+.1f} ms side by side with gRPC)" if same is not None else ""
            outside = r["ttft_added_ms_p50_outside_server"]
            outside = float("nan") if outside is None else outside
            print(
                f"concurrency {c:>3}: front adds {r['ttft_added_ms_p50']:+.1f} ms TTFT p50{side}, "
                f"{outside:+.1f} ms outside the server's own time, "
                f"throughput {100 * r['throughput_ratio']:.1f}% of direct gRPC; the openai SDK "
                f"adds {r['sdk_client_ttft_ms_p50']:+.1f} ms on top ({100 * r['sdk_throughput_ratio']:.1f}%)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
