"""The reply channel (backend/serving/reply_channel.py), without Triton: what a BLS callee sends
reaches its caller whole, in order, and before the call's end; nothing reaches anyone else.

Why it matters: decode reads reasoning, and tensorrt_llm_bls reads decode, only this way (the
BLS iterators deadlock Triton 2.51's stub). A lost, reordered or late datagram would be a
lost token, and an end mark before the last delta would fail a stream that finished.
"""

from __future__ import annotations

import queue
import threading
import uuid

import pytest

from backend.serving import reply_channel
from backend.serving.reply_channel import (
    ADDRESS_PREFIX,
    MAX_DATAGRAM,
    REPLY_TO,
    CallEnded,
    ChannelCall,
    Inbox,
    deliver,
    parse_target,
    reply_target,
)


@pytest.fixture
def inbox():
    box = Inbox()
    yield box
    box.close()


def _open(box: Inbox) -> tuple[queue.Queue, threading.Event, tuple[str, str]]:
    got: queue.Queue = queue.Queue()
    ended = threading.Event()
    call = box.open(got.put, ended.set)
    return got, ended, (box.address, call)


def test_objects_arrive_whole_and_in_order_then_the_end_mark(inbox: Inbox) -> None:
    got, ended, target = _open(inbox)
    sent = [{"s": "reasoning/0", "t": f"tok {i} ✓", "i": [i], "f": ""} for i in range(200)]
    sent.append({"s": "reasoning/0", "t": "x" * (3 * MAX_DATAGRAM + 17), "i": [], "f": "stop"})  # fragments
    for obj in sent:
        assert deliver(target, obj)
    assert deliver(target, None)
    assert ended.wait(10)
    received = [got.get_nowait() for _ in range(got.qsize())]
    assert received == sent  # nothing lost, nothing reordered, all before the end mark


def test_calls_of_many_threads_stay_apart(inbox: Inbox) -> None:
    """16 senders at once into one inbox (16 sessions' reasoning): each call gets its own."""
    calls = [_open(inbox) for _ in range(16)]

    def send(i: int, target: tuple[str, str]) -> None:
        for k in range(50):
            obj = {"call": i, "k": k, "pad": "y" * (MAX_DATAGRAM + 1 if k == 25 else 10)}
            assert deliver(target, obj)
        assert deliver(target, None)

    threads = [threading.Thread(target=send, args=(i, t)) for i, (_, _, t) in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, (got, ended, _) in enumerate(calls):
        assert ended.wait(10)
        items = [got.get_nowait() for _ in range(got.qsize())]
        assert [(o["call"], o["k"]) for o in items] == [(i, k) for k in range(50)]


def test_an_ended_call_gets_nothing_and_a_gone_caller_fails_the_send(inbox: Inbox) -> None:
    got, _, target = _open(inbox)
    inbox.close_call(target[1])
    assert deliver(target, {"late": True})  # the socket is there: the datagram is dropped
    assert len(inbox) == 0 and got.empty()
    gone = (f"{ADDRESS_PREFIX}{uuid.uuid4().hex}", "abc")  # nobody bound it
    assert not deliver(gone, {"x": 1})


class _Request:
    def __init__(self, params: str | None):
        self._params = params

    def parameters(self) -> str | None:
        return self._params


def test_only_an_inbox_address_is_a_target() -> None:
    assert parse_target(f"{ADDRESS_PREFIX}1-ab c0ffee") == (f"{ADDRESS_PREFIX}1-ab", "c0ffee")
    assert reply_target(_Request(f'{{"{REPLY_TO}": "{ADDRESS_PREFIX}1-ab c0"}}')) == (
        f"{ADDRESS_PREFIX}1-ab",
        "c0",
    )
    # A client cannot aim the server's datagrams elsewhere (the doorbell, any other socket).
    for value in ("@multistream-bell-1-ab c0", "/tmp/sock c0", f"{ADDRESS_PREFIX}1-ab", ""):
        assert parse_target(value) is None, value
    for params in (None, "", "{}", "not json", f'{{"{REPLY_TO}": 5}}', "[1]"):
        assert reply_target(_Request(params)) is None, params
    assert reply_target(object()) is None  # no parameters() at all


def test_channel_call_ends_after_the_last_object(inbox: Inbox) -> None:
    """ChannelCall's ordering rule: the CallEnded comes after every object, even when Triton's
    final response is read while the inbox has not yet read the last datagrams."""
    got: queue.Queue = queue.Queue()
    call = ChannelCall(got.put, inbox=inbox)
    target = parse_target(call.target)
    assert target is not None
    sender = threading.Thread(
        target=lambda: [deliver(target, {"k": k}) for k in range(300)] + [deliver(target, None)]
    )
    sender.start()
    call.finish("")  # what the BLS thread does once the final response is in: may come first
    sender.join(10)
    items = [got.get_nowait() for _ in range(got.qsize())]
    assert items == [{"k": k} for k in range(300)] + [CallEnded("")]
    assert len(inbox) == 0


def test_channel_call_without_its_end_mark_says_so(inbox: Inbox, monkeypatch) -> None:
    monkeypatch.setattr(reply_channel, "END_GRACE_S", 0.2)
    got: queue.Queue = queue.Queue()
    ChannelCall(got.put, inbox=inbox).finish("", "reasoning")
    (item,) = [got.get_nowait() for _ in range(got.qsize())]
    assert isinstance(item, CallEnded) and "reasoning ended without its end mark" in item.message
    failed: queue.Queue = queue.Queue()
    ChannelCall(failed.put, inbox=inbox).finish("model reasoning is not ready")  # Triton's error
    assert failed.get_nowait() == CallEnded("model reasoning is not ready")
