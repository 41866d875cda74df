"""OpenAI-compatible HTTP front for the ``multistream`` ensemble (``python -m frontend``).

Chat completions, completions and the Responses API, streaming and not, with every
reasoning stream visible (``reasoning_content`` / ``reasoning`` + ``stream`` in chat, one
reasoning item per stream in responses), session input and cancel, disconnect = cancel,
an optional API key and its own ``/metrics``. See docs/openai.md.
"""

from .app import Front, create_app
from .settings import FrontSettings

__all__ = ["Front", "FrontSettings", "create_app"]
