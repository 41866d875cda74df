"""``python -m deploy.router``: the session-affine nginx router in front of replicas at fixed addresses.

Why this exists next to the Kubernetes manifests: the routing rules (which replica gets which
request) live in ONE file, ``deploy/k8s/base/router/routing.conf.template``, used by the
Kubernetes router Deployment and by this module. Here the replicas are fixed ``host:port``
pairs (one host, a few VMs, the tests); in Kubernetes they are DNS names
(``deploy/k8s/base/router/pool.conf.template``). Only that pool part differs.

    python -m deploy.router --replica r0=127.0.0.1:8001,127.0.0.1:8000 \\
                            --replica r1=127.0.0.1:9001,127.0.0.1:9000 --grpc-port 7001 --http-port 7000

Each replica's server must run with ``MULTISTREAM_REPLICA=<its name>`` so the session ids it
mints name it (``backend/serving/session_ids.py``).

``balance="round_robin"`` renders what a plain load balancer does (every request to the next
replica, the header ignored): the control that shows what affinity prevents.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from launcher.serve import free_port

ROUTING_TEMPLATE = Path(__file__).resolve().parent / "k8s" / "base" / "router" / "routing.conf.template"
BALANCES = ("session", "round_robin")
_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_VAR_RE = re.compile(r"\$\{([A-Z0-9_]+)\}")


class RouterError(RuntimeError):
    """nginx is missing, rejected the configuration, or did not start listening."""


@dataclass(frozen=True)
class Replica:
    """One server: its replica name (``$MULTISTREAM_REPLICA``) and its gRPC / HTTP ``host:port``."""

    name: str
    grpc: str
    http: str

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"replica name must be a DNS label (a-z, 0-9, '-'), got {self.name!r}")
        for what in ("grpc", "http"):
            addr = getattr(self, what)
            if not re.fullmatch(r"[^\s:;{}]+:\d{1,5}", addr):
                raise ValueError(f"replica {self.name}: {what} address must be host:port, got {addr!r}")

    @classmethod
    def parse(cls, spec: str) -> Replica:
        """``NAME=GRPC_HOST:PORT,HTTP_HOST:PORT`` (the ``--replica`` flag)."""
        name, sep, addrs = spec.partition("=")
        grpc, sep2, http = addrs.partition(",")
        if not (sep and sep2):
            raise ValueError(f"--replica must be NAME=GRPC_HOST:PORT,HTTP_HOST:PORT, got {spec!r}")
        return cls(name.strip(), grpc.strip(), http.strip())


def substitute(template: str, values: dict[str, str]) -> str:
    """Fills ``${NAME}`` as the nginx image's envsubst does; nginx's own ``$vars`` stay untouched.

    A ``${NAME}`` without a value is an error here (envsubst would leave an empty string and
    nginx would fail later with a less helpful message).
    """
    missing = sorted({m.group(1) for m in _VAR_RE.finditer(template)} - values.keys())
    if missing:
        raise KeyError(f"routing template needs values for {missing}")
    return _VAR_RE.sub(lambda m: values[m.group(1)], template)


def render_pool(replicas: list[Replica], balance: str = "session") -> str:
    """The upstream part of the config for replicas at fixed addresses."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}")
    if not replicas:
        raise ValueError("at least one replica is needed")
    if len({r.name for r in replicas}) != len(replicas):
        raise ValueError(f"replica names must be unique, got {[r.name for r in replicas]}")
    out = [f"# {len(replicas)} replicas at fixed addresses, balance={balance} (deploy/router.py)"]
    for proto in ("grpc", "http"):
        servers = "".join(f"    server {getattr(r, proto)} max_fails=1 fail_timeout=10s;\n" for r in replicas)
        if balance == "round_robin":
            # The control: one round-robin pool for every route, the header means nothing.
            for pool in ("least", "hash"):
                out.append(f"upstream ms_{proto}_{pool} {{\n    zone ms_{proto}_{pool} 64k;\n{servers}}}")
            out.append(f"map $ms_replica $ms_pinned_{proto} {{\n    default ms_{proto}_least;\n}}")
            continue
        out.append(
            f"upstream ms_{proto}_least {{\n    zone ms_{proto}_least 64k;\n    least_conn;\n{servers}}}"
        )
        out.append(
            f"upstream ms_{proto}_hash {{\n    zone ms_{proto}_hash 64k;\n"
            f"    hash $http_x_multistream_session consistent;\n{servers}}}"
        )
        pins = []
        for r in replicas:
            upstream = f"ms_{proto}_pin_{r.name.replace('-', '_')}"
            out.append(f"upstream {upstream} {{\n    server {getattr(r, proto)};\n}}")
            pins.append(f"    {r.name} {upstream};\n")
        # An id naming no replica of this pool: nowhere, so the client gets the router's
        # clear "unavailable" error instead of some other replica's "unknown session".
        out.append(f"upstream ms_{proto}_nowhere {{\n    server 127.0.0.1:9 down;\n}}")
        out.append(
            f"map $ms_replica $ms_pinned_{proto} {{\n{''.join(pins)}    default ms_{proto}_nowhere;\n}}"
        )
    return "\n".join(out) + "\n"


def render_config(
    replicas: list[Replica],
    *,
    grpc_port: int,
    http_port: int,
    run_dir: Path,
    balance: str = "session",
    address: str = "127.0.0.1",
) -> str:
    """A whole nginx.conf (main context, routing rules, pool) that runs as a foreground process.

    ``address`` is where the router listens (loopback by default, as the servers' launcher does).
    """
    routing = substitute(
        ROUTING_TEMPLATE.read_text(encoding="utf-8"),
        {"MS_GRPC_PORT": str(grpc_port), "MS_HTTP_PORT": str(http_port)},
    )
    routing = re.sub(r"listen (\d+)", lambda m: f"listen {address}:{m.group(1)}", routing)
    temp = {k: run_dir / k for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in temp.values():
        path.mkdir(parents=True, exist_ok=True)
    return (
        "# Rendered by deploy/router.py; the routing rules are deploy/k8s/base/router/routing.conf.template.\n"
        "daemon off;\n"
        "worker_processes 1;\n"
        f"pid {run_dir / 'nginx.pid'};\n"
        f"error_log {run_dir / 'error.log'} warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        + "".join(f"    {k}_temp_path {v};\n" for k, v in temp.items())
        + routing
        + f"access_log {run_dir / 'access.log'} ms_route;\n"
        + render_pool(replicas, balance)
        + "}\n"
    )


def find_nginx() -> str:
    """The nginx binary (Debian's, installed by scripts/setup.sh), or RouterError."""
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
    if found is None:
        raise RouterError(
            "nginx not found: scripts/setup.sh installs Debian's nginx (apt-get install nginx-light)"
        )
    return found


@dataclass
class RouterHandle:
    """A running nginx router; ``stop()`` (or leaving the ``with`` block) ends it."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    run_dir: Path
    balance: str
    replicas: list[Replica] = field(default_factory=list)
    keep_run_dir: bool = False

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def access_log(self) -> Path:
        return self.run_dir / "access.log"

    def routed(self, uri_part: str = "") -> Counter[str]:
        """``{upstream address: requests}`` from the access log, for URIs containing ``uri_part``."""
        counts: Counter[str] = Counter()
        with contextlib.suppress(FileNotFoundError):
            for line in self.access_log.read_text(encoding="utf-8", errors="replace").splitlines():
                m = re.search(r" uri=(\S*) upstream=\"([^\"]*)\"", line)
                if m and uri_part in m.group(1):
                    # Tried in turn when one refused ("a, b"): the last one served it.
                    counts[m.group(2).split(",")[-1].strip()] += 1
        return counts

    def error_log(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.run_dir / "error.log").read_text(encoding="utf-8", errors="replace")
        return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish open requests
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> RouterHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_router(
    replicas: list[Replica],
    *,
    grpc_port: int = 0,
    http_port: int = 0,
    balance: str = "session",
    address: str = "127.0.0.1",
    run_dir: str | Path | None = None,
    keep_run_dir: bool = False,
    ready_timeout: float = 20.0,
) -> RouterHandle:
    """Renders the config, checks it with ``nginx -t``, starts nginx and waits until it listens.

    Port 0 means a free port.
    """
    nginx = find_nginx()
    base = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="multistream-router-"))
    base.mkdir(parents=True, exist_ok=True)
    grpc_port, http_port = grpc_port or free_port(), http_port or free_port()
    conf = base / "nginx.conf"
    conf.write_text(
        render_config(
            replicas, grpc_port=grpc_port, http_port=http_port, run_dir=base, balance=balance, address=address
        ),
        encoding="utf-8",
    )
    check = subprocess.run(
        [nginx, "-t", "-q", "-p", str(base), "-c", str(conf)], capture_output=True, text=True
    )
    if check.returncode != 0:
        raise RouterError(f"nginx rejected {conf}:\n{check.stderr}")
    log = open(base / "nginx.out", "wb")  # noqa: SIM115 - closed when the process ends
    process = subprocess.Popen(
        [nginx, "-p", str(base), "-c", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    log.close()
    handle = RouterHandle(process, grpc_port, http_port, base, balance, list(replicas), keep_run_dir)
    deadline = time.monotonic() + ready_timeout
    while True:
        if process.poll() is not None:
            handle.keep_run_dir = True
            raise RouterError(f"nginx exited with {process.returncode}:\n{handle.error_log()[-2000:]}")
        if all(_listening(address, p) for p in (grpc_port, http_port)):
            return handle
        if time.monotonic() > deadline:
            handle.stop()
            raise RouterError(f"nginx did not listen on {grpc_port}/{http_port} within {ready_timeout:.0f} s")
        time.sleep(0.05)


def _listening(address: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1" if address in ("0.0.0.0", "*") else address, port)) == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deploy.router", description=__doc__.splitlines()[0])
    p.add_argument("--replica", action="append", required=True, type=Replica.parse, help="NAME=GRPC,HTTP")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--address", default="127.0.0.1", help="where the router listens (0.0.0.0: everywhere)")
    p.add_argument("--balance", choices=BALANCES, default="session")
    p.add_argument("--print", action="store_true", help="print the rendered nginx.conf and exit")
    args = p.parse_args(argv)
    if args.print:
        with tempfile.TemporaryDirectory() as tmp:
            print(
                render_config(
                    args.replica,
                    grpc_port=args.grpc_port,
                    http_port=args.http_port,
                    run_dir=Path(tmp),
                    balance=args.balance,
                    address=args.address,
                )
            )
        return 0
    with start_router(
        args.replica,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        balance=args.balance,
        address=args.address,
    ) as r:
        print(f"router: gRPC {r.grpc_url}, HTTP {r.http_url} -> {[x.name for x in args.replica]}", flush=True)
        try:
            return r.process.wait() or 0
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
