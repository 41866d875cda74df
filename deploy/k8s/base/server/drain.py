"""preStop drain of a multistream replica: wait until its sessions are done, then let Triton stop.

Why: Kubernetes removes a terminating pod from the ready Service at once (the router sends it
no new session) but its DNS name under ``multistream-replicas`` stays (that Service publishes
pods that are not ready), so its running sessions still get their input and cancel requests.
Triton itself, once it has the SIGTERM, refuses every new request, ``session_control`` too.
So the pod waits here, before the SIGTERM, until ``multistream_active_sessions`` of its decode
instances has read 0 twice in a row, or ``--timeout`` passed, or the server is gone.

Standard library only: it runs with the image's python3 from a ConfigMap, outside the package.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import urllib.error
import urllib.request

_SAMPLE = re.compile(r"^multistream_active_sessions\{(?P<labels>[^}]*)\}\s+(?P<value>\S+)", re.MULTILINE)


def active_sessions(metrics_text: str) -> float:
    """Sessions running or queued in the decode instances, from Triton's /metrics text."""
    total = 0.0
    for m in _SAMPLE.finditer(metrics_text):
        if 'model="decode"' in m.group("labels"):
            total += float(m.group("value"))
    return total


def drain(url: str, timeout: float, period: float, out=sys.stdout) -> int:
    """Returns 0 once idle (or the server is gone), 1 when ``timeout`` passed with sessions left."""
    deadline = time.monotonic() + timeout
    idle_reads = 0
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                active = active_sessions(resp.read().decode("utf-8", "replace"))
        except (urllib.error.URLError, OSError) as e:
            print(f"drain: metrics unreachable ({e}); nothing left to wait for", file=out, flush=True)
            return 0
        idle_reads = idle_reads + 1 if active == 0 else 0
        if idle_reads >= 2:
            print("drain: no active sessions", file=out, flush=True)
            return 0
        if time.monotonic() >= deadline:
            print(f"drain: {active:.0f} sessions still active after {timeout:.0f} s", file=out, flush=True)
            return 1
        time.sleep(period)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metrics-url", default="http://127.0.0.1:8002/metrics")
    p.add_argument(
        "--timeout", type=float, default=290.0, help="seconds (keep below terminationGracePeriodSeconds)"
    )
    p.add_argument("--period", type=float, default=2.0, help="seconds between reads")
    args = p.parse_args(argv)
    return drain(args.metrics_url, args.timeout, args.period)


if __name__ == "__main__":
    sys.exit(main())
