"""The decode <-> reasoning seam (backend/serving/reasoning_wire.py): the BF16 packet, the call.

Why it matters: decode reads reasoning through this packet only, because any other output
tensor of a decoupled BLS response crashes the decode stub in Triton 2.51. Every delta
must come back exactly: text in any script, odd and even byte lengths, empty deltas.
"""

from __future__ import annotations

import time

import pytest
import torch

from backend.serving.packet import PACKET, encode, wants_packet
from backend.serving.reasoning_wire import ReasoningCall, ReasoningDelta
from backend.serving.reply_channel import CallEnded


@pytest.mark.parametrize(
    "text",
    ["", "a", "ab", 'héllo ✓ "quoted" \\ back\nslash', "数学は楽しい", "\x00\x1f control", "😀" * 7],
)
@pytest.mark.parametrize("finish", ["", "stop", "length", "cancelled", "error"])
def test_packet_round_trip(text: str, finish: str) -> None:
    delta = ReasoningDelta("reasoning/3", text, [0, 1, 49151, 2**31 - 1], finish)
    packet = encode(delta.packet_object())
    assert packet.dtype == torch.bfloat16 and packet.dim() == 2 and packet.shape[0] == 1
    assert ReasoningDelta.from_packet(packet) == delta


def test_packet_survives_dlpack() -> None:
    """Triton hands the tensor over through DLPack on both ends."""
    delta = ReasoningDelta("reasoning/0", "x" * 1001, list(range(50)), "")
    packet = encode(delta.packet_object())
    again = torch.from_dlpack(torch.utils.dlpack.to_dlpack(packet))
    assert ReasoningDelta.from_packet(again) == delta


class _Request:
    def __init__(self, names: list[str]):
        self._names = names

    def requested_output_names(self) -> list[str]:
        return self._names


def test_only_decode_gets_the_packet() -> None:
    assert wants_packet(_Request([PACKET]))
    assert not wants_packet(_Request([]))  # a client asking for every output gets the tensors
    assert not wants_packet(_Request(["stream_name", "reasoning_output"]))
    assert not wants_packet(_Request(["stream_name", PACKET]))  # "all outputs" includes the packet


# --------------------------------------------------------------------------- decode's side
def _call(streams: int = 2, timeout_s: float = 60.0) -> tuple[ReasoningCall, list[str]]:
    gave_up: list[str] = []
    names = [f"reasoning/{i}" for i in range(streams)]
    return ReasoningCall(
        names, post=lambda item: None, give_up=lambda: gave_up.append("x"), timeout_s=timeout_s
    ), gave_up


def test_call_forwards_deltas_and_ends_on_the_iterator_end() -> None:
    call, gave_up = _call()
    d0 = ReasoningDelta("reasoning/0", "a", [1], "")
    assert call.receive(d0) == [d0]
    assert call.receive(ReasoningDelta("reasoning/0", "", [], "length"))[0].finish_reason == "length"
    assert call.live and call.open == ["reasoning/1"]
    # The iterator ends without reasoning/1's final delta: it is ended here, with an error.
    ended = call.receive(CallEnded("reasoning ended without a final delta"))
    assert [(d.stream, d.finish_reason) for d in ended] == [("reasoning/1", "error")]
    assert "without a final delta" in ended[0].text
    assert not call.live and gave_up == ["x"]
    # A late delta of a stream ended here is dropped; a second end changes nothing.
    assert call.receive(ReasoningDelta("reasoning/1", "late", [5], "stop")) == []
    assert call.receive(CallEnded("again")) == []


def test_call_end_after_every_final_delta_sends_nothing() -> None:
    call, gave_up = _call(1)
    call.receive(ReasoningDelta("reasoning/0", "x", [1], "stop"))
    assert call.live  # decode still waits for the iterator's end
    assert call.receive(CallEnded("done")) == [] and not call.live
    assert gave_up == []  # nothing was running any more: no cancel flag is raised


def test_call_watchdog_and_cancel() -> None:
    call, gave_up = _call(2, timeout_s=5.0)
    assert call.check(time.monotonic() + 1.0) == []
    timed_out = call.check(time.monotonic() + 6.0)
    assert {d.finish_reason for d in timed_out} == {"error"} and len(timed_out) == 2
    assert "timed out" in timed_out[0].text and not call.live

    call, gave_up = _call(2)
    call.cancel()
    assert call.cancelled and gave_up == ["x"]
    ends = call.receive(CallEnded("anything"))
    assert [(d.finish_reason, d.text) for d in ends] == [("cancelled", ""), ("cancelled", "")]


def test_call_without_streams_is_never_live() -> None:
    call, _ = _call(0)
    assert not call.live and call.fail("x") == []


def test_packet_is_read_without_consuming_the_capsule() -> None:
    """``packet.decode`` reads a DLPack capsule in place (ctypes, no torch in the reader): the
    capsule keeps its name, so its producer's deleter still runs when it is dropped."""
    delta = ReasoningDelta("reasoning/1", "ünïcode " * 30, [7, 8], "stop")
    capsule = torch.utils.dlpack.to_dlpack(encode(delta.packet_object()))
    assert ReasoningDelta.from_packet(capsule) == delta
    assert torch.from_dlpack(capsule).dtype == torch.bfloat16  # still "dltensor": not consumed


def test_packet_refuses_a_strided_tensor() -> None:
    from backend.serving.packet import decode

    wide = torch.cat([encode({"a": 1}), encode({"b": 2})]).t()  # [n, 2], not C-contiguous
    with pytest.raises(ValueError, match="contiguous"):
        decode(wide)
