"""Unit tests of the reliability helpers that need no server (fast, run everywhere).

Why: the server tests prove the behaviour end to end; these pin the small decisions they
rest on (a dead or zombie owner pid means "lost", fault specs parse strictly, a reasoning
error does not fail the client's request but an answer error does).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from backend.serving.reasoning import parse_fault
from backend.serving.session_control import Mailbox, SessionLost, SessionNotFound
from client.errors import MultiStreamError
from client.events import StreamTracker


def test_mailbox_status_of_live_dead_and_unknown_sessions(tmp_path) -> None:
    box = Mailbox(tmp_path / "sessions")
    box.register("alive")
    box.post("alive", "status")  # owner is this process: no error
    with pytest.raises(SessionNotFound, match="not a running session"):
        box.post("never-was", "status")
    box.register("orphan")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (box.root / "orphan" / ".owner").write_text(json.dumps({"pid": dead.pid}))
    with pytest.raises(SessionLost, match=r"session_id 'orphan' was lost: .*died"):
        box.post("orphan", "input", "hello")
    assert not (box.root / "orphan").exists(), "a lost session's mailbox must be cleaned up"


def test_mailbox_treats_a_zombie_owner_as_dead(tmp_path) -> None:
    """A SIGKILLed stub stays a zombie while tritonserver does not reap it: kill(pid, 0) succeeds."""
    box = Mailbox(tmp_path / "sessions")
    box.register("zombie")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # not reaped: it becomes a zombie once it exits
            stat = open(f"/proc/{child.pid}/stat").read()
            if stat[stat.rindex(")") + 2] == "Z":
                break
            subprocess.run(["sleep", "0.01"])
        (box.root / "zombie" / ".owner").write_text(json.dumps({"pid": child.pid}))
        with pytest.raises(SessionLost):
            box.post("zombie", "status")
    finally:
        child.wait()


def test_parse_fault() -> None:
    assert parse_fault("") == ("", 0, "")
    assert parse_fault("error_after:3") == ("error_after", 3, "")
    assert parse_fault("hang_after:2:fault-hang-") == ("hang_after", 2, "fault-hang-")
    with pytest.raises(ValueError, match="fault_injection"):
        parse_fault("explode:1")


def test_reasoning_error_is_reported_not_raised_but_answer_error_raises() -> None:
    tr = StreamTracker(t0=0.0)
    tr.feed({"stream_name": "output", "text_output": "Hi", "output_ids": [1]}, 0.1)
    tr.feed(
        {"stream_name": "reasoning/0", "reasoning_output": "[reasoning failed: x]", "finish_reason": "error"},
        0.2,
    )
    tr.feed({"stream_name": "output", "finish_reason": "stop"}, 0.3)
    tr.check_complete()
    assert tr.done(1.0).finish_reasons["reasoning/0"] == "error"
    tr.feed({"stream_name": "revision", "finish_reason": "error"}, 0.4)
    with pytest.raises(MultiStreamError, match="revision"):
        tr.check_complete()
