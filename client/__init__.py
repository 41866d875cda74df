"""Client library for the ``multistream`` Triton ensemble.

Sync::

    from client import MultiStreamClient, StreamDelta, Done
    with MultiStreamClient("localhost:8001") as c:
        for ev in c.generate("Why is the sky blue?", max_tokens=64, reasoning_streams=1):
            if isinstance(ev, StreamDelta):
                print(ev.stream, ev.text)
            else:
                print(ev.ttft_s, ev.tokens_per_s)

Async: ``AsyncMultiStreamClient`` with ``async for``. Errors: ``MultiStreamError``.
``generate``'s options are the fields of ``GenerateRequest`` (``client/request.py``); both
clients share ``client/core.py`` and differ only in transport.
"""

from .aio import AsyncGeneration, AsyncMultiStreamClient
from .errors import (
    IncompleteStreamError,
    MultiStreamCancelled,
    MultiStreamConnectionError,
    MultiStreamError,
)
from .events import Done, Event, StreamDelta, StreamStats, StreamTracker
from .request import GenerateRequest
from .sync import Generation, MultiStreamClient

__all__ = [
    "AsyncGeneration",
    "AsyncMultiStreamClient",
    "Done",
    "Event",
    "GenerateRequest",
    "Generation",
    "IncompleteStreamError",
    "MultiStreamCancelled",
    "MultiStreamClient",
    "MultiStreamConnectionError",
    "MultiStreamError",
    "StreamDelta",
    "StreamStats",
    "StreamTracker",
]
