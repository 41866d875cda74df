"""One exclusive file lock for every "build or convert once per machine" step.

Why ``flock`` and not a lock *file*: the kernel releases an flock when its holder dies, so
a killed converter, packer or build never leaves the cache locked for the next start.
Used by the model store (GGUF conversion, adapter merges), the packed weights and the
llama-server build of ``bench.compare``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``lock_path`` (created if missing), blocking until
    any other holder is done."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
