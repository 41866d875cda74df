"""The BF16 packet that carries a reasoning delta over BLS (backend/serving/reasoning_wire.py).

Why it matters: decode reads reasoning through this packet only, because any other output
tensor of a decoupled BLS response crashes the decode stub in Triton 2.51. Every delta
must come back exactly: text in any script, odd and even byte lengths, empty deltas.
"""

from __future__ import annotations

import pytest
import torch

from backend.serving.reasoning_wire import PACKET, ReasoningDelta, wants_packet


@pytest.mark.parametrize(
    "text",
    ["", "a", "ab", "héllo ✓ \"quoted\" \\ back\nslash", "数学は楽しい", "\x00\x1f control", "😀" * 7],
)
@pytest.mark.parametrize("finish", ["", "stop", "length", "cancelled", "error"])
def test_packet_round_trip(text: str, finish: str) -> None:
    delta = ReasoningDelta("reasoning/3", text, [0, 1, 49151, 2**31 - 1], finish)
    packet = delta.to_packet()
    assert packet.dtype == torch.bfloat16 and packet.dim() == 2 and packet.shape[0] == 1
    assert ReasoningDelta.from_packet(packet) == delta


def test_packet_survives_dlpack() -> None:
    """Triton hands the tensor over through DLPack on both ends."""
    delta = ReasoningDelta("reasoning/0", "x" * 1001, list(range(50)), "")
    packet = delta.to_packet()
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
