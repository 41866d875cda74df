"""The front's settings: where Triton is, what it serves as, who may call it, its bounds."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: Environment variable holding the API key when ``--api-key`` is not given.
API_KEY_ENV = "MULTISTREAM_API_KEY"


@dataclass
class FrontSettings:
    """Everything ``python -m frontend`` can be told (``frontend.__main__``)."""

    triton: str = "localhost:8001"
    #: ``grpc`` (the ensemble's streaming API) or ``http`` (``generate_stream``).
    protocol: str = "grpc"
    #: The ensemble the front talks to, and the model name clients use (``/v1/models``).
    ensemble: str = "multistream"
    served_model_name: str = "multistream"
    #: Bearer token every endpoint but ``/health*`` requires; ``None``: no key.
    api_key: str | None = field(default_factory=lambda: os.environ.get(API_KEY_ENV) or None)
    #: Generations in flight at once; one more gets 429 at once (the front never queues).
    max_concurrent: int = 64
    #: ``max_tokens`` when a request sets none (OpenAI's default is "up to the context").
    default_max_tokens: int = 256
    #: A generation whose server sends nothing for this long fails (the front never waits
    #: without bound; the client library also checks the session is alive every 5 s).
    idle_timeout_s: float = 120.0

    def host_default(self) -> str:
        """Without an API key the front is for this machine only, unless told otherwise."""
        return "0.0.0.0" if self.api_key else "127.0.0.1"
