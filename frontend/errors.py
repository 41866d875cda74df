"""Errors in OpenAI's format, and what each failure of the server behind the front becomes.

Why one place: an OpenAI client (the SDK, LangChain, aiperf) branches on the HTTP status
(``BadRequestError`` for 400, ``RateLimitError`` for 429 with ``Retry-After``, ...) and shows
``error.message``; so every path (our own checks, the ensemble's validation, Triton itself,
a dead server) must end in the same shape with the status that means the same thing.

The ensemble's validation errors name the Triton input first (``top_p must be in (0, 1],
got 1.5``, docs/CONTRACTS.md §3). We keep the message and point ``param`` at the OpenAI
field the client sent (``stop`` for ``stop_words``).
"""

from __future__ import annotations

import re
from typing import Any

from starlette.responses import JSONResponse

from client.errors import MultiStreamCancelled, MultiStreamConnectionError, MultiStreamError
from client.request import PARAMS

#: HTTP status -> OpenAI error ``type``.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "server_error",
    503: "service_unavailable",
}
#: Seconds a 429 tells the client to wait (``Retry-After``): a session frees its KV slot
#: within one engine step of ending, so the next try soon has a chance.
RETRY_AFTER_S = 1
#: Triton input name -> the request field a client sent (``stop_words`` -> ``stop``).
_FIELD_OF_INPUT = {p.input: name for name, p in PARAMS.items()} | {"text_input": "messages"}
#: Wording of the server's rules (backend/serving/request.py, Triton's own input checks).
_RULE_WORDS = re.compile(
    r"\b(must|is required|is not supported|not supported|cannot|is too long|needs|applies only|"
    r"does not apply|unexpected inference input|unexpected datatype|unexpected shape)\b"
)


class APIError(Exception):
    """An error response: status, message, and the request field it is about (if any)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": ERROR_TYPES.get(self.status, "server_error"),
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def busy(message: str) -> APIError:
    return APIError(429, message, code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})


#: Wrappers Triton puts around a model's own message (ensemble step, failed request, status).
_WRAPPERS = re.compile(
    r"^(\[[^\]]*\]\s*|in ensemble '[^']*',\s*|Failed to process the request\(s\) for model '[^']*', message:\s*)"
)


def _strip_prefixes(message: str) -> str:
    """The server's own sentence, without Triton's ``in ensemble 'x', `` wrappers."""
    text = message.strip()
    while True:
        m = _WRAPPERS.match(text)
        if m is None:
            return text
        text = text[m.end() :].strip()


def field_of(message: str) -> str | None:
    """The request field a rule message is about: its first word when that is an input."""
    first = re.match(r"^([A-Za-z_]+)", message)
    if first is None:
        return None
    return _FIELD_OF_INPUT.get(first.group(1))


def from_server(exc: MultiStreamError, names: dict[str, str] | None = None) -> APIError:
    """A failure of the ensemble / ``session_control`` -> the status an OpenAI client expects.

    - Triton unreachable -> 503; ``server busy`` (every KV slot taken, the queue full) -> 429
      with ``Retry-After``; an unknown or ended session -> 404; a session whose decode
      instance died -> 503 (retry);
    - a broken rule (the ensemble's validation, Triton's own input checks) -> 400 naming the
      field the client sent (``names``: option -> body key); anything else -> 500.
    """
    if isinstance(exc, MultiStreamCancelled):  # the client went away (nginx's 499): nobody reads it
        return APIError(499, "the client closed the request; its session was cancelled", code="cancelled")
    if isinstance(exc, MultiStreamConnectionError):
        return APIError(503, f"the inference server is unavailable: {exc.message}", code="triton_unavailable")
    message = _strip_prefixes(exc.message)
    low = message.lower()
    if "server busy" in low:
        return busy(message)
    if "was lost" in low:
        return APIError(503, message, code="session_lost")
    if "is not a running session" in low or "ended while the message was posted" in low:
        return APIError(404, message, param="session_id", code="session_not_found")
    if _RULE_WORDS.search(message):
        param = field_of(message)
        sent = (names or {}).get(param or "", param)
        if param and sent != param and message.startswith(param):
            message = f"{sent} ({param}){message[len(param) :]}"
        return APIError(400, message, param=sent)
    return APIError(500, message)
