"""Guards the Triton mechanics the product relies on, with a tiny throw-away repository.

A real tritonserver (from the nvidia-pytriton wheel) serves ``smoke_ensemble``:
a plain python step, then a decoupled model that streams its own deltas and,
through BLS on a background thread, those of a second decoupled model. If this
fails, the real ``multistream`` ensemble cannot work either, whatever the engine.
"""

from __future__ import annotations

import json
import queue
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from launcher.serve import ServerHandle, start_server

REPO = Path(__file__).parent / "triton_smoke_repo"
N = 3

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def smoke_server():
    with start_server(REPO, model_dir="none", ready_timeout=120) as handle:
        yield handle


def _check_streams(events: list[tuple[float, str, str]]) -> None:
    """Both streams arrive, fast deltas are not held back by the slow ones."""
    fast = [(t, txt) for t, s, txt in events if s == "fast"]
    slow = [(t, txt) for t, s, txt in events if s == "slow"]
    assert [txt for _, txt in fast] == [f"fast {i} HELLO" for i in range(N)]  # also proves smoke_pre ran
    assert [txt for _, txt in slow] == [f"slow {i} HELLO" for i in range(N)]
    assert fast[-1][0] < slow[-1][0], "the fast stream waited for the slow (BLS) stream"


def test_server_up(smoke_server: ServerHandle) -> None:
    assert set(smoke_server.models) == {"smoke_pre", "smoke_fast", "smoke_slow", "smoke_ensemble"}
    with urllib.request.urlopen(smoke_server.metrics_url, timeout=5) as r:
        assert b"nv_inference_request_success" in r.read()


def test_grpc_stream(smoke_server: ServerHandle) -> None:
    import tritonclient.grpc as grpcclient

    results: queue.Queue = queue.Queue()

    def callback(q: queue.Queue, result, error) -> None:
        q.put((time.monotonic(), result, error))

    client = grpcclient.InferenceServerClient(smoke_server.grpc_url)
    text = grpcclient.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"hello"]], dtype=object))
    max_tokens = grpcclient.InferInput("max_tokens", [1, 1], "INT32")
    max_tokens.set_data_from_numpy(np.array([[N]], dtype=np.int32))
    client.start_stream(callback=partial(callback, results))
    try:
        client.async_stream_infer("smoke_ensemble", [text, max_tokens], enable_empty_final_response=True)
        events = []
        while True:
            t, result, error = results.get(timeout=30)
            assert error is None, error
            params = result.get_response().parameters
            final = params["triton_final_response"].bool_param
            if result.as_numpy("text_output") is not None:
                events.append(
                    (
                        t,
                        result.as_numpy("stream_name")[0, 0].decode(),
                        result.as_numpy("text_output")[0, 0].decode(),
                    )
                )
            if final:
                break
    finally:
        client.stop_stream()
        client.close()
    _check_streams(events)


def test_http_generate_stream(smoke_server: ServerHandle) -> None:
    body = json.dumps({"text_input": "hello", "max_tokens": N}).encode()
    req = urllib.request.Request(
        f"http://{smoke_server.http_url}/v2/models/smoke_ensemble/generate_stream",
        data=body,
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    events = []
    with urllib.request.urlopen(req, timeout=30) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = json.loads(line[5:])
            assert "error" not in data, data
            events.append((time.monotonic(), data["stream_name"], data["text_output"]))
    _check_streams(events)


def test_bad_input_is_an_error_not_a_hang(smoke_server: ServerHandle) -> None:
    body = json.dumps({"max_tokens": N}).encode()  # text_input missing
    req = urllib.request.Request(
        f"http://{smoke_server.http_url}/v2/models/smoke_ensemble/generate_stream", data=body, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400


def test_render_pbtxt_replaces_instance_group_and_merges_parameters() -> None:
    """No server: the rendering that every real config.pbtxt goes through."""
    from launcher.deploy_config import DeployConfig, render_pbtxt

    src = (
        'name: "decode"\nbackend: "python"\n'
        "instance_group [ { count: 4 kind: KIND_GPU } ]\n"
        'parameters [ { key: "keep" value: { string_value: "a\\"b" } }, '
        '{ key: "threads" value: { string_value: "9" } } ]\n'
        'input [ { name: "x" data_type: TYPE_INT32 dims: [ 1 ] } ]  # parameters { } in a comment\n'
    )
    cfg = DeployConfig(cores=4).merged({"instances": {"decode": 2, "reasoning": 1, "prefill": 1}})
    assert cfg.threads_for("decode") == 2 and cfg.threads_for("preprocessing") == 1  # 4 cores / 2 instances
    assert cfg.threads_for("prefill") == 4 and cfg.threads_for("reasoning") == 2  # reasoning: half
    two_cores = DeployConfig(cores=2)
    assert [two_cores.threads_for(m) for m in ("decode", "prefill", "reasoning")] == [2, 2, 1]
    # More torch threads than cores: OpenMP workers must not spin (they steal other stubs' cores).
    assert two_cores.openmp_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    one_each = two_cores.merged({"threads": {"decode": 1, "prefill": 1, "reasoning": 1}})
    assert one_each.openmp_env() == {}  # 1 thread each: no parallel regions
    fits = DeployConfig(cores=8).merged({"threads": {"decode": 4, "prefill": 2, "reasoning": 2}})
    assert fits.openmp_env() == {}  # 4 + 2 + 2 threads on 8 cores
    out = render_pbtxt(src, 2, "KIND_CPU", cfg.model_params("decode"))
    assert "count: 4" not in out and "instance_group [ { count: 2 kind: KIND_CPU } ]" in out
    assert 'key: "keep" value: { string_value: "a\\"b" }' in out
    assert 'key: "threads" value: { string_value: "2" }' in out and '"9"' not in out
    assert 'input [ { name: "x"' in out


def test_python_thread_pool_holds_every_live_bls_call(smoke_server: ServerHandle) -> None:
    """Triton's python backend pins a pool thread per live BLS call, and a decoupled stub's
    every response needs one too (DeployConfig.python_thread_pool): the pool must hold every
    session decode may keep, on every decode instance, plus the default's 32."""
    from launcher.deploy_config import DeployConfig

    assert DeployConfig().python_thread_pool() == 1 * (32 + 16) + 32  # default: 32 sessions + 16 queued
    two = DeployConfig(max_sessions=8).merged(
        {"instances": {"decode": 2}, "parameters": {"decode": {"max_queued": "4"}}}
    )
    assert two.python_thread_pool() == 2 * (8 + 4) + 32
    assert "python,thread-pool-size=56" in two.backend_configs()
    mine = DeployConfig(backend_config=["python,thread-pool-size=200"])
    assert [c for c in mine.backend_configs() if "thread-pool-size" in c] == ["python,thread-pool-size=200"]
    # The running server got it.
    cmdline = Path(f"/proc/{smoke_server.process.pid}/cmdline").read_bytes().split(b"\0")
    want = f"python,thread-pool-size={smoke_server.config.python_thread_pool()}".encode()
    assert want in cmdline, cmdline


def test_cli_serves_and_stops_on_sigterm() -> None:
    """`python -m launcher` prints the endpoints, and SIGTERM stops tritonserver and its stubs."""
    import signal
    import subprocess
    import sys

    from launcher.serve import free_port

    ports = [str(free_port()) for _ in range(3)]
    cmd = [sys.executable, "-m", "launcher", "--model-repository", str(REPO), "--model-dir", "none"]
    cmd += [
        "--address",
        "127.0.0.1",
        "--grpc-port",
        ports[0],
        "--http-port",
        ports[1],
        "--metrics-port",
        ports[2],
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)
            if "Ctrl-C to stop" in line:
                break
        out = "".join(lines)
        assert f"127.0.0.1:{ports[0]}" in out and "/metrics" in out, out
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/ready", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/v2/health/live", timeout=2)
