"""deploy/ checked offline: every manifest against the Kubernetes schema, the rules with promtool,
the router config with nginx, the pieces against each other (issue 15).

No cluster needed: ``kubectl kustomize`` renders the overlays (kubectl ships its own kustomize),
``kubernetes-validate`` holds the API schemas, Debian's ``promtool`` and ``nginx`` check the rest.
The live checks (every PromQL expression returns data, the router in front of real servers)
are tests/test_deploy_replicas.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from backend.serving import session_ids
from deploy.router import ROUTING_TEMPLATE, Replica, find_nginx, render_config, render_pool, substitute
from launcher.serve import FRONT_PROTOCOL
from tests.deploy_helpers import K8S, MONITORING, promql_operands, rules_file

#: The Kubernetes version the manifests are checked against (autoscaling/v2, StatefulSet
#: ordinals and the sidecar-era fields all exist from 1.27 on).
K8S_VERSION = "1.30"
REPO_ROOT = Path(__file__).resolve().parent.parent
KUSTOMIZATIONS = ["overlays/cpu", "overlays/gpu", "monitoring"]
#: Custom resources of the Prometheus Operator: not in the Kubernetes schema, checked by hand below.
CRDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}


def render(kustomization: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed to render the kustomizations (kubectl kustomize)")
    proc = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_validate_against_the_kubernetes_schema(kustomization):
    docs = render(kustomization)
    assert docs
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{kustomization}: {doc['kind']}/{doc['metadata']['name']}: {e.message} at {list(e.path)}"
            )


def _by_kind(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


def test_base_wires_replicas_router_and_autoscaler_together():
    """Names and ports that must agree across manifests (a typo would only show in a cluster)."""
    kinds = _by_kind(render("overlays/cpu"))
    (sts,) = kinds["StatefulSet"]
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    pod = sts["spec"]["template"]["spec"]
    (triton,) = pod["containers"]
    env = {e["name"]: e for e in triton["env"]}
    # The replica name minted into ids is the pod name, whose DNS label the governing Service gives.
    assert env[session_ids.REPLICA_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    governing = services[sts["spec"]["serviceName"]]
    assert governing["spec"]["clusterIP"] == "None" and governing["spec"]["publishNotReadyAddresses"] is True
    assert services["multistream-ready"]["spec"]["clusterIP"] == "None"
    assert not services["multistream-ready"]["spec"].get("publishNotReadyAddresses")
    for svc in (governing, services["multistream-ready"]):
        assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"mountPath": "/dev/shm", "name": "dshm"} in triton["volumeMounts"]
    assert pod["terminationGracePeriodSeconds"] > 290  # the drain's --timeout
    # The router's env names the two Services and fills every ${VAR} of its templates.
    router = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "multistream-router")
    (nginx,) = router["spec"]["template"]["spec"]["containers"]
    renv = {e["name"]: e.get("value") for e in nginx["env"]}
    assert renv["MS_REPLICA_SERVICE"] == governing["metadata"]["name"]
    assert renv["MS_READY_SERVICE"] == "multistream-ready"
    (cm,) = [c for c in kinds["ConfigMap"] if c["metadata"]["name"].startswith("multistream-router")]
    needed = set()
    for text in cm["data"].values():
        needed |= set(re.findall(r"\$\{([A-Z0-9_]+)\}", text))
    # The nginx image's entrypoint sets NGINX_LOCAL_RESOLVERS (from resolv.conf) when asked to.
    provided = renv.keys() | (
        {"NGINX_LOCAL_RESOLVERS"} if renv.get("NGINX_ENTRYPOINT_LOCAL_RESOLVERS") else set()
    )
    assert needed <= provided, f"router templates need {needed - provided} from the env"
    assert cm["data"]["routing.conf.template"] == ROUTING_TEMPLATE.read_text()
    # The OpenAI front talks to the router (its HTTP port, the launcher's protocol), so its
    # session requests are routed too.
    front = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "multistream-openai")
    (fc,) = front["spec"]["template"]["spec"]["containers"]
    router_svc = services["multistream"]
    assert router_svc["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
    triton_arg = fc["args"][fc["args"].index("--triton") + 1]
    assert triton_arg == f"{router_svc['metadata']['name']}:8000"
    assert fc["args"][fc["args"].index("--protocol") + 1] == FRONT_PROTOCOL
    assert {p["port"] for p in router_svc["spec"]["ports"]} == {8000, 8001}
    # The autoscaler scales the StatefulSet.
    (hpa,) = kinds["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": "multistream",
    }


def test_gpu_overlay_asks_for_a_gpu_and_gpu_instances():
    (sts,) = _by_kind(render("overlays/gpu"))["StatefulSet"]
    (triton,) = sts["spec"]["template"]["spec"]["containers"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"name": "INSTANCE_KIND", "value": "KIND_GPU"} in triton["env"]
    # The image's entrypoint (MPS, CUDA pool) serves; it exists in the checkout the image is built from.
    entry = Path(triton["command"][0])
    assert entry.parts[:3] == ("/", "opt", "multistream")
    assert (REPO_ROOT / Path(*entry.parts[3:])).is_file(), entry
    assert triton["args"][0] == "serve"
    (cpu,) = _by_kind(render("overlays/cpu"))["StatefulSet"]
    assert {"name": "INSTANCE_KIND", "value": "KIND_CPU"} in cpu["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]


def test_monitoring_resources_match_the_replicas():
    kinds = _by_kind(render("monitoring"))
    (sts,) = _by_kind(render("overlays/cpu"))["StatefulSet"]
    labels = sts["spec"]["template"]["metadata"]["labels"]
    (pm,) = kinds["PodMonitor"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert labels[pm["spec"]["jobLabel"]] == "multistream"  # job="multistream" in every rule
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    (rule,) = kinds["PrometheusRule"]
    assert rule["spec"] == yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())["spec"]
    (dash_cm,) = kinds["ConfigMap"]
    assert dash_cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_rules_pass_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is needed (scripts/setup.sh installs Debian's prometheus)")
    path = rules_file(tmp_path / "rules.yaml")
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The adapter's queries and the dashboard's are plain PromQL too: a rules file of records checks them.
    exprs = _adapter_and_dashboard_exprs()
    records = {
        "groups": [
            {"name": "check", "rules": [{"record": f"check:{i}", "expr": e} for i, e in enumerate(exprs)]}
        ]
    }
    (tmp_path / "exprs.yaml").write_text(yaml.safe_dump(records))
    proc = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "exprs.yaml")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _adapter_and_dashboard_exprs() -> list[str]:
    from tests.deploy_helpers import adapter_query, dashboard_queries

    adapter = yaml.safe_load((MONITORING / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    return [adapter_query(r, "ns", ["p-0", "p-1"]) for r in adapter] + [e for _, e in dashboard_queries("ns")]


def test_dashboard_shows_what_the_issue_asks_for():
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in (
        "multistream_time_to_first_token_ms_bucket",
        "multistream_inter_token_latency_ms_bucket",
        "multistream_generated_tokens_total",
        "multistream_active_sessions",
        "multistream_kv_cache_used_tokens",
    ):
        assert metric in exprs, metric
    assert "by (stream_kind" in exprs
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace"}


def test_metric_names_in_rules_exist_in_the_server():
    """Every multistream_* family the rules, adapter and dashboard read is one the server exports."""
    from backend.serving.metrics import FAMILIES

    exported = {name for name, _, _ in FAMILIES.values()}
    texts = [(MONITORING / f).read_text() for f in ("prometheusrule.yaml", "dashboard.json")]
    used = set()
    for text in texts:
        used |= set(re.findall(r"\b(multistream_[a-z_]+?)(?:_bucket|_sum|_count)?\b(?=[{\[(\s)])", text))
    assert used and used <= exported, used - exported


def test_promql_operands_cut_alert_conditions():
    assert promql_operands("a > 0.9") == ["a"]
    assert promql_operands('up{job="x"} == 0') == ['up{job="x"}']
    assert promql_operands("a > 0 unless on (namespace, pod) sum by (pod) (rate(b[5m])) > 0") == [
        "a",
        "sum by (pod) (rate(b[5m]))",
    ]


# -- the router config ---------------------------------------------------------------------
REPLICAS = [
    Replica("r0", "127.0.0.1:18001", "127.0.0.1:18000"),
    Replica("r1", "127.0.0.1:19001", "127.0.0.1:19000"),
]


@pytest.mark.parametrize("balance", ["session", "round_robin"])
def test_router_config_passes_nginx_t(tmp_path, balance):
    nginx = find_nginx()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        render_config(REPLICAS, grpc_port=17001, http_port=17000, run_dir=tmp_path, balance=balance)
    )
    proc = subprocess.run([nginx, "-t", "-p", str(tmp_path), "-c", str(conf)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_router_pattern_is_the_minted_id_pattern():
    """The nginx map and session_ids.MINTED_RE must agree on what a minted id is."""
    text = ROUTING_TEMPLATE.read_text()
    (pattern,) = set(re.findall(r'"~\^\(\?<ms_name>(.+?)\)\\\.\[0-9a-f\]\{32\}\$"', text))
    assert pattern == session_ids.MINTED_RE.pattern.split(")\\.")[0].removeprefix("(?P<replica>")
    # ... and the route map sends exactly those ids down the pinned route.
    assert re.search(r'"~\^' + re.escape(pattern) + r'\\\.\[0-9a-f\]\{32\}\$"\s+pinned;', text)
    minted = session_ids.mint_session_id({session_ids.REPLICA_ENV: "multistream-3"})
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.[0-9a-f]{32}", minted)


def test_render_pool_refuses_bad_replicas():
    with pytest.raises(ValueError, match="unique"):
        render_pool([REPLICAS[0], REPLICAS[0]])
    with pytest.raises(ValueError, match="DNS label"):
        Replica("R_0", "127.0.0.1:1", "127.0.0.1:2")
    with pytest.raises(ValueError, match="host:port"):
        Replica("r0", "127.0.0.1", "127.0.0.1:2")
    with pytest.raises(ValueError, match="balance"):
        render_pool(REPLICAS, "random")
    with pytest.raises(KeyError, match="MS_GRPC_PORT"):
        substitute("listen ${MS_GRPC_PORT};", {})
    assert substitute("a $nginx_var ${X}", {"X": "1"}) == "a $nginx_var 1"


def test_kubernetes_pool_template_fills_from_the_router_env():
    text = (K8S / "base" / "router" / "pool.conf.template").read_text()
    for upstream in ("ms_grpc_least", "ms_grpc_hash", "ms_http_least", "ms_http_hash"):
        assert f"upstream {upstream} " in text
    for var in ("ms_pinned_grpc", "ms_pinned_http"):
        assert f"map $ms_replica ${var} " in text


# -- session ids ---------------------------------------------------------------------------
def test_session_ids_name_their_replica():
    env = {session_ids.REPLICA_ENV: "multistream-1"}
    sid = session_ids.mint_session_id(env)
    assert sid.startswith("multistream-1.") and session_ids.replica_of(sid) == "multistream-1"
    assert session_ids.mint_session_id(env) != sid
    bare = session_ids.mint_session_id({})
    assert re.fullmatch(r"[0-9a-f]{32}", bare) and session_ids.replica_of(bare) is None
    assert session_ids.replica_of("my-chat-42") is None  # a client's own id: hashed by the router
    with pytest.raises(ValueError, match="MULTISTREAM_REPLICA must be a DNS label"):
        session_ids.mint_session_id({session_ids.REPLICA_ENV: "bad_name!"})


def test_minted_ids_pass_request_validation():
    from backend.serving.request import _valid_session_id

    assert _valid_session_id(session_ids.mint_session_id({session_ids.REPLICA_ENV: "a" * 63}))


def test_drain_counts_decode_sessions_only():
    import importlib.util

    spec = importlib.util.spec_from_file_location("drain", K8S / "base" / "server" / "drain.py")
    drain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drain)
    text = (
        "# HELP multistream_active_sessions x\n"
        'multistream_active_sessions{model="decode",instance="decode_0_0"} 2\n'
        'multistream_active_sessions{model="decode",instance="decode_0_1"} 1\n'
        'multistream_active_sessions{model="reasoning",instance="reasoning_0_0"} 5\n'
    )
    assert drain.active_sessions(text) == 3
    assert drain.active_sessions("") == 0
    assert drain.drain("http://127.0.0.1:9/metrics", timeout=1, period=0.1) == 0  # server gone: done


def test_k8s_dir_has_no_stray_files():
    """Every file under deploy/k8s is a kustomization or used by one (or the adapter's values)."""
    used = {MONITORING / "prometheus-adapter-values.yaml"}
    for k in ["base", *KUSTOMIZATIONS]:
        kdir = K8S / k
        kust = yaml.safe_load((kdir / "kustomization.yaml").read_text())
        used.add(kdir / "kustomization.yaml")
        used |= {kdir / entry for entry in kust.get("resources", []) if not entry.startswith("..")}
        used |= {kdir / p["path"] for p in kust.get("patches", [])}
        used |= {kdir / f for gen in kust.get("configMapGenerator", []) for f in gen.get("files", [])}
    files = {p for p in K8S.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert files == used, {
        "unused": sorted(map(str, files - used)),
        "missing": sorted(map(str, used - files)),
    }
