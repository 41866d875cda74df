"""Shared fixtures: one real tritonserver on the real ``model_repository/`` per test session.

Why session-scoped: starting the server loads every Python stub and the model
(seconds on 2 cores); tests share it and must not leave sessions behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from backend.serve import DEFAULT_REPOSITORY, ServerHandle, list_models, start_server


@pytest.fixture(scope="session")
def triton_server() -> Iterator[ServerHandle]:
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
    finally:
        handle.stop()


@pytest.fixture(scope="session")
def default_model_dir():
    """The converted default checkpoint (converted once into the cache, then reused)."""
    from backend.model_store import ensure_default_model

    return ensure_default_model(progress=False)
