"""Start tritonserver on a rendered copy of ``model_repository/`` (``python -m launcher``).

Why a launcher and not a bare ``tritonserver`` command: without the Triton
container the server comes from the nvidia-pytriton wheel and needs a backend
directory and LD_LIBRARY_PATH built for this interpreter (``launcher.triton_env``),
and instance counts / threads / engine parameters must be written into every
config.pbtxt from one place (``launcher.deploy_config``).

Importable API (tests, benchmarks, load runner)::

    with start_server(decode_instances=2, threads={"decode": 1}) as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_url)
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from backend.serving import heartbeat
from launcher import gpu
from launcher.deploy_config import HEAVY_MODELS, DeployConfig, is_ensemble, render_pbtxt
from launcher.triton_env import build_backend_dir, check_numpy, find_triton, server_env

REPO_ROOT = Path(__file__).resolve().parent.parent
#: A stub whose heartbeat is older than this is hung (``ServerHandle.hung_stubs``): 30 beats
#: missed; a stub starved of CPU on a loaded machine still beats within seconds.
HUNG_STUB_S = 30.0
DEFAULT_REPOSITORY = REPO_ROOT / "model_repository"

_LOG_FLAGS = {
    "error": ["--log-info", "false", "--log-warning", "false", "--log-error", "true"],
    "warning": ["--log-info", "false", "--log-warning", "true", "--log-error", "true"],
    "info": ["--log-info", "true", "--log-warning", "true", "--log-error", "true"],
    "verbose": ["--log-info", "true", "--log-warning", "true", "--log-error", "true", "--log-verbose", "1"],
}


class ServerError(RuntimeError):
    """tritonserver failed to start or to load a model; the message carries the log tail."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (bind to 0 and release; fine for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def list_models(repository: Path) -> list[str]:
    """Model names in a repository: sub-directories holding a config.pbtxt."""
    return sorted(p.parent.name for p in repository.glob("*/config.pbtxt"))


def model_dir_for_render(spec: str) -> str:
    """The ``model_dir`` parameter to render from ``--model-dir``: a folder's path, or '' for 'none'.

    'default' converts/caches the default model once (``backend.model_store.resolve_model_dir``);
    'none' renders no model files (smoke repositories). Model errors become a ServerError.
    """
    if spec in ("", "none"):
        return ""
    from backend.model_store import ModelFilesError, resolve_model_dir

    try:
        return str(resolve_model_dir(spec))
    except (ModelFilesError, OSError) as e:
        raise ServerError(f"--model-dir {spec}: {e}") from e


#: Other names the ``multistream`` ensemble is served under: ``ensemble`` is the one every
#: TensorRT-LLM client script defaults to (NVIDIA's ``end_to_end_grpc_client.py`` accepts only
#: it and ``tensorrt_llm_bls``). An alias is the same config rendered under another name,
#: never a second file to keep in step.
ENSEMBLE_ALIASES = {"ensemble": "multistream"}


#: Models whose ``input [...]`` block is rendered from another model's config: the
#: client-facing ``tensorrt_llm_bls`` takes exactly the ensemble's inputs.
DERIVED_INPUTS = {"tensorrt_llm_bls": "multistream"}
_INPUT_BLOCK = re.compile(r"^input \[.*?^\]", re.S | re.M)


def render_aliases(dest: Path) -> list[str]:
    """Write each alias of ``ENSEMBLE_ALIASES`` into the rendered ``dest``, and the input
    blocks of ``DERIVED_INPUTS``; the names of the aliases."""
    for model, source in DERIVED_INPUTS.items():
        target, origin = dest / model / "config.pbtxt", dest / source / "config.pbtxt"
        if target.exists() and origin.exists():
            found = _INPUT_BLOCK.search(origin.read_text(encoding="utf-8"))
            if found is not None:
                text, block = target.read_text(encoding="utf-8"), found.group(0)
                target.write_text(_INPUT_BLOCK.sub(lambda _m, b=block: b, text, count=1), encoding="utf-8")
    out = []
    for alias, target in ENSEMBLE_ALIASES.items():
        config = dest / target / "config.pbtxt"
        if not config.exists() or (dest / alias).exists():
            continue
        text = re.sub(
            r'^name:\s*"[^"]*"', f'name: "{alias}"', config.read_text(encoding="utf-8"), count=1, flags=re.M
        )
        (dest / alias / "1").mkdir(parents=True)
        (dest / alias / "config.pbtxt").write_text(text, encoding="utf-8")
        out.append(alias)
    return out


def render_repository(src: Path, dest: Path, cfg: DeployConfig, kind: str) -> list[str]:
    """Copy ``src`` to ``dest`` and rewrite each config.pbtxt from ``cfg``; return the model names."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    models = list_models(dest)
    if not models:
        raise ServerError(f"no models (no */config.pbtxt) in {src}")
    for name in models:
        path = dest / name / "config.pbtxt"
        text = path.read_text(encoding="utf-8")
        if is_ensemble(text):
            continue
        model_kind = kind if name in HEAVY_MODELS else "KIND_CPU"
        params = {**cfg.model_params(name), **gpu.handoff_params(name, model_kind)}
        text = gpu.render_handoff(text, name, gpu.handoff_type(cfg, kind))
        path.write_text(
            render_pbtxt(text, cfg.instances.get(name, 1), model_kind, params),
            encoding="utf-8",
        )
    return models + render_aliases(dest)


@dataclass
class ServerHandle:
    """A running tritonserver; stop() (or leaving the ``with`` block) shuts it down cleanly."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    http_port: int
    metrics_port: int
    run_dir: Path
    log_path: Path
    models: list[str]
    config: DeployConfig
    keep_run_dir: bool = False
    startup_s: float = 0.0
    initial_stubs: dict[str, int] = field(default_factory=dict)
    #: /dev/shm regions of the stubs at start-up (``stop`` removes any a killed stub left).
    initial_shm_regions: list[str] = field(default_factory=list)
    _stopped: bool = field(default=False, repr=False)

    @property
    def grpc_url(self) -> str:
        """host:port for tritonclient.grpc (no scheme, as tritonclient wants)."""
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port for tritonclient.http (no scheme)."""
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics endpoint."""
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.process.poll() is None

    def stubs(self) -> dict[str, int]:
        """``{instance name: pid}`` of this server's live Python stubs (e.g. ``decode_0_0``)."""
        return python_stubs(self.process.pid)

    def hung_stubs(self, stale_s: float = HUNG_STUB_S) -> list[str]:
        """Live stubs whose heartbeat (``backend.serving.heartbeat``) is older than ``stale_s``.

        Why: a stub that deadlocks in Triton 2.51's python backend (the heartbeat module says
        how) is alive and its model ready, but it never answers again. Only stubs that beat
        (the engine models and the BLS model) are judged.
        """
        folder = self.run_dir / "heartbeats"
        now = time.time()
        hung = []
        for name in self.stubs():
            try:
                age = now - (folder / name).stat().st_mtime
            except OSError:
                continue  # never beat (a light stub), or not yet
            if age > stale_s:
                hung.append(name)
        return sorted(hung)

    def dead_stubs(self) -> list[str]:
        """Instances whose stub died since start-up.

        Why: tritonserver 2.51 neither restarts a dead stub of a decoupled model nor reports
        the model unready (``/v2/health/ready`` stays 200); its requests fail with "Stub
        process ... is not healthy" from then on. The launcher watches this and exits, so
        an orchestrator restarts the server (README, Reliability).
        """
        live = self.stubs()
        return sorted(name for name, pid in self.initial_stubs.items() if live.get(name) != pid)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(
                self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no server log)"

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (Triton unloads models and waits for in-flight requests), then SIGKILL the group.

        Any /dev/shm region of its stubs still there afterwards (a stub that was killed) is removed.
        """
        if self._stopped:
            return self.process.returncode
        self._stopped = True
        regions = set(self.initial_shm_regions) | set(stub_shm_regions(self.process.pid))
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Stubs are in the server's process group; reap any straggler of THIS server only.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for name in regions:  # what a killed stub left behind; a clean stop leaves none
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / name).unlink()
        if not self.keep_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.process.returncode

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stub_cmdlines(server_pid: int) -> dict[int, list[str]]:
    """``{pid: argv}`` of the live ``triton_python_backend_stub`` children of a server (/proc)."""
    out: dict[int, list[str]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) != server_pid or fields[0] == "Z":
                continue
            raw = (proc / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        args = [a.decode(errors="replace") for a in raw if a]
        if args and args[0].endswith("triton_python_backend_stub") and len(args) >= 2:
            out[int(proc.name)] = args
    return out


def python_stubs(server_pid: int) -> dict[str, int]:
    """``{instance name: pid}`` of the live ``triton_python_backend_stub`` children of a server.

    Reads /proc (no psutil on the server side); the instance name is the stub's
    second-to-last argument (``... decode_0_0 DEFAULT``).
    """
    return {args[-2]: pid for pid, args in _stub_cmdlines(server_pid).items()}


def stub_shm_regions(server_pid: int) -> list[str]:
    """Names of the /dev/shm regions of a server's live stubs (each stub's third argument).

    Why: a stub killed with SIGKILL (a server that did not stop within its timeout, a
    crash) cannot unlink its region, and /dev/shm is RAM: 16 MiB or more per stub, for good.
    """
    prefix = "triton_python_backend_shm_region_"
    return sorted(
        {
            a
            for args in _stub_cmdlines(server_pid).values()
            for a in args[1:4]
            if a.startswith(prefix) and "/" not in a
        }
    )


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return 0


def _wait_ready(handle: ServerHandle, timeout: float) -> None:
    base = f"http://{handle.http_url}"
    deadline = time.monotonic() + timeout
    pending = list(handle.models)
    while time.monotonic() < deadline:
        if not handle.alive():
            raise ServerError(
                f"tritonserver exited with code {handle.process.returncode} during start-up; "
                f"log {handle.log_path}:\n{handle.log_tail()}"
            )
        if _get(f"{base}/v2/health/live") == 200:
            pending = [m for m in pending if _get(f"{base}/v2/models/{m}/ready") != 200]
            if not pending and _get(f"{base}/v2/health/ready") == 200:
                return
        time.sleep(0.25)
    raise ServerError(
        f"tritonserver not ready after {timeout:.0f}s (models not ready: {pending}); "
        f"log {handle.log_path}:\n{handle.log_tail()}"
    )


_RUNNING: list[ServerHandle] = []


@atexit.register
def _stop_all() -> None:
    for handle in list(_RUNNING):
        handle.stop(timeout=10)


def build_config(
    *,
    config: DeployConfig | None = None,
    config_file: str | Path | None = None,
    decode_instances: int | None = None,
    reasoning_instances: int | None = None,
    prefill_instances: int | None = None,
    preprocessing_instances: int | None = None,
    instances: dict[str, int] | None = None,
    threads: dict[str, int] | None = None,
    parameters: dict[str, dict[str, str]] | None = None,
    **overrides: object,
) -> DeployConfig:
    """DeployConfig defaults, then ``config``/``config_file``, then the keyword arguments (None = keep)."""
    cfg = DeployConfig.from_file(config_file) if config_file else (config or DeployConfig())
    inst = dict(instances or {})
    for name, value in (
        ("decode", decode_instances),
        ("reasoning", reasoning_instances),
        ("prefill", prefill_instances),
        ("preprocessing", preprocessing_instances),
    ):
        if value is not None:
            inst[name] = value
    cfg = cfg.merged(
        {
            **overrides,
            "instances": inst,
            "threads": threads or {},
            "parameters": parameters or {},
        }
    )
    return cfg


def start_server(
    repository: str | Path = DEFAULT_REPOSITORY,
    *,
    config: DeployConfig | None = None,
    config_file: str | Path | None = None,
    grpc_port: int = 0,
    http_port: int = 0,
    metrics_port: int = 0,
    address: str = "127.0.0.1",
    model_dir: str | None = None,
    dtype: str | None = None,
    kind: str | None = None,
    decode_instances: int | None = None,
    reasoning_instances: int | None = None,
    prefill_instances: int | None = None,
    preprocessing_instances: int | None = None,
    instances: dict[str, int] | None = None,
    threads: dict[str, int] | None = None,
    parameters: dict[str, dict[str, str]] | None = None,
    max_sessions: int | None = None,
    max_context: int | None = None,
    log_level: str | None = None,
    run_dir: str | Path | None = None,
    keep_run_dir: bool = False,
    ready_timeout: float = 300.0,
    extra_args: list[str] | None = None,
) -> ServerHandle:
    """Render ``repository``, start tritonserver, wait until it and every model are ready.

    Port 0 means "pick a free port"; ``address`` is where all three endpoints listen. Settings: DeployConfig defaults, then
    ``config``/``config_file``, then the keyword arguments (None = leave as is).
    Raises ServerError (with the log tail) if the server dies or is not ready in time.
    """
    t0 = time.monotonic()
    install = find_triton()
    check_numpy()
    cfg = build_config(
        config=config,
        config_file=config_file,
        model_dir=model_dir,
        dtype=dtype,
        kind=kind,
        decode_instances=decode_instances,
        reasoning_instances=reasoning_instances,
        prefill_instances=prefill_instances,
        preprocessing_instances=preprocessing_instances,
        instances=instances,
        threads=threads,
        parameters=parameters,
        max_sessions=max_sessions,
        max_context=max_context,
        log_level=log_level,
    )
    if cfg.log_level not in _LOG_FLAGS:
        raise ValueError(f"log_level must be one of {sorted(_LOG_FLAGS)}, not {cfg.log_level!r}")
    from backend.model_store import SHIPPED_ADAPTERS

    if str(cfg.model_dir).strip() in SHIPPED_ADAPTERS:
        # The shipped models are LoRA fine-tunes, whose weight deltas are smaller than an int4
        # step: int4 decode weights round them away (streams-demo, measured: 82% of the answers
        # right with dense weights, 2% with int4).
        cfg.parameters.setdefault("*", {}).setdefault("quantization", "none")
    repository = Path(repository)
    if not list_models(repository):
        raise ServerError(f"no models (no */config.pbtxt) in {repository}")
    cfg.model_dir = model_dir_for_render(cfg.model_dir)
    kind_resolved = cfg.resolved_kind()
    if cfg.model_dir and kind_resolved == "KIND_CPU":
        from backend.kernels import int4

        int4.prebuild(lambda msg: print(msg, file=sys.stderr, flush=True))

    base = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="multistream-run-"))
    base.mkdir(parents=True, exist_ok=True)
    backend_dir = build_backend_dir(base / "backends", install)
    models = render_repository(repository, base / "model_repository", cfg, kind_resolved)
    grpc_port, http_port, metrics_port = (p or free_port() for p in (grpc_port, http_port, metrics_port))
    cmd = [
        str(install.tritonserver),
        "--model-repository", str(base / "model_repository"),
        "--backend-directory", str(backend_dir),
        "--grpc-port", str(grpc_port),
        "--http-port", str(http_port),
        "--metrics-port", str(metrics_port),
        "--http-address", address,
        "--grpc-address", address,
        "--metrics-address", address,
        "--allow-metrics", "true",
        "--allow-gpu-metrics", "false",
        "--exit-on-error", "true",
        *_LOG_FLAGS[cfg.log_level],
    ]  # fmt: skip
    if kind_resolved == "KIND_CPU":
        # No GPU: skip the pinned pool, whose CUDA allocation fails noisily at start-up.
        cmd += ["--pinned-memory-pool-byte-size", "0"]
    for bc in cfg.backend_configs():
        cmd += ["--backend-config", bc]
    cmd += extra_args or []
    log_path = base / "server.log"
    env = server_env(install)
    for key, value in cfg.openmp_env().items():
        env.setdefault(key, value)  # an explicit setting in the caller's environment wins
    env[heartbeat.DIR_ENV] = str(base / "heartbeats")  # stubs' signs of life (hung_stubs)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(base),
            start_new_session=True,  # own process group: Ctrl-C goes to us, we stop it in order
        )
    handle = ServerHandle(
        process, grpc_port, http_port, metrics_port, base, log_path, models, cfg, keep_run_dir
    )
    _RUNNING.append(handle)
    try:
        _wait_ready(handle, ready_timeout)
    except BaseException:
        handle.keep_run_dir = True  # keep the log for the post-mortem
        handle.stop(timeout=10)
        _RUNNING.remove(handle)
        raise
    handle.startup_s = time.monotonic() - t0
    handle.initial_stubs = handle.stubs()
    handle.initial_shm_regions = stub_shm_regions(handle.process.pid)
    return handle


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.split("\n\n")[0])
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--address", default="0.0.0.0", help="interface to listen on (tests use 127.0.0.1)")
    p.add_argument("--model-repository", default=str(DEFAULT_REPOSITORY))
    p.add_argument(
        "--model-dir", default=None, help="'default' (SmolLM2-135M, converted once), a HF folder, or 'none'"
    )
    p.add_argument("--dtype", default=None, help="auto | float32 | bfloat16 | float16")
    p.add_argument("--kind", default=None, help="auto | KIND_CPU | KIND_GPU for prefill/decode/reasoning")
    p.add_argument("--log-level", default=None, choices=sorted(_LOG_FLAGS))
    for name in ("decode", "reasoning", "prefill", "preprocessing"):
        p.add_argument(f"--{name}-instances", type=int, default=None)
    p.add_argument(
        "--threads", action="append", default=[], metavar="MODEL=N", help="torch threads per instance"
    )
    p.add_argument("--max-sessions", type=int, default=None)
    p.add_argument("--max-context", type=int, default=None)
    p.add_argument(
        "--stream-layout",
        default=None,
        choices=("auto", "paper", "project"),
        help="auto: the paper's grid for a stream-trained checkpoint (README, the paper's stream layout)",
    )
    p.add_argument(
        "--prefill-at",
        default=None,
        choices=("auto", "prefill", "decode"),
        help="where prompts are computed: inside decode's steps (auto on CPU) or by the prefill "
        "instance, its KV handed to decode (auto on GPU); docs/performance.md",
    )
    p.add_argument("--config", default=None, help="TOML or JSON file with DeployConfig fields")
    p.add_argument("--run-dir", default=None, help="where to render the repository (default: a temp dir)")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument(
        "--demo",
        nargs="?",
        const=DEMO_PROMPT,
        default=None,
        metavar="PROMPT",
        help="once ready, stream one request (answer + a reasoning stream) to this terminal",
    )
    p.add_argument("--exit-after-demo", action="store_true", help="stop the server after the demo request")
    p.add_argument("--openai-port", type=int, default=9000, help="port of the OpenAI-compatible front")
    p.add_argument(
        "--openai-host",
        default=None,
        help="interface of the OpenAI front (default 127.0.0.1; 0.0.0.0 when $MULTISTREAM_API_KEY is set)",
    )
    p.add_argument(
        "--no-openai", action="store_true", help="do not start the OpenAI front (python -m frontend)"
    )
    p.add_argument(
        "--render-only",
        metavar="DIR",
        default=None,
        help="write the rendered model repository to DIR and exit (for a container's own tritonserver)",
    )
    return p.parse_args(argv)


DEMO_PROMPT = "Why do leaves change colour in autumn? Answer in three sentences."
#: ``--model-dir streams-demo`` (docs/streams.md) answers its own task families: one of them,
#: greedy, its thinking channel shown, no silence penalty (it answers on time by itself).
STREAMS_DEMO = (
    "facing north left left back right right",
    ["--reasoning-streams", "1", "--temperature", "0", "--silence-penalty", "0"],
)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread; unlike Ctrl-C at a terminal it reached only the launcher."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise _Terminated


def serves_paper_layout(cfg: DeployConfig) -> bool:
    """Whether the deployment serves the paper's stream layout (its requests take other options)."""
    from backend.engine.layout import resolve_layout
    from backend.tokenizer import Tokenizer

    model_dir = model_dir_for_render(cfg.model_dir)
    if not model_dir:
        return False
    params = cfg.model_params("preprocessing")
    return resolve_layout(Path(model_dir), Tokenizer.from_dir(Path(model_dir)), params) is not None


def run_demo(handle: ServerHandle, prompt: str, paper: bool = False, options: list[str] | None = None) -> int:
    """Streams one multi-stream request through ``python -m client`` (live answer + reasoning panes).

    Why a subprocess: the launcher must not import the client (the server side would depend on
    it). The child inherits this terminal, so its live view draws as when run by hand. Returns
    the client's exit code (128 + N when signal N killed it, as a shell reports it).
    """
    # The paper's grid shows two thinking channels and has no reasoning budget (max_tokens
    # bounds its rows); the project's layout one reasoning stream of 96 tokens.
    thinking = options or (
        ["--reasoning-streams", "2"] if paper else ["--reasoning-streams", "1", "--reasoning-budget", "96"]
    )
    argv = [prompt, "--url", handle.grpc_url, *thinking, "--max-tokens", "96"]
    # flush=True also flushes the endpoints printed before, so they come out before the child's output.
    print(f"demo: python -m client {shlex.join(argv)}", flush=True)
    child = subprocess.Popen([sys.executable, "-m", "client", *argv])
    try:
        try:
            code = child.wait()
        except _Terminated:
            # Only we got SIGTERM: hand the client a Ctrl-C so it cancels its session while the server is up.
            child.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)
            raise
        except KeyboardInterrupt:
            # Ctrl-C at the terminal reached the client too (same foreground process group): it cancels
            # its session on the server, which must stay up until then, and exits 130.
            code = child.wait()
    finally:
        if child.poll() is None:  # a second Ctrl-C, or a client that ignored SIGINT
            child.kill()
            child.wait()
    return code if code >= 0 else 128 - code


#: How the front reaches Triton: its HTTP ``generate_stream``. Measured on 2 cores at 16 clients
#: (docs/openai.md): the front over HTTP kept 98.6-105.7% of direct gRPC's tokens/s in 6 runs,
#: over gRPC 91.7-96.3% in 6; gRPC's poller thread competes with the front's event loop.
FRONT_PROTOCOL = "http"


def front_argv(grpc_url: str, http_url: str, port: int) -> list[str]:
    """The command of the front beside a Triton at these addresses (the launcher's, and
    ``bench.aiperf``'s)."""
    triton = http_url if FRONT_PROTOCOL == "http" else grpc_url
    return [
        sys.executable,
        "-m",
        "frontend",
        "--triton",
        triton,
        "--protocol",
        FRONT_PROTOCOL,
        "--port",
        str(port),
    ]


def start_front(handle: ServerHandle, port: int, host: str | None) -> subprocess.Popen[bytes] | None:
    """The OpenAI front (``python -m frontend``) beside tritonserver, once it answers ``/health``.

    Why a child process: the launcher imports neither the client nor the front (the server side
    must not depend on them, tests/test_layering.py). The API key, if any, reaches it through
    ``$MULTISTREAM_API_KEY``. A front that cannot start (port taken) is reported, and Triton
    keeps serving. Returns ``None`` then.
    """
    argv = front_argv(handle.grpc_url, handle.http_url, port)
    if host:
        argv += ["--host", host]
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    shown = host or ("0.0.0.0" if os.environ.get("MULTISTREAM_API_KEY") else "127.0.0.1")
    probe = "127.0.0.1" if shown in ("0.0.0.0", "::") else shown
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if _get(f"http://{probe}:{port}/health") == 200:
            print(f"  OpenAI   http://{shown}:{port}/v1   (python -m frontend; --no-openai turns it off)")
            return child
        time.sleep(0.2)
    print(
        f"warning: the OpenAI front did not start on port {port} (--openai-port / --no-openai)",
        file=sys.stderr,
    )
    stop_front(child)
    return None


def stop_front(child: subprocess.Popen[bytes] | None) -> None:
    if child is None or child.poll() is not None:
        return
    child.terminate()  # uvicorn's graceful stop: its running sessions are cancelled first
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _cli_parameters(args: argparse.Namespace) -> dict[str, dict[str, str]] | None:
    """The model parameters the CLI flags stand for (the rest come from ``--config``)."""
    params: dict[str, dict[str, str]] = {}
    if args.stream_layout:
        params.setdefault("*", {})["stream_layout"] = args.stream_layout
    if args.prefill_at:
        params.setdefault("prefill", {})["prefill_at"] = args.prefill_at
    return params or None


def main(argv: list[str] | None = None) -> int:
    """CLI: start, print the endpoints, serve until Ctrl-C/SIGTERM, stop cleanly."""
    args = _parse(argv)
    threads = {}
    for item in args.threads:
        name, _, n = item.partition("=")
        threads[name] = int(n)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The deployment settings both paths share (rendering only, or rendering and serving).
    settings = dict(
        config_file=args.config,
        model_dir=args.model_dir,
        dtype=args.dtype,
        kind=args.kind,
        decode_instances=args.decode_instances,
        reasoning_instances=args.reasoning_instances,
        prefill_instances=args.prefill_instances,
        preprocessing_instances=args.preprocessing_instances,
        threads=threads,
        max_sessions=args.max_sessions,
        max_context=args.max_context,
        parameters=_cli_parameters(args),
    )
    if args.render_only:
        cfg = build_config(**settings)
        cfg.model_dir = model_dir_for_render(cfg.model_dir)
        models = render_repository(
            Path(args.model_repository), Path(args.render_only), cfg, cfg.resolved_kind()
        )
        print(f"rendered {', '.join(models)} into {args.render_only} ({cfg.resolved_kind()})")
        return 0
    try:
        handle = start_server(
            args.model_repository,
            grpc_port=args.grpc_port,
            http_port=args.http_port,
            metrics_port=args.metrics_port,
            address=args.address,
            **settings,
            log_level=args.log_level,
            run_dir=args.run_dir,
            keep_run_dir=args.run_dir is not None,
            ready_timeout=args.ready_timeout,
        )
    except KeyboardInterrupt:
        print("interrupted during start-up", file=sys.stderr)
        return 130
    except (ServerError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"tritonserver ready in {handle.startup_s:.1f}s  models: {', '.join(handle.models)}")
    print(f"  gRPC     {handle.grpc_url}")
    print(f"  HTTP     http://{handle.http_url}")
    print(f"  metrics  {handle.metrics_url}")
    print(f"  log      {handle.log_path}")
    front = None
    try:
        front = None if args.no_openai else start_front(handle, args.openai_port, args.openai_host)
        if args.demo:
            prompt, options = args.demo, None
            if args.model_dir == "streams-demo" and args.demo == DEMO_PROMPT:
                prompt, options = STREAMS_DEMO
            paper = serves_paper_layout(build_config(**settings))
            code = run_demo(handle, prompt, paper=paper, options=options)
            if args.exit_after_demo:
                return code
        print("Ctrl-C to stop", flush=True)
        while handle.alive():
            time.sleep(0.5)
            dead = handle.dead_stubs()
            if dead:
                # Triton 2.51 keeps reporting ready with a dead stub; exit so a supervisor
                # (Kubernetes, systemd, docker --restart) starts a healthy server.
                print(
                    f"error: Python stub(s) {', '.join(dead)} died; tritonserver cannot restart them. "
                    "Stopping (exit code 1) so the server gets restarted.",
                    file=sys.stderr,
                )
                handle.stop(timeout=10)
                return 1
            hung = handle.hung_stubs()
            if hung:
                print(
                    f"error: Python stub(s) {', '.join(hung)} gave no sign of life for {HUNG_STUB_S:.0f} s "
                    "(a deadlock in Triton's python backend: backend/serving/heartbeat.py). "
                    "Stopping (exit code 1) so the server gets restarted.",
                    file=sys.stderr,
                )
                handle.stop(timeout=10)
                return 1
        print(
            f"tritonserver exited with code {handle.process.returncode}:\n{handle.log_tail()}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("stopping tritonserver ...", file=sys.stderr)
        stop_front(front)  # first, so its open sessions are cancelled while Triton is still up
        code = handle.stop()
        print(f"stopped (exit code {code})", file=sys.stderr)
        return 0
    finally:
        stop_front(front)
        handle.stop()
