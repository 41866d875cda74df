"""Decode and reasoning engines in one process or two: ``python -m bench.engines_per_process --json``.

Why: the server's memory for the 135M default model is dominated by its interpreters, not
its weights (docs/performance.md, "Weights once per machine": decode and reasoning each pay
~145 MiB of private memory for ``import torch`` before a single weight). Today each runs in
its own Triton stub. This measures, without Triton, what hosting reasoning's engine inside
decode's process would change, before anyone rebuilds the serving path around it:

- ``one``: one process builds both engines (answer: the cores' threads; reasoning: half, as
  ``DeployConfig.threads_for`` gives them), then runs ``sessions`` answer sessions on the
  first while ``sessions`` sessions of ``reasoning_streams`` streams run on the second;
- ``two``: the same engines and workloads in two processes started together.

Reported per layout: the PSS (``/proc/self/smaps_rollup``, summed over the processes: a
packed-weight page both map counts once), the answer's tokens/s and inter-token p50 under
the reasoning load, reasoning's tokens/s, and the answer alone beforehand (4 sessions): a
lower figure in ``one`` would mean the two engines' thread settings interfere (torch keeps
its thread count per process). Greedy, ``ignore_eos``, the default model's chat prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROLES = ("answer", "reasoning")
PROMPT = "Write a short story about a robot who learns to paint."


def _pss_mib() -> float:
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _threads(role: str) -> int:
    cores = os.cpu_count() or 1
    return max(1, cores // 2) if role == "reasoning" else cores


def _engine(role: str) -> Any:
    from backend.engine import Engine, EngineConfig
    from backend.model_store import resolve_model_dir

    return Engine.from_model_dir(
        resolve_model_dir("default"), EngineConfig(threads=_threads(role), max_sessions=16, max_context=1024)
    )


def _workload(engine: Any, role: str, sessions: int, streams: int, tokens: int, prompt: list[int]) -> dict:
    """``sessions`` sessions at once (``bench.engine.run_sessions``); tokens/s over the wall
    time and the p50 gap between a session's consecutive tokens."""
    from bench.engine import run_sessions

    res = run_sessions(engine, prompt, sessions, streams, tokens, reasoning_only=role == "reasoning")
    stamps = res["stamps"]
    gaps = [b - a for s in stamps for a, b in zip(s, s[1:], strict=False)]
    return {
        "tokens_per_s": round(sum(len(s) for s in stamps) / res["wall"], 1),
        "gap_ms_p50": round(1000 * statistics.median(gaps), 2) if gaps else None,
    }


def _part(part: str, args: argparse.Namespace) -> dict:
    """One child process: ``one`` (both engines) or one role, started with the other role's
    process (``go`` file: both wait until both are loaded and warm)."""
    from backend.model_store import resolve_model_dir
    from backend.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(resolve_model_dir("default"))
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}]))
    roles = ROLES if part == "one" else (part,)
    engines = {r: _engine(r) for r in roles}
    streams = {"answer": 1, "reasoning": args.reasoning_streams}
    out: dict[str, Any] = {}
    for r in roles:
        _workload(engines[r], r, 1, streams[r], 4, prompt)  # warm
    if "answer" in engines:
        out["answer_alone"] = _workload(engines["answer"], "answer", 4, 1, args.tokens, prompt)
    if part != "one":
        sync = Path(args.sync_dir)
        (sync / f"ready_{part}").touch()
        while not (sync / "go").exists():
            time.sleep(0.005)
    results: dict[str, dict] = {}
    threads = [
        threading.Thread(
            target=lambda r=r: results.__setitem__(
                r, _workload(engines[r], r, args.sessions, streams[r], args.tokens, prompt)
            )
        )
        for r in roles
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.update(results)
    out["pss_mib"] = round(_pss_mib(), 1)
    for e in engines.values():
        e.shutdown()
    return out


def _child(part: str, args: argparse.Namespace, sync_dir: str) -> subprocess.Popen:
    argv = [sys.executable, "-m", "bench.engines_per_process", "--part", part, "--sync-dir", sync_dir]
    argv += ["--sessions", str(args.sessions), "--tokens", str(args.tokens)]
    argv += ["--reasoning-streams", str(args.reasoning_streams)]
    # What the launcher sets when the instances' threads outnumber the cores (openmp_env).
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"a benchmark child failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as sync_dir:
        one = _result(_child("one", args, sync_dir))
        procs = {r: _child(r, args, sync_dir) for r in ROLES}
        while not all((Path(sync_dir) / f"ready_{r}").exists() for r in ROLES):
            if any(p.poll() is not None for p in procs.values()):
                break
            time.sleep(0.05)
        (Path(sync_dir) / "go").touch()
        parts = {r: _result(p) for r, p in procs.items()}
    two = {
        "answer_alone": parts["answer"]["answer_alone"],
        "answer": parts["answer"]["answer"],
        "reasoning": parts["reasoning"]["reasoning"],
        "pss_mib": round(sum(p["pss_mib"] for p in parts.values()), 1),
        "pss_mib_by_process": {r: p["pss_mib"] for r, p in parts.items()},
    }
    return {
        "sessions": args.sessions,
        "reasoning_streams": args.reasoning_streams,
        "tokens": args.tokens,
        "threads": {r: _threads(r) for r in ROLES},
        "one": one,
        "two": two,
        "pss_saved_mib": round(two["pss_mib"] - one["pss_mib"], 1),
        "answer_tokens_per_s_one_vs_two": round(
            one["answer"]["tokens_per_s"] / two["answer"]["tokens_per_s"], 3
        ),
        "reasoning_tokens_per_s_one_vs_two": round(
            one["reasoning"]["tokens_per_s"] / two["reasoning"]["tokens_per_s"], 3
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.engines_per_process", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--sessions", type=int, default=8, help="sessions of each engine in the loaded phase")
    p.add_argument("--reasoning-streams", type=int, default=2, help="streams per reasoning session")
    p.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--part", choices=("one", *ROLES), help=argparse.SUPPRESS)
    p.add_argument("--sync-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        print(json.dumps(_part(args.part, args)))
        return 0
    result = measure(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for layout in ("one", "two"):
            r = result[layout]
            print(
                f"{layout} process(es): PSS {r['pss_mib']:.0f} MiB; under load answer "
                f"{r['answer']['tokens_per_s']} tok/s (gap p50 {r['answer']['gap_ms_p50']} ms), "
                f"reasoning {r['reasoning']['tokens_per_s']} tok/s; answer alone "
                f"{r['answer_alone']['tokens_per_s']} tok/s"
            )
        print(f"one process saves {result['pss_saved_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
