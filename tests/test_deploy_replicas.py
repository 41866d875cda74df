"""Two real tritonservers behind Debian's nginx with the project's routing rules (issue 15).

What a Kubernetes deployment relies on, proven on one host with the real parts: the replicas
(``launcher.serve.start_server``, ``MULTISTREAM_REPLICA`` set as the StatefulSet sets it), the
router (``deploy.router``, the same ``routing.conf.template`` as the cluster's router),
tritonclient as the client, locust as the load, Debian's prometheus scraping the replicas.

One pair of servers for the whole module (2 cores: each gets 1 thread per model); the test
that kills a replica runs last.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
import yaml

from backend.serving.session_ids import REPLICA_ENV, replica_of
from client import AsyncMultiStreamClient, Done, MultiStreamClient, StreamDelta
from deploy.router import Replica, RouterHandle, find_nginx, start_router
from launcher.serve import DEFAULT_REPOSITORY, ServerHandle, list_models, start_server
from tests.deploy_helpers import (
    K8S,
    MONITORING,
    TEST_NAMESPACE,
    HttpStreamSession,
    Prometheus,
    StreamSession,
    adapter_query,
    control,
    dashboard_queries,
    http_control,
    promql_operands,
    rules_file,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parent.parent
NAMES = ("r0", "r1")
PROMPT = "Tell me a long story about a lighthouse keeper and the sea."


def _spawned(run_dir: Path) -> bool:
    """Whether the tritonserver of ``run_dir`` exists yet (it copied our environment then)."""
    marker = str(run_dir / "model_repository")
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, TypeError):
            if marker in proc.info["cmdline"]:
                return True
    return False


def _start_replicas() -> dict[str, ServerHandle]:
    """Both replicas, started side by side; each sees its own ``MULTISTREAM_REPLICA``.

    The name reaches the stubs through tritonserver's environment, as the pod spec's does.
    tritonserver copies the environment when it is spawned, so the next name is set only
    once the previous server's process exists.
    """
    handles: dict[str, ServerHandle] = {}
    errors: dict[str, BaseException] = {}

    def start(name: str, run_dir: Path) -> None:
        try:
            handles[name] = start_server(
                DEFAULT_REPOSITORY,
                model_dir=os.environ.get("MULTISTREAM_TEST_MODEL_DIR", "default"),
                decode_instances=1,
                reasoning_instances=1,
                prefill_instances=1,
                preprocessing_instances=1,
                threads={"decode": 1, "reasoning": 1, "prefill": 1},
                max_sessions=8,
                max_context=512,
                log_level="warning",
                run_dir=run_dir,
                ready_timeout=float(os.environ.get("MULTISTREAM_TEST_READY_TIMEOUT", "600")),
            )
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the other one is stopped
            errors[name] = e

    old = os.environ.get(REPLICA_ENV)
    threads = []
    try:
        for name in NAMES:
            run_dir = Path(tempfile.mkdtemp(prefix=f"multistream-{name}-"))
            os.environ[REPLICA_ENV] = name
            t = threading.Thread(target=start, args=(name, run_dir), daemon=True)
            t.start()
            threads.append(t)
            deadline = time.monotonic() + 300
            while t.is_alive() and not _spawned(run_dir) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        if old is None:
            os.environ.pop(REPLICA_ENV, None)
        else:
            os.environ[REPLICA_ENV] = old
    for t in threads:
        t.join()
    if errors:
        for handle in handles.values():
            handle.stop()
        raise next(iter(errors.values()))
    return handles


@pytest.fixture(scope="module")
def replicas(gil_check: None) -> Iterator[dict[str, ServerHandle]]:
    if not list_models(DEFAULT_REPOSITORY):
        pytest.skip(f"{DEFAULT_REPOSITORY} has no models yet")
    find_nginx()  # a missing nginx is a failure with the install hint, not a skip
    servers = _start_replicas()
    try:
        yield servers
    finally:
        for handle in servers.values():
            handle.stop()


def _replica_specs(replicas: dict[str, ServerHandle]) -> list[Replica]:
    return [Replica(n, h.grpc_url, h.http_url) for n, h in replicas.items()]


@pytest.fixture(scope="module")
def router(replicas: dict[str, ServerHandle]) -> Iterator[RouterHandle]:
    with start_router(_replica_specs(replicas)) as handle:
        yield handle


@pytest.fixture(scope="module")
def prom(replicas: dict[str, ServerHandle]) -> Iterator[Prometheus]:
    """Scrapes both replicas from before the first request, so rates have samples."""
    p = Prometheus(
        {n: h.metrics_url.removeprefix("http://").removesuffix("/metrics") for n, h in replicas.items()}
    )
    try:
        yield p
    finally:
        p.stop()


def _sessions(url: str, n: int, max_tokens: int, *, ignore_eos: bool = False) -> list[StreamSession]:
    sessions = [StreamSession(url, f"{PROMPT} ({i})", max_tokens, ignore_eos=ignore_eos) for i in range(n)]
    for s in sessions:
        assert s.first.wait(120), f"no first response through {url}"
        assert s.error is None, s.error
    return sessions


def test_pushes_and_cancels_reach_their_sessions(replicas, router, prom):
    """Concurrent sessions through the router, gRPC and HTTP, minted and client-chosen ids:
    every push is accepted by its session, every cancel ends it and only it."""
    tag = uuid.uuid4().hex[:8]
    # Sessions that outlive every call below on a loaded machine (no end on EOS, a long budget);
    # the test cancels them all in the end.
    n = 400  # the replicas run with max_context=512
    grpc_minted = [StreamSession(router.grpc_url, f"{PROMPT} ({i})", n, ignore_eos=True) for i in range(3)]
    grpc_chosen = [
        StreamSession(router.grpc_url, PROMPT, n, session_id=f"chat-{tag}-{i}", ignore_eos=True)
        for i in range(2)
    ]
    http_minted = [HttpStreamSession(router.http_url, PROMPT, n, ignore_eos=True)]
    http_chosen = [
        HttpStreamSession(router.http_url, PROMPT, n, session_id=f"chat-{tag}-http", ignore_eos=True)
    ]
    sessions = [*grpc_minted, *grpc_chosen, *http_minted, *http_chosen]
    for s in sessions:
        assert s.first.wait(120) and s.error is None, s.error
    for s in (*grpc_minted, *http_minted):
        assert replica_of(s.session_id) in NAMES, s.session_id
    # New sessions went to the least-loaded replica: 3 open gRPC streams are on both.
    assert {replica_of(s.session_id) for s in grpc_minted} == set(NAMES), [s.session_id for s in grpc_minted]

    def push_then_maybe_cancel(i_s):
        i, s = i_s
        # A session's requests use its protocol: the hash ring of client-chosen ids is per
        # protocol (docs/kubernetes.md); a minted id names its replica for either.
        ctl, url = (
            (http_control, router.http_url)
            if isinstance(s, HttpStreamSession)
            else (control, router.grpc_url)
        )
        accepted = ctl(url, s.session_id, "input", " Answer in French.")
        if replica_of(s.session_id):
            accepted &= http_control(router.http_url, s.session_id, "status")
            accepted &= control(router.grpc_url, s.session_id, "status")
        cancelled = ctl(url, s.session_id, "cancel") if i % 2 == 0 else None
        return accepted, cancelled

    with ThreadPoolExecutor(len(sessions)) as pool:
        outcomes = list(pool.map(push_then_maybe_cancel, enumerate(sessions)))
    assert all(accepted for accepted, _ in outcomes), outcomes
    assert all(c for _, c in outcomes[::2]), outcomes
    for s in sessions[::2]:
        assert s.wait(60), f"cancelled session {s.session_id} did not end"
    # No cancel reached a session it was not meant for: the others still run, and end on
    # their own cancel.
    for s in sessions[1::2]:
        ctl, url = (
            (http_control, router.http_url)
            if isinstance(s, HttpStreamSession)
            else (control, router.grpc_url)
        )
        assert not s.done.is_set() and ctl(url, s.session_id, "status"), (s.session_id, s.finish)
        assert ctl(url, s.session_id, "cancel"), s.session_id
    for s in sessions:
        assert s.wait(60), f"session {s.session_id} did not finish"
        assert s.error is None, s.error
        assert s.finish.get("output") == "cancelled", (s.session_id, s.finish)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_project_client_routes_push_and_cancel(replicas, router, protocol):
    """The project's client (its own client-chosen ids) sends the header: push and cancel land."""
    url = router.grpc_url if protocol == "grpc" else router.http_url

    def one(i: int) -> tuple[bool, bool, Done]:
        with MultiStreamClient(url, protocol=protocol) as mc:
            gen = mc.generate(f"{PROMPT} [{i}]", max_tokens=96, ignore_eos=True)
            events = iter(gen)
            next(e for e in events if isinstance(e, StreamDelta))
            pushed = mc.push_input(gen.session_id, " Answer in French.")
            cancelled = mc.cancel(gen.session_id)
            done = [e for e in events if isinstance(e, Done)]
            return pushed, cancelled, done[-1]

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(one, range(4)))
    for pushed, cancelled, done in outcomes:
        assert pushed and cancelled, outcomes
        assert done.finish_reasons.get("output") == "cancelled", done.finish_reasons


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client_routes_push_and_cancel(replicas, router, protocol):
    """The same through the asyncio client (its own gRPC stream call and aiohttp)."""
    url = router.grpc_url if protocol == "grpc" else router.http_url

    async def one(mc: AsyncMultiStreamClient, i: int) -> tuple[bool, bool, Done]:
        gen = mc.generate(f"{PROMPT} <{i}>", max_tokens=96, ignore_eos=True)
        events = gen.__aiter__()
        while not isinstance(await events.__anext__(), StreamDelta):
            pass
        pushed = await mc.push_input(gen.session_id, " Answer in French.")
        cancelled = await mc.cancel(gen.session_id)
        done = [e async for e in events if isinstance(e, Done)]
        return pushed, cancelled, done[-1]

    async def main() -> list[tuple[bool, bool, Done]]:
        async with AsyncMultiStreamClient(url, protocol=protocol) as mc:
            return await asyncio.gather(*(one(mc, i) for i in range(4)))

    for pushed, cancelled, done in asyncio.run(main()):
        assert pushed and cancelled
        assert done.finish_reasons.get("output") == "cancelled", done.finish_reasons


def test_round_robin_control_misroutes_session_requests(replicas):
    """The control: a plain round-robin balancer sends session_control to the wrong replica."""
    with start_router(_replica_specs(replicas), balance="round_robin") as rr:
        # Long enough to outlive the calls below (a session that ended would read as "misrouted"):
        # no end on EOS, and each alive on its own replica before the round robin starts.
        sessions = _sessions(rr.grpc_url, 4, max_tokens=400, ignore_eos=True)
        for s in sessions:
            assert control(replicas[replica_of(s.session_id)].grpc_url, s.session_id, "status"), s.session_id
        misrouted, reached = [], 0
        for s in sessions:
            for _ in range(2):  # two in a row: round robin sends them to different replicas
                try:
                    reached += control(rr.grpc_url, s.session_id, "status")
                except Exception as e:  # noqa: BLE001 - the server's error is the finding
                    misrouted.append(str(e))
        for s in sessions:
            control(replicas[replica_of(s.session_id)].grpc_url, s.session_id, "cancel")
            assert s.wait(120)
    assert misrouted, "round robin never missed: the control proves nothing"
    assert all("not a running session" in m for m in misrouted), misrouted
    assert reached, "round robin never reached the session either"


def test_locust_through_the_router_spreads_sessions(replicas, router, tmp_path):
    """`python -m load` through the router: zero failures, sessions on both replicas."""
    before = router.routed("ModelStreamInfer")
    out = tmp_path / "load"
    proc = subprocess.run(
        [sys.executable, "-m", "load", "--users", "4", "--seconds", "12", "--url", router.grpc_url,
         "--out", str(out), "--max-tokens", "16", "--reasoning-budget", "16"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    after = router.routed("ModelStreamInfer")
    per_replica = {n: after[h.grpc_url] - before[h.grpc_url] for n, h in replicas.items()}
    assert all(v > 0 for v in per_replica.values()), per_replica
    assert sum(per_replica.values()) >= 4, per_replica


def test_every_promql_expression_returns_data(replicas, prom):
    """Recording rules, alert conditions, adapter queries and dashboard panels all select live series."""
    # The earlier tests made traffic; wait until rates over it and the recorded series exist.
    deadline = time.monotonic() + 60
    while not prom.query("multistream:generated_tokens:rate1m") and time.monotonic() < deadline:
        time.sleep(1)
    rules = yaml.safe_load(rules_file(prom.dir / "check.yaml").read_text())["groups"]
    exprs: list[tuple[str, str]] = []
    for group in rules:
        for rule in group["rules"]:
            if "record" in rule:
                exprs += [(rule["record"], rule["expr"]), (f"recorded {rule['record']}", rule["record"])]
            else:
                exprs += [(f"{rule['alert']} operand", part) for part in promql_operands(rule["expr"])]
    adapter = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    for rule in adapter:
        assert prom.series(rule["seriesQuery"].strip("'")), (
            f"adapter seriesQuery finds nothing: {rule['seriesQuery']}"
        )
        exprs.append((f"adapter {rule['name']['as']}", adapter_query(rule, TEST_NAMESPACE, list(NAMES))))
    exprs += [(f"dashboard {title}", expr) for title, expr in dashboard_queries(TEST_NAMESPACE)]
    empty = {}
    for what, expr in exprs:
        deadline = time.monotonic() + 20
        while not (result := prom.query(expr)) and time.monotonic() < deadline:
            time.sleep(1)
        if not result:
            empty[what] = expr
    assert not empty, f"expressions with no data: {empty}"
    # The HPA asks for exactly the metrics the adapter serves, per pod of both replicas.
    hpa = yaml.safe_load((K8S / "base" / "autoscaling.yaml").read_text())
    asked = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}
    assert asked == {r["name"]["as"] for r in adapter}
    for rule in adapter:
        pods = {s["metric"]["pod"] for s in prom.query(adapter_query(rule, TEST_NAMESPACE, list(NAMES)))}
        assert pods == set(NAMES), (rule["name"]["as"], pods)


def test_drain_waits_for_running_sessions(replicas):
    """The preStop drain returns only once the replica's sessions are done."""
    handle = replicas["r1"]
    drain = K8S / "base" / "server" / "drain.py"
    session = StreamSession(
        handle.grpc_url, PROMPT, max_tokens=120, ignore_eos=True
    )  # outlives the gauge's lag
    assert session.first.wait(120) and session.error is None, session.error
    spec = importlib.util.spec_from_file_location("drain", drain)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    deadline = time.monotonic() + 30  # the gauge lags the engine by its flush period
    while time.monotonic() < deadline:
        with urllib.request.urlopen(handle.metrics_url, timeout=5) as r:
            if module.active_sessions(r.read().decode()) > 0:
                break
        time.sleep(0.3)
    else:
        pytest.fail("multistream_active_sessions never showed the running session")
    proc = subprocess.run(
        [sys.executable, str(drain), "--metrics-url", handle.metrics_url, "--timeout", "120", "--period", "0.5"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert session.done.is_set(), "drain returned while the session was still running"
    assert session.wait(5) and session.finish.get("output") in ("stop", "length"), session.finish
    assert "no active sessions" in proc.stdout


def test_killed_replica_fails_its_sessions_only(replicas, router):
    """One replica killed mid-run: its sessions end with a clear error, the other's finish, new ones go on."""
    sessions = _sessions(router.grpc_url, 4, max_tokens=160, ignore_eos=True)
    by_replica = {n: [s for s in sessions if replica_of(s.session_id) == n] for n in NAMES}
    assert all(by_replica.values()), {n: [s.session_id for s in v] for n, v in by_replica.items()}
    http = [HttpStreamSession(router.http_url, PROMPT, 160, ignore_eos=True) for _ in range(2)]
    for s in http:
        assert s.first.wait(120) and s.error is None, s.error
    victim, survivor = replicas["r0"], replicas["r1"]
    os.killpg(victim.process.pid, signal.SIGKILL)  # tritonserver and its stubs: a lost pod
    victim.process.wait(timeout=30)

    for s in by_replica["r0"]:
        assert s.wait(60), f"{s.session_id}: no end after its replica died"
        assert s.error is not None, f"{s.session_id} on the killed replica ended without an error: {s.finish}"
    for s in by_replica["r1"]:
        assert s.wait(180), f"{s.session_id} on the survivor did not finish"
        assert s.error is None and s.finish.get("output") in ("stop", "length"), (s.error, s.finish)
    # HTTP: the event stream of a lost session breaks off before its last delta (the project's
    # client raises IncompleteStreamError on that); the survivor's ends normally.
    for s in http:
        assert s.wait(180), s.session_id
        lost = replica_of(s.session_id) == "r0"
        assert ("output" not in s.finish) if lost else (s.finish.get("output") in ("stop", "length")), (
            s.session_id,
            s.finish,
            s.error,
        )
    # A later request for a lost session gets the router's clear answer, not some other
    # replica's "unknown session".
    lost = by_replica["r0"][0].session_id
    with pytest.raises(Exception, match="no replica reachable") as err:
        control(router.grpc_url, lost, "status")
    assert "UNAVAILABLE" in str(err.value)
    # New sessions go to the survivor, with no failure.
    fresh = _sessions(router.grpc_url, 3, max_tokens=8)
    for s in fresh:
        assert s.wait(120) and s.error is None, s.error
        assert replica_of(s.session_id) == "r1", s.session_id
    assert survivor.alive() and not survivor.dead_stubs(), survivor.log_tail(40)
