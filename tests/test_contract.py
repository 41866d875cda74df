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


def test_start_modes_agree() -> None:
    from backend.engine.layout import START_MODES

    assert client_request.START_MODES == START_MODES


TRITON_OF = {
    "BYTES": "TYPE_STRING",
    "BOOL": "TYPE_BOOL",
    "INT32": "TYPE_INT32",
    "UINT64": "TYPE_UINT64",
    "FP32": "TYPE_FP32",
}


def test_every_client_option_is_a_server_input_of_the_same_type() -> None:
    for name, (datatype, _) in client_request.INPUT_TYPES.items():
        assert name in server_request.INPUTS, f"the client sends {name!r}, the server does not declare it"
        assert server_request.INPUTS[name] == TRITON_OF[datatype], name


def _declared_inputs(model: str) -> dict[str, str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "model_repository" / model / "config.pbtxt").read_text()
    block = text.split("input [", 1)[1].split("]\noutput", 1)[0]
    return dict(re.findall(r'name: "(\w+)" data_type: (TYPE_\w+)', block))


def test_ensemble_and_preprocessing_declare_exactly_the_request_inputs() -> None:
    """``backend.serving.request.INPUTS`` is the one definition; the two configs must match it."""
    for model in ("multistream", "preprocessing"):
        assert _declared_inputs(model) == server_request.INPUTS, model


def test_cancel_actions_are_session_control_actions() -> None:
    from backend.serving.session_control import ACTIONS
    from client.core import cancel_action

    assert {cancel_action(True), cancel_action(False)} <= set(ACTIONS)
