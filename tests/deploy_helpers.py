"""Helpers of the deployment tests: a gRPC session through the router, a local Prometheus, PromQL parts.

Why here and not in deploy/: they drive the real parts (tritonclient, Debian's prometheus)
the way a user's client and a cluster's Prometheus would, for tests only.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import yaml

from client.core import ROUTING_HEADER

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
K8S = DEPLOY / "k8s"
MONITORING = K8S / "monitoring"
#: What the PodMonitor's targets carry in a cluster; the local Prometheus adds the same.
TEST_NAMESPACE = "multistream-test"


def tensor(name: str, value: Any, dtype: str) -> grpcclient.InferInput:
    np_dtype = {"BYTES": object, "INT32": np.int32, "BOOL": bool, "FP32": np.float32}[dtype]
    t = grpcclient.InferInput(name, [1, 1], dtype)
    t.set_data_from_numpy(np.array([[value]], dtype=np_dtype))
    return t


class StreamSession:
    """One ``multistream`` generation over a gRPC stream, recording what came back."""

    def __init__(
        self,
        url: str,
        prompt: str,
        max_tokens: int,
        *,
        session_id: str | None = None,
        ignore_eos: bool = False,
    ) -> None:
        self.url = url
        self.client = grpcclient.InferenceServerClient(url)
        self.session_id = session_id
        self.first = threading.Event()
        self.done = threading.Event()
        self.finish: dict[str, str] = {}
        self.error: Exception | None = None
        self.tokens = 0
        inputs = [
            tensor("text_input", prompt.encode(), "BYTES"),
            tensor("max_tokens", max_tokens, "INT32"),
            tensor("stream", True, "BOOL"),
        ]
        if ignore_eos:  # a session that must outlive what the test does with it
            inputs.append(tensor("ignore_eos", True, "BOOL"))
        if session_id:
            inputs.append(tensor("session_id", session_id.encode(), "BYTES"))
        headers = {ROUTING_HEADER: session_id} if session_id else None
        self.client.start_stream(callback=self._on_response, headers=headers)
        self.client.async_stream_infer("multistream", inputs, enable_empty_final_response=True)

    def _on_response(self, result: Any, error: Exception | None) -> None:
        if error is not None:
            self.error = error
            self.first.set()
            self.done.set()
            return
        sid = result.as_numpy("output_session_id")
        if sid is not None:
            self.session_id = sid.reshape(-1)[0].decode()
            ids = result.as_numpy("output_ids")
            self.tokens += 0 if ids is None else ids.size
            self.first.set()
            reason = result.as_numpy("finish_reason").reshape(-1)[0].decode()
            if reason:
                self.finish[result.as_numpy("stream_name").reshape(-1)[0].decode()] = reason
        params = result.get_response().parameters
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            self.done.set()

    def wait(self, timeout: float) -> bool:
        ok = self.done.wait(timeout)
        self.close()
        return ok

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.stop_stream(cancel_requests=not self.done.is_set())
        with contextlib.suppress(Exception):
            self.client.close()


def control(url: str, session_id: str, action: str, text: str = "") -> bool:
    """One ``session_control`` call through ``url``; raises the server's (or router's) error."""
    inputs = [tensor("session_id", session_id.encode(), "BYTES"), tensor("action", action.encode(), "BYTES")]
    if text:
        inputs.append(tensor("text_input", text.encode(), "BYTES"))
    with grpcclient.InferenceServerClient(url) as client:
        result = client.infer("session_control", inputs, headers={ROUTING_HEADER: session_id})
    return bool(result.as_numpy("accepted").reshape(-1)[0])


class HttpStreamSession:
    """One ``multistream`` generation over HTTP ``generate_stream`` (server-sent events), on a thread."""

    def __init__(
        self,
        url: str,
        prompt: str,
        max_tokens: int,
        *,
        session_id: str | None = None,
        ignore_eos: bool = False,
    ) -> None:
        self.session_id = session_id
        self.first = threading.Event()
        self.done = threading.Event()
        self.finish: dict[str, str] = {}
        self.error: Exception | None = None
        body: dict[str, Any] = {"text_input": prompt, "max_tokens": max_tokens, "stream": True}
        if ignore_eos:
            body["ignore_eos"] = True
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if session_id:
            body["session_id"] = session_id
            headers[ROUTING_HEADER] = session_id
        self._request = urllib.request.Request(
            f"http://{url}/v2/models/multistream/generate_stream", json.dumps(body).encode(), headers
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            with urllib.request.urlopen(self._request, timeout=300) as resp:
                for raw in resp:
                    line = raw.decode().strip()
                    if not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        raise RuntimeError(event["error"])
                    self.session_id = event.get("output_session_id", self.session_id)
                    self.first.set()
                    if event.get("finish_reason"):
                        self.finish[event["stream_name"]] = event["finish_reason"]
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            self.error = e
        finally:
            self.first.set()
            self.done.set()

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


def http_control(url: str, session_id: str, action: str, text: str = "") -> bool:
    """One ``session_control`` call over HTTP ``infer`` with the routing header; raises on an error."""
    inputs = [
        {"name": "session_id", "shape": [1, 1], "datatype": "BYTES", "data": [session_id]},
        {"name": "action", "shape": [1, 1], "datatype": "BYTES", "data": [action]},
    ]
    if text:
        inputs.append({"name": "text_input", "shape": [1, 1], "datatype": "BYTES", "data": [text]})
    request = urllib.request.Request(
        f"http://{url}/v2/models/session_control/infer",
        json.dumps({"inputs": inputs}).encode(),
        {"Content-Type": "application/json", ROUTING_HEADER: session_id},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            out = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code}: {e.read().decode()}") from None
    return bool(out["outputs"][0]["data"][0])


def rules_file(dest: Path, interval: str | None = None) -> Path:
    """The PrometheusRule's ``spec`` as a plain rules file (what promtool and Prometheus read)."""
    doc = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    spec = doc["spec"]
    if interval:
        for group in spec["groups"]:
            group["interval"] = interval
    dest.write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """Debian's prometheus scraping given /metrics targets every second, with the project's rules."""

    def __init__(self, targets: dict[str, str]) -> None:
        """``targets``: ``{pod name: "host:port"}`` of Triton metrics endpoints."""
        self.dir = Path(tempfile.mkdtemp(prefix="multistream-prom-"))
        self.port = _free_port()
        rules = rules_file(self.dir / "rules.yaml", interval="1s")
        # As a PodMonitor with jobLabel app.kubernetes.io/name labels the targets in a cluster.
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": "multistream",
                    "static_configs": [
                        {"targets": [addr], "labels": {"namespace": TEST_NAMESPACE, "pod": pod}}
                        for pod, addr in targets.items()
                    ],
                }
            ],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                shutil.which("prometheus") or "/usr/bin/prometheus",
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prometheus did not start:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (an error from Prometheus raises)."""
        try:
            data = self.api("query", query=expr)
        except urllib.error.HTTPError as e:
            raise AssertionError(f"prometheus refused {expr!r}: {e.read().decode()}") from None
        assert data["resultType"] == "vector", (expr, data)
        return data["result"]

    def series(self, match: str) -> list[dict[str, str]]:
        return self.api("series", **{"match[]": match})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def prometheus(targets: dict[str, str]) -> Iterator[Prometheus]:
    prom = Prometheus(targets)
    try:
        yield prom
    finally:
        prom.stop()


_COMPARISON = re.compile(r"\s(?:>|<|>=|<=|==|!=)\s*(?:bool\s+)?[-+]?[0-9.]+(?:e[-+]?\d+)?(?=\s|$)")
_SET_OP = re.compile(r"\s(?:unless|and|or)\s+(?:(?:on|ignoring)\s*\([^)]*\)\s*)?")


def promql_operands(expr: str) -> list[str]:
    """The series an alert condition is made of: its text cut at set operators, thresholds dropped.

    Why: an alert's expression is empty while it does not fire, so "returns data" is asked
    of what it compares (``a > 0.9 unless on (pod) b > 0`` -> ``a``, ``b``).
    """
    parts = _SET_OP.split(" ".join(expr.split()))
    return [_COMPARISON.sub("", p).strip() for p in parts if p.strip()]


def adapter_query(rule: dict[str, Any], namespace: str, pods: list[str]) -> str:
    """A prometheus-adapter ``metricsQuery`` as the adapter expands it for pods of a namespace."""
    series = rule["seriesQuery"].split("{", 1)[0].strip("'\" ")
    matchers = f'namespace="{namespace}",pod=~"{"|".join(pods)}"'
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", matchers)
        .replace("<<.GroupBy>>", "pod")
    )


def dashboard_queries(namespace: str) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target of the Grafana dashboard, variables filled in."""
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$namespace", namespace).replace("$__rate_interval", "1m")
            out.append((panel["title"], expr))
    return out
