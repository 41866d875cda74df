"""What the engine refuses, and why; every message names the limit that was hit."""

from __future__ import annotations


class EngineError(RuntimeError):
    """A request the engine cannot serve; the message says why."""


class EngineBusyError(EngineError):
    """Every KV slot is taken and the admission queue is full: try again later."""


class CacheFullError(RuntimeError):
    """No free slot: the server is at its configured number of concurrent sessions."""


class ContextLengthError(ValueError):
    """A session would grow beyond the configured context length."""
