"""A test module's own tritonserver: the real repository, one instance and one thread per
heavy model, whatever the module changes on top (model, parameters, wire, limits).

Why one helper: several modules need a deployment the session's ``triton_server`` is not
(the paper's layout, streams-demo, the BF16 wire, ``prefill_at = decode``), and each had
the same start / dead-stub check / stop around its own settings.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from launcher.serve import DEFAULT_REPOSITORY, ServerHandle, start_server

#: The model every test server serves unless a module says otherwise.
TEST_MODEL_DIR = os.environ.get("MULTISTREAM_TEST_MODEL_DIR", "default")
#: How long a test server may take to become ready (a first start converts the model).
READY_TIMEOUT = float(os.environ.get("MULTISTREAM_TEST_READY_TIMEOUT", "600"))
#: Channels of the paper-layout server the paper tests share (``paper_server`` in conftest.py).
PAPER_CHANNELS = 4

SMALL: dict[str, Any] = {
    "decode_instances": 1,
    "reasoning_instances": 1,
    "prefill_instances": 1,
    "preprocessing_instances": 1,
    "threads": {"decode": 1, "reasoning": 1, "prefill": 1},
    "log_level": "warning",
}


@contextlib.contextmanager
def small_server(**settings: Any) -> Iterator[ServerHandle]:
    """Started with ``SMALL`` updated by ``settings``; fails if a stub died while in use."""
    handle = start_server(DEFAULT_REPOSITORY, **{**SMALL, **settings})
    try:
        yield handle
        assert not handle.dead_stubs(), handle.log_tail(80)
    finally:
        handle.stop()
