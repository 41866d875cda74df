"""A stub's sign of life: a file touched every second by a Python thread.

Why: Triton 2.51's python backend can deadlock a stub that reads many responses of decoupled
BLS calls through its iterators. In ``ResponseIterator::Next`` a thread woken with a response
re-takes the GIL while still holding the iterator's mutex; the stub's
``ParentToStubMQMonitor`` holds the iterator map's mutex while it waits for that iterator's
mutex; and a thread starting another decoupled call holds the GIL while it waits for the
map's mutex (``Stub::GetResponseIterator``). Seen with 16 concurrent requests with reasoning
streams, within a minute. Then every thread of the stub waits forever: Triton still reports
the model ready and clients wait for their stall timeout. The project's BLS calls no longer
read data through those iterators (``backend/serving/reply_channel.py``); the heartbeat stays
as the guard against that or any other hang.

Nothing inside the process can act (its Python threads all need the GIL), so the proof of
life is outside: a file under ``MULTISTREAM_HEARTBEAT_DIR`` (set by the launcher) named after
the instance, whose mtime this thread renews. ``launcher.serve.ServerHandle.hung_stubs``
reads them; ``python -m launcher`` exits when one goes stale, as it does for a dead stub, so
that an orchestrator restarts the server. Without the variable, nothing is written.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

#: Seconds between two touches.
PERIOD_S = 1.0
#: Environment variable naming the folder (one file per stub instance).
DIR_ENV = "MULTISTREAM_HEARTBEAT_DIR"


def start(instance: str) -> threading.Thread | None:
    """Touches ``$MULTISTREAM_HEARTBEAT_DIR/<instance>`` every :data:`PERIOD_S` seconds."""
    folder = os.environ.get(DIR_ENV)
    if not folder:
        return None
    path = Path(folder) / instance
    path.parent.mkdir(parents=True, exist_ok=True)

    def beat() -> None:
        while True:
            try:
                path.touch()
            except OSError:
                pass  # the run folder went away: the server is stopping
            time.sleep(PERIOD_S)

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    return thread
