"""llama.cpp's own server, ``llama-server``, as ``bench.compare``'s peer: built once, started, stopped.

``python -m bench.llama_server build`` builds it now (``status`` says what is there).

Why this peer and not ``llama-cpp-python``: a user who would otherwise pick llama.cpp runs its
server, which batches concurrent requests continuously in parallel slots and reuses cached
prompt prefixes; the Python binding serves one request at a time.

Where the source comes from: the ``llama-cpp-python`` sdist vendors llama.cpp
(``vendor/llama.cpp``). The sdist is looked up in the cache folder, then in pip's cache, and
only then fetched with ``pip download --no-binary :all: --no-deps llama-cpp-python`` (a
setup-time step: the build runs once per machine). It is configured with CMake for the target
``llama-server`` only, statically linked, with ``GGML_NATIVE=OFF`` and the x86 instruction
sets named one by one from ``/proc/cpuinfo`` but never AMX: these VMs advertise AMX and trap
on it (SIGILL). The web UI is not fetched (``LLAMA_USE_PREBUILT_UI=OFF``), nor is OpenSSL used.

Interrupted builds: the build runs in a temporary folder under an ``flock`` (released by the
kernel when the builder dies, so a killed build never blocks the next one) and the finished
binary is moved into place with one ``rename``; a half-built tree is never mistaken for a
build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backend.kernels.native import cpu_flags
from backend.locks import exclusive_lock
from backend.model_store import default_cache_dir

SDIST_NAME = "llama-cpp-python"
SDIST_GLOB = "llama_cpp_python-*.tar.gz"
BINARY = "llama-server"
#: Instruction-set options of ggml's CMake, each enabled only when /proc/cpuinfo has the flag.
#: AMX (GGML_AMX_*) is deliberately absent: see the module docstring.
ISA_OPTIONS = {
    "GGML_AVX": "avx",
    "GGML_AVX2": "avx2",
    "GGML_FMA": "fma",
    "GGML_F16C": "f16c",
    "GGML_BMI2": "bmi2",
    "GGML_AVX_VNNI": "avx_vnni",
    "GGML_AVX512": "avx512f",
    "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni",
    "GGML_AVX512_BF16": "avx512_bf16",
}
BUILD_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "GGML_NATIVE": "OFF",
    "GGML_CPU_ALL_VARIANTS": "OFF",
    "GGML_BACKEND_DL": "OFF",
    "GGML_OPENMP": "ON",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_TOOLS": "ON",
}


def cache_root() -> Path:
    """``<multistream cache>/llama-server``: sdists and finished builds."""
    return default_cache_dir() / "llama-server"


def cmake_options(flags: set[str] | None = None) -> dict[str, str]:
    """Every ``-D`` option of the build: fixed ones, then each ISA on or off as this CPU has it."""
    flags = cpu_flags() if flags is None else flags
    opts = dict(BUILD_OPTIONS)
    for option, flag in ISA_OPTIONS.items():
        opts[option] = "ON" if flag in flags else "OFF"
    for amx in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        opts[amx] = "OFF"
    return opts


def _sdist_version(path: Path) -> str:
    return path.name[len("llama_cpp_python-") : -len(".tar.gz")]


def build_dir_for(sdist: Path, options: dict[str, str]) -> Path:
    """The finished-build folder: one per sdist version and option set."""
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / f"{_sdist_version(sdist)}-{digest}"


def find_binary() -> Path | None:
    """A finished ``llama-server`` in the cache (newest first), or None. Never builds."""
    root = cache_root()
    if not root.is_dir():
        return None
    options = cmake_options()
    for sdist in sorted(root.glob(SDIST_GLOB), reverse=True):
        exe = build_dir_for(sdist, options) / BINARY
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    return None


def find_sdist() -> Path | None:
    """The sdist in the cache folder, else one in pip's HTTP/wheel cache (copied into ours)."""
    root = cache_root()
    found = sorted(root.glob(SDIST_GLOB), reverse=True) if root.is_dir() else []
    if found:
        return found[0]
    pip_cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))
    candidates = sorted(pip_cache.rglob(SDIST_GLOB), reverse=True) if pip_cache.is_dir() else []
    if candidates:
        root.mkdir(parents=True, exist_ok=True)
        dest = root / candidates[0].name
        shutil.copyfile(candidates[0], dest)
        return dest
    return None


def download_sdist(say: Callable[[str], None]) -> Path:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    say(f"downloading the {SDIST_NAME} sdist (it vendors llama.cpp) into {root} ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(root), SDIST_NAME]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    found = sorted(root.glob(SDIST_GLOB), reverse=True)
    if proc.returncode != 0 or not found:
        raise BuildError(f"pip download {SDIST_NAME} failed (rc {proc.returncode}): {proc.stderr[-800:]}")
    return found[0]


class BuildError(RuntimeError):
    """llama-server could not be built; the message says which step failed and why."""


def build(jobs: int | None = None, say: Callable[[str], None] = print, allow_download: bool = True) -> Path:
    """The ``llama-server`` binary, built now if the cache has none (minutes on 2 cores).

    Serialised by an flock; built in a temporary folder next to the final one and renamed
    into place, so an interrupted build leaves only a temp folder that the next build removes.
    """
    exe = find_binary()
    if exe is not None:
        return exe
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildError(f"building {BINARY} needs `{tool}` on PATH")
    root = cache_root()
    with exclusive_lock(root / ".build.lock"):
        exe = find_binary()  # another process may have finished while we waited
        if exe is not None:
            return exe
        sdist = find_sdist()
        if sdist is None:
            if not allow_download:
                raise BuildError(f"no {SDIST_NAME} sdist in {root} or pip's cache")
            sdist = download_sdist(say)
        options = cmake_options()
        final = build_dir_for(sdist, options)
        for stale in root.glob(".tmp-build-*"):  # left by an interrupted build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-build-", dir=root))
        try:
            say(f"building {BINARY} from {sdist.name} (once per machine; several minutes) ...")
            src = _extract_vendor(sdist, tmp / "src")
            bdir = tmp / "build"
            log = tmp / "build.log"
            cfg = ["cmake", "-S", str(src), "-B", str(bdir), *[f"-D{k}={v}" for k, v in options.items()]]
            jobs = jobs or max(1, os.cpu_count() or 1)
            steps = (cfg, ["cmake", "--build", str(bdir), "--target", BINARY, "-j", str(jobs)])
            t0 = time.monotonic()
            with open(log, "w") as out:
                for cmd in steps:
                    out.write("$ " + " ".join(cmd) + "\n")
                    out.flush()
                    rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT).returncode
                    if rc != 0:
                        tail = log.read_text(errors="replace").splitlines()[-25:]
                        raise BuildError(f"`{' '.join(cmd[:3])} ...` failed (rc {rc}):\n" + "\n".join(tail))
            built = next(iter(sorted(bdir.rglob(BINARY))), None)
            if built is None:
                raise BuildError(f"the build finished but produced no {BINARY} under {bdir}")
            stage = tmp / "out"
            stage.mkdir()
            shutil.copy2(built, stage / BINARY)
            shutil.copy2(log, stage / "build.log")
            info = {"sdist": sdist.name, "cmake_options": options, "build_s": time.monotonic() - t0}
            (stage / "build.json").write_text(json.dumps(info, indent=1))
            if final.exists():
                shutil.rmtree(final)
            os.rename(stage, final)  # atomic: the binary appears complete or not at all
            say(f"built {final / BINARY} in {info['build_s']:.0f} s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / BINARY


def _extract_vendor(sdist: Path, dest: Path) -> Path:
    """Extract only ``vendor/llama.cpp`` of the sdist; returns that source folder."""
    dest.mkdir(parents=True)
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise BuildError(f"{sdist.name} has no vendor/llama.cpp")
        tar.extractall(dest, members=members, filter="data")
    return dest / top / "vendor" / "llama.cpp"


# -- running it ------------------------------------------------------------------------------------------
@dataclass
class LlamaServerConfig:
    """How the peer is started: parallel slots, continuous batching, the GGUF's own chat template."""

    model: Path
    threads: int = 2
    parallel: int = 16
    #: Total context over all slots (llama-server splits it between them).
    context: int = 16384
    batch: int = 2048
    prompt_cache: bool = False
    extra_args: list[str] = field(default_factory=list)

    def args(self, port: int) -> list[str]:
        return ["-m", str(self.model), "--host", "127.0.0.1", "--port", str(port), *self.serving_args()]

    def serving_args(self) -> list[str]:
        """Everything but the model path and the address: what a report should record."""
        a = ["-t", str(self.threads), "-tb", str(self.threads), "-np", str(self.parallel)]
        a += ["-c", str(self.context), "-b", str(self.batch), "--cont-batching", "--jinja"]
        # prompt cache off: no slot prefix reuse and no RAM prompt cache (--cache-ram 0)
        a += ["--cache-prompt"] if self.prompt_cache else ["--no-cache-prompt", "--cache-ram", "0"]
        a += ["--no-webui"]
        return a + list(self.extra_args)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the benchmark dies, so no server is left behind."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class LlamaServer:
    """A running ``llama-server`` on a free port; ``with`` stops it (SIGINT, then SIGKILL)."""

    def __init__(self, exe: Path, config: LlamaServerConfig, log_path: Path | None = None) -> None:
        from launcher.serve import free_port

        self.exe = exe
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> LlamaServer:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.config.threads))
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = [str(self.exe), *self.config.args(self.port)]
        self.process = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BuildError(f"{BINARY} exited with code {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"{BINARY} not healthy after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def build_info(exe: Path) -> dict[str, Any]:
    """What ``build`` recorded beside the binary (sdist, CMake options, build time)."""
    try:
        return json.loads((exe.parent / "build.json").read_text())
    except (OSError, ValueError):
        return {}


def status() -> dict[str, Any]:
    exe = find_binary()
    sdist = find_sdist() if exe is None else None
    return {
        "binary": str(exe) if exe else None,
        "sdist": str(sdist) if sdist else None,
        "cmake_options": cmake_options(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("build", "status"))
    p.add_argument("-j", "--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    args = p.parse_args(argv)
    if args.action == "status":
        print(json.dumps(status(), indent=1))
        return 0
    try:
        print(build(args.jobs, say=lambda m: print(f"[llama_server] {m}", file=sys.stderr, flush=True)))
    except BuildError as e:
        print(f"[llama_server] {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
