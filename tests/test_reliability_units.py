"""Unit tests of the reliability helpers that need no server (fast, run everywhere).

Why: the server tests prove the behaviour end to end; these pin the small decisions they
rest on (a dead or zombie owner pid means "lost", fault specs parse strictly, a reasoning
error does not fail the client's request but an answer error does).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from backend.serving.reasoning import parse_fault
from backend.serving.session_control import ACTIONS, Doorbell, Mailbox, SessionLost, SessionNotFound
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


def test_pending_cancel_is_applied_once_when_the_session_registers(tmp_path) -> None:
    """A cancel of a session not registered yet: remembered, then its first message, once."""
    assert "cancel_pending" in ACTIONS
    box = Mailbox(tmp_path / "sessions")
    with pytest.raises(SessionNotFound, match="not a running session"):
        box.post("early", "cancel")  # a plain cancel of an unknown id stays "not found"
    box.post("early", "cancel_pending")
    assert (box.pending / "early").exists()
    with pytest.raises(SessionNotFound):
        box.post("early", "status")  # remembered is not running
    bell = Doorbell.open()
    rang = threading.Event()
    try:
        if bell is not None:
            bell.subscribe("early", rang.set)
        box.register("early", bell)
        assert box.poll("early") == [("cancel", "")], "the pending cancel is the session's first message"
        assert bell is None or rang.wait(2.0), "registering with a pending cancel rings the owner's doorbell"
    finally:
        if bell is not None:
            bell.close()
    assert not (box.pending / "early").exists()
    box.unregister("early")
    box.register("early")  # the same id again: the cancel was consumed by the first session
    assert box.poll("early") == []


def test_pending_cancel_of_a_running_session_is_a_plain_cancel(tmp_path) -> None:
    box = Mailbox(tmp_path / "sessions")
    box.register("running")
    assert box.cancel_pending("running") is False
    assert box.poll("running") == [("cancel", "")]
    assert list(box.pending.iterdir()) == []


def test_pending_cancel_expires_and_touches_no_other_id(tmp_path) -> None:
    """After the TTL a reused id runs normally; other ids never see someone's pending cancel."""
    box = Mailbox(tmp_path / "sessions", pending_ttl_s=30.0)
    assert box.cancel_pending("old") is True
    past = time.time() - 31.0
    os.utime(box.pending / "old", (past, past))
    box.register("old")
    assert box.poll("old") == [], "a pending cancel older than the TTL must not hit a new request"
    assert not (box.pending / "old").exists(), "an expired cancel is dropped when its id registers"
    box.cancel_pending("stale")
    os.utime(box.pending / "stale", (past, past))
    box.cancel_pending("fresh")  # each new pending cancel prunes the expired ones
    assert sorted(p.name for p in box.pending.iterdir()) == ["fresh"]
    box.register("other")
    assert box.poll("other") == []
    with pytest.raises(SessionNotFound):
        box.post("unknown", "cancel")
    with pytest.raises(SessionNotFound, match="not a valid session id"):
        box.cancel_pending("../escape")


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
