"""Shared fixtures: one real tritonserver on the real ``model_repository/`` per test session.

Why session-scoped: starting the server loads every Python stub and the model
(seconds on 2 cores); tests share it and must not leave sessions behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.serve import DEFAULT_REPOSITORY, ServerHandle, list_models, start_server


def build_gil_check(out_dir: Path) -> Path | None:
    """Builds tests/support/gil_check.c; ``None`` (no check) where there is no C compiler."""
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        warnings.warn("no C compiler: the stubs run without the off-GIL allocation check", stacklevel=2)
        return None
    out = out_dir / "gil_check.so"
    src = Path(__file__).parent / "support" / "gil_check.c"
    include = sysconfig.get_paths()["include"]
    subprocess.run([cc, "-O1", "-shared", "-fPIC", f"-I{include}", str(src), "-o", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def gil_check(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every stub started by the tests aborts at the first Python allocation made off the GIL.

    Why: that is how Triton 2.51's python backend crashes a stub (backend/serving/
    reasoning_wire.py); the corruption otherwise surfaces minutes later, anywhere.
    """
    so = os.environ.get("MULTISTREAM_GIL_CHECK") or build_gil_check(tmp_path_factory.mktemp("gil_check"))
    if so is None:
        yield
        return
    old = os.environ.get("MULTISTREAM_GIL_CHECK")
    os.environ["MULTISTREAM_GIL_CHECK"] = str(so)  # inherited by tritonserver and its stubs
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MULTISTREAM_GIL_CHECK", None)


@pytest.fixture(scope="session")
def triton_server(gil_check: None) -> Iterator[ServerHandle]:
    """The real repository on free ports, small settings (2 decode instances, 1 thread each).

    Skips (not fails) while ``model_repository/`` has no models yet. Set
    MULTISTREAM_TEST_MODEL_DIR to test another model folder than the default one.
    """
    if not list_models(DEFAULT_REPOSITORY):
        pytest.skip(f"{DEFAULT_REPOSITORY} has no models (no */config.pbtxt) yet")
    handle = start_server(
        DEFAULT_REPOSITORY,
        model_dir=os.environ.get("MULTISTREAM_TEST_MODEL_DIR", "default"),
        decode_instances=2,
        reasoning_instances=1,
        prefill_instances=1,
        preprocessing_instances=1,
        threads={"decode": 1, "reasoning": 1, "prefill": 1},
        max_sessions=8,
        max_context=1024,
        log_level="warning",
        ready_timeout=float(os.environ.get("MULTISTREAM_TEST_READY_TIMEOUT", "600")),
        # Set MULTISTREAM_TEST_RUN_DIR to keep the rendered repository and server.log for debugging.
        run_dir=os.environ.get("MULTISTREAM_TEST_RUN_DIR") or None,
        keep_run_dir=bool(os.environ.get("MULTISTREAM_TEST_RUN_DIR")),
    )
    try:
        yield handle
        # No test of this server kills a stub: one that died, crashed (e.g. the off-GIL check).
        dead = handle.dead_stubs()
        assert not dead, f"stubs died during the tests: {dead}\n{handle.log_tail(80)}"
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def paper_server(gil_check: None) -> Iterator[ServerHandle]:
    """One server on the paper's stream layout (``PAPER_CHANNELS`` channels) for every paper
    test module: test_paper_serving and test_paper_logprobs each started their own."""
    from tests.server_helpers import PAPER_CHANNELS, small_server

    with small_server(
        model_dir="default",
        parameters={"*": {"stream_layout": "paper", "num_channels": str(PAPER_CHANNELS)}},
        max_sessions=4,
        max_context=1024,
    ) as handle:
        yield handle


@pytest.fixture(scope="module")
def paper_engine(default_model_dir):
    """The paper server's checkpoint and engine settings, in this process (the reference)."""
    from backend.engine import Engine, EngineConfig

    engine = Engine.from_model_dir(default_model_dir, EngineConfig(max_sessions=2, max_context=1024))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def default_model_dir():
    """The converted default checkpoint (converted once into the cache, then reused)."""
    from backend.model_store import ensure_default_model

    return ensure_default_model(progress=False)
