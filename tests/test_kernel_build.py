"""``backend.kernels.build``: an interrupted kernel build never blocks a later start.

Why these tests: with ``torch.utils.cpp_extension.load`` a start killed during the int4
kernel's first build left torch's ``lock`` file behind, and every later start hung without a
word. The tests build a tiny pybind11 extension (seconds, not the int4 kernel's 30 s) into a
private cache (``MULTISTREAM_CACHE``), each step in its own process, as the stubs do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE = """
#include <pybind11/pybind11.h>
int answer() { return 42; }
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("answer", &answer); }
"""

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "c++"], capture_output=True).returncode != 0, reason="no C++ compiler"
)


def _script(src: Path, action: str) -> str:
    return textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from backend.kernels import build
        src = [Path({str(src)!r})]
        if {action!r} == "hold":  # a builder that hangs while holding the build lock
            with build._build_lock(build.library_path("tiny_ext", src, [], []).parent / ".tiny_ext.lock", print):
                print("holding", flush=True)
                time.sleep(600)
        elif {action!r} == "kill-me":  # really builds; the test kills it mid-compile
            build.load("tiny_ext", src, ["-O2"], [], say=lambda m: print(m, flush=True))
        else:
            m = build.load("tiny_ext", src, ["-O2"], [], say=lambda m: print(m, flush=True))
            print("answer", m.answer(), flush=True)
        """
    )


def _start(src: Path, action: str, cache: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, MULTISTREAM_CACHE=str(cache))
    return subprocess.Popen(
        [sys.executable, "-c", _script(src, action)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: killing it kills ninja and the compiler too
    )


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "tiny_ext.cpp"
    src.write_text(SOURCE)
    return src


def test_a_build_killed_mid_compile_does_not_block_the_next(source: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    victim = _start(source, "kill-me", cache)
    kdir = cache / "kernels"
    _wait_for(lambda: any(kdir.glob(".build-tiny_ext-*")), 120, "the build to start")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert any(kdir.glob(".build-tiny_ext-*")), "the killed build should have left its temp folder"
    assert not list(kdir.glob("tiny_ext-*.so")), "no library may appear from an interrupted build"

    proc = _start(source, "load", cache)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "answer 42" in out
    assert not list(kdir.glob(".build-tiny_ext-*")), "the next build removes the killed one's leftovers"
    assert len(list(kdir.glob("tiny_ext-*.so"))) == 1


def test_a_waiting_start_names_the_live_builder_and_goes_on_when_it_dies(
    source: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    holder = _start(source, "hold", cache)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "holding"

    waiter = _start(source, "load", cache)
    assert waiter.stdout is not None
    first = waiter.stdout.readline()
    assert f"waiting for process {holder.pid}" in first, first
    time.sleep(0.5)
    assert waiter.poll() is None, "it must wait while the builder is alive"

    os.killpg(holder.pid, signal.SIGKILL)  # the builder dies holding the lock
    holder.wait()
    out, _ = waiter.communicate(timeout=300)
    assert waiter.returncode == 0, first + out
    assert "answer 42" in out

    again = _start(source, "load", cache)  # built: loads with no lock and no message
    out, _ = again.communicate(timeout=60)
    assert out.strip() == "answer 42", out
