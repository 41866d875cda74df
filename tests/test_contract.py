"""What the client repeats of the server's contract stays equal to the server's definition.

Why: the client package never imports the server (tests/test_layering.py), so the few
values both sides must know are written twice; this test is what keeps them one idea.
"""

from __future__ import annotations

import client.request as client_request
from backend.engine.attention import ATTENTION_MODES
from backend.serving import request as server_request


def test_attention_modes_agree() -> None:
    assert client_request.ATTENTION_MODES == ATTENTION_MODES
    assert server_request.ATTENTION_MODES is ATTENTION_MODES


def test_sync_modes_agree() -> None:
    assert client_request.SYNC_MODES == server_request.SYNC_MODES
