"""``python -m bench.reasoning_burst --json``: concurrent requests with reasoning streams.

The reproduction of the decode stub's deadlock in Triton 2.51's python backend
(docs/reliability.md, "A stub that deadlocks"): ``--clients`` (16) closed-loop gRPC clients,
each request asking for ``--reasoning-streams`` (2) reasoning streams beside the answer, for
``--seconds`` (90). Decode starts a decoupled BLS call to ``reasoning`` per request while
others are streaming; on 2 cores this hung the stub within one or two minutes in about half
of the runs. A client that hears nothing for ``--stall-s`` (20) stops and counts a stall.

Reported: requests completed, errors, stalls, and ``hung``: a stall whose server then reports
a stub without heartbeat for ``--stall-s`` (when the run folder is given, ``--run-dir``) or,
without it, any stall. Use it to prove a fix: ``"hung": false`` over several runs.

Needs a running server (``--grpc``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any


async def burst(
    grpc_url: str, clients: int, seconds: float, reasoning_streams: int, stall_s: float, max_tokens: int
) -> dict[str, Any]:
    """Closed-loop clients for ``seconds``; counts of completed, failed and stalled requests."""
    from client import AsyncMultiStreamClient
    from client.errors import MultiStreamError

    counts = {"completed": 0, "errors": 0, "stalls": 0}
    first_error: list[str] = []
    end = time.monotonic() + seconds
    async with AsyncMultiStreamClient(grpc_url, idle_timeout_s=stall_s) as client:

        async def worker(k: int) -> None:
            i = 0
            while time.monotonic() < end:
                try:
                    async for _ in client.generate(
                        f"Question {k}-{i}: why is the sky blue?",
                        max_tokens=max_tokens,
                        reasoning_streams=reasoning_streams,
                        reasoning_budget=max_tokens,
                    ):
                        pass
                    counts["completed"] += 1
                except MultiStreamError as e:
                    if "no response from server" in str(e):
                        counts["stalls"] += 1
                        return  # this client is stuck behind the stalled stub
                    counts["errors"] += 1
                    first_error[:] = first_error or [str(e)]
                i += 1

        await asyncio.gather(*(worker(k) for k in range(clients)))
    return {**counts, "first_error": first_error[0] if first_error else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc", default="localhost:8001")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=90.0)
    p.add_argument("--reasoning-streams", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--stall-s", type=float, default=20.0)
    p.add_argument("--run-dir", default=None, help="the server's run folder (heartbeats/ in it)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    result = asyncio.run(
        burst(args.grpc, args.clients, args.seconds, args.reasoning_streams, args.stall_s, args.max_tokens)
    )
    stale: list[str] = []
    if args.run_dir:
        folder = Path(args.run_dir) / "heartbeats"
        now = time.time()
        stale = sorted(f.name for f in folder.glob("*") if now - f.stat().st_mtime > args.stall_s)
    result.update(
        clients=args.clients,
        seconds=round(time.monotonic() - t0, 1),
        stale_heartbeats=stale if args.run_dir else None,
        hung=bool(stale) if args.run_dir else result["stalls"] > 0,
    )
    print(json.dumps(result, indent=2) if args.json else result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
