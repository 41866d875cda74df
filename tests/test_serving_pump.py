"""The serving loop's shared parts without Triton: the pump, the cancel poll, the hand-off."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from backend.engine import PrefixKV
from backend.serving import handoff
from backend.serving.pump import MAX_CHECK_S, MIN_CHECK_S, CancelPoll, StreamPump


class _Metrics:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def ttft(self, kind: str, ms: float) -> None:
        self.calls.append(("ttft", kind, ms))

    def inter_token(self, kind: str, ms: float) -> None:
        self.calls.append(("itl", kind, ms))

    def tokens(self, kind: str, n: int) -> None:
        self.calls.append(("tokens", kind, n))


def test_pump_groups_and_flushes_on_finish() -> None:
    m = _Metrics()
    pump = StreamPump("output", m, arrival=0.0, group_tokens=3)
    assert pump.push("output", "a", [1]) is None
    assert pump.push("output", "b", [2]) is None
    g = pump.push("output", "c", [3])
    assert g is not None and (g.text, g.ids, g.finish_reason) == ("abc", [1, 2, 3], None)
    g = pump.push("output", "d", [4], "stop")  # a finish flushes a partial group
    assert g is not None and (g.text, g.ids, g.finish_reason) == ("d", [4], "stop")
    assert pump.text("output") == "abcd" and pump.ids("output") == [1, 2, 3, 4]
    assert pump.finished("output") and pump.live() == []
    # Metrics: one TTFT (the first token), then an inter-token time per later delta, and every token.
    kinds = [c[0] for c in m.calls]
    assert kinds.count("ttft") == 1 and kinds.count("itl") == 3
    assert sum(c[2] for c in m.calls if c[0] == "tokens") == 4


def test_pump_hold_coalesces_until_due() -> None:
    """``hold`` (the loop fell behind: more deltas already queued) keeps tokens back until
    ``due``, which sends them as one group; an end goes out at once, with what was held."""
    pump = StreamPump("output", _Metrics(), arrival=0.0, group_tokens=1)
    assert pump.push("output", "a", [1], logprobs=[-0.5], hold=True) is None
    assert pump.push("output", "b", [2], logprobs=[-0.25], hold=True) is None
    g = pump.due("output")
    assert g is not None and (g.text, g.ids, g.logprobs) == ("ab", [1, 2], ([-0.5, -0.25], -0.75))
    assert pump.due("output") is None  # nothing left
    assert pump.push("output", "c", [3], hold=True) is None
    g = pump.push("output", "d", [4], "length", hold=True)
    assert g is not None and (g.text, g.ids, g.finish_reason) == ("cd", [3, 4], "length")
    assert pump.due("output") is None and pump.due("never-opened") is None
    grouped = StreamPump("output", None, arrival=0.0, group_tokens=3)  # group size still holds
    grouped.push("output", "x", [5], hold=True)
    grouped.push("output", "y", [6], hold=True)
    assert grouped.due("output") is None
    grouped.push("output", "z", [7], hold=True)
    assert grouped.due("output").ids == [5, 6, 7]


def test_pump_timing_is_per_stream() -> None:
    pump = StreamPump("reasoning", None, arrival=time.time() - 2.0)  # arrived 2 s ago
    g0 = pump.push("reasoning/0", "x", [1])
    g1 = pump.push("reasoning/1", "y", [2])
    assert g0 is not None and g1 is not None
    # ms since arrival; the first response of each stream measures from arrival too.
    assert g0.timing[0] == pytest.approx(g0.timing[1]) and g1.timing[0] == pytest.approx(g1.timing[1])
    g0b = pump.push("reasoning/0", "z", [3])
    assert g0b is not None and g0b.timing[1] < 1000.0 <= 2000.0 <= g0b.timing[0]


class _Engine:
    step_time_s = 0.0


def test_cancel_poll_is_once_per_step_within_bounds() -> None:
    eng = _Engine()
    poll = CancelPoll(eng)
    assert poll.interval() == MIN_CHECK_S
    eng.step_time_s = 10.0
    assert poll.interval() == MAX_CHECK_S
    eng.step_time_s = 0.1
    assert poll.due(100.0) and not poll.due(100.05) and poll.due(100.11)


def test_handoff_round_trip_keeps_rows_of_logits() -> None:
    kv = torch.randn(2, 2, 1, 5, 4)
    logits = torch.randn(3, 7)  # the 3 entries of a grid row, vocabulary of 7
    arrays = handoff.to_arrays(PrefixKV(kv, logits))
    assert arrays["prompt_kv"].shape == (1, 2, 2, 1, 5, 4) and arrays["prompt_logits"].shape == (1, 21)
    back = handoff.from_arrays(arrays["prompt_kv"], arrays["prompt_logits"], vocab_size=7)
    assert torch.equal(back.kv, kv) and torch.equal(back.logits, logits)


def test_handoff_errors_name_the_tensor() -> None:
    with pytest.raises(ValueError, match="prompt_kv / prompt_logits are missing"):
        handoff.from_arrays(None, np.zeros((1, 7), np.float32), 7)
    with pytest.raises(ValueError, match="not a multiple of the vocabulary"):
        handoff.from_arrays(np.zeros((1, 1, 2, 1, 1, 1), np.float32), np.zeros((1, 8), np.float32), 7)
