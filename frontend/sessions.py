"""``POST /v1/sessions/{id}/input`` and ``/cancel``: steer or stop a running session.

The session id is in every chunk (``session_id``) and the ``X-Session-Id`` header of a
generating request, or chosen by the client (``extra_body={"session_id": ...}``). Both go
through the ``session_control`` model, so they reach the session whichever front or client
started it and whichever decode instance holds it; pushed text is read into the User
channel at the next row. An unknown or ended session is a 404, except that a cancel of a run
live in this front stops it even before its session is registered (:func:`cancel`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from client.aio import AsyncMultiStreamClient
from client.errors import MultiStreamError

from .errors import bad_request, from_server
from .runner import Runs


def input_text(body: Mapping[str, Any]) -> str:
    """The text to push: ``input`` (or ``text``), a non-empty string."""
    text = body.get("input", body.get("text"))
    if not isinstance(text, str) or not text:
        raise bad_request(
            "input must be a non-empty string (the text to push into the session)", param="input"
        )
    return text


async def push_input(client: AsyncMultiStreamClient, session_id: str, text: str) -> dict[str, Any]:
    try:
        accepted = await client.push_input(session_id, text)
    except MultiStreamError as e:
        raise from_server(e) from None
    return {"session_id": session_id, "object": "session.input", "accepted": accepted}


async def cancel(client: AsyncMultiStreamClient, runs: Runs, session_id: str) -> dict[str, Any]:
    """Cancel on the server; the session's stream (if this front carries it) then ends with
    ``finish_reason: "cancelled"`` on every stream, and its KV is free within one step.

    A run live in this front that the server has not answered yet (its request still in
    preprocessing or queued for prefill) has no registered session, so a plain cancel would
    be a 404 and lost; the front owns that request, so it sends the pending cancel, which
    the server applies when decode registers the session (``Mailbox.cancel_pending``). Any
    other id gets the plain cancel: an unknown or ended session stays a 404.
    """
    run = runs.live.get(session_id)
    pending = run is not None and not run.done and not run.generation.answered
    try:
        accepted = await client.cancel(session_id, pending=pending)
    except MultiStreamError as e:
        raise from_server(e) from None
    if run is not None:
        runs.metrics.cancelled.labels("session_cancel").inc()
    return {"session_id": session_id, "object": "session.cancel", "accepted": accepted}
