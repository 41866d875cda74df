"""Errors raised by the multi-stream client.

Every failure a caller can meet (server down, server-side validation error,
a stream that ends without its final flag, a local cancel) surfaces as a
:class:`MultiStreamError`, so callers (the CLI, the locust user) need one
``except`` clause and never see a raw ``grpc.RpcError`` or a hang.
"""

from __future__ import annotations


class MultiStreamError(Exception):
    """A request failed; ``message`` is the server's own message when there is one."""

    def __init__(self, message: str, *, status: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return self.message


class MultiStreamConnectionError(MultiStreamError):
    """Nothing answered at the URL (refused, unreachable, DNS failure)."""


class MultiStreamCancelled(MultiStreamError):
    """The in-flight stream was cancelled locally (``Generation.cancel()``)."""


class IncompleteStreamError(MultiStreamError):
    """The transport ended before the server flagged the final response."""


_CONNECT_HINTS = (
    "failed to connect",
    "connection refused",
    "connect call failed",
    "cannot connect",
    "name or service not known",
    "unavailable",
    "dns resolution failed",
    "errno 111",
)


def from_exception(exc: BaseException, url: str) -> MultiStreamError:
    """Wrap a tritonclient/grpc/socket exception, keeping the server's message.

    tritonclient's ``InferenceServerException.message()`` holds exactly what the
    server said; ``str()`` would prepend a status code, which is noise for users.
    """
    if isinstance(exc, MultiStreamError):
        return exc
    message_fn = getattr(exc, "message", None)
    message = message_fn() if callable(message_fn) else str(exc)
    message = (message or type(exc).__name__).strip()
    status_fn = getattr(exc, "status", None)
    status = status_fn() if callable(status_fn) else None
    low = f"{status or ''} {message}".lower()
    if "stream removed" in low or "socket closed" in low or "connection reset" in low:
        return MultiStreamConnectionError(f"lost connection to server at {url}: {message}", status=status)
    if isinstance(exc, ConnectionError | OSError) or any(h in low for h in _CONNECT_HINTS):
        return MultiStreamConnectionError(f"cannot reach server at {url}: {message}", status=status)
    return MultiStreamError(message, status=None if status is None else str(status))
