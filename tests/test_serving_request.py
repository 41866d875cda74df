"""RequestConfig parsing/validation (no server): every rule names its input."""

from __future__ import annotations

import numpy as np
import pytest

from backend.serving.request import Limits, RequestConfig, RequestError
from backend.serving.session_control import Mailbox, SessionNotFound


def _get(values: dict):
    def get(name: str):
        if name not in values:
            return None
        v = values[name]
        if isinstance(v, list):
            return np.array([[x.encode() if isinstance(x, str) else x for x in v]], dtype=object)
        if isinstance(v, str):
            return np.array([[v.encode()]], dtype=object)
        return np.array([[v]])

    return get


def parse(**values) -> RequestConfig:
    values.setdefault("text_input", "hello")
    values.setdefault("max_tokens", np.int32(8))
    return RequestConfig.from_inputs(_get(values), Limits(max_tokens_limit=100, max_reasoning_streams=4))


def test_defaults_and_round_trip() -> None:
    cfg = parse(stop_words=["a", "b"], seed=np.uint64(7), stream=True)
    assert (cfg.max_tokens, cfg.stream, cfg.temperature, cfg.top_p, cfg.stop, cfg.seed) == (
        8,
        True,
        0.0,
        1.0,
        ["a", "b"],
        7,
    )
    assert cfg.attention_mode == "isolated" and cfg.reasoning_budget == 256 and cfg.session_id
    assert RequestConfig.from_json(cfg.to_json()) == cfg
    s = cfg.output_sampling()
    assert s.max_tokens == 8 and s.greedy and s.stop == ["a", "b"]
    r0, r1 = cfg.reasoning_sampling(0), cfg.reasoning_sampling(1)
    assert r0.seed != r1.seed and r0.temperature > 0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"top_p": np.float32(1.5)}, "top_p must be in (0, 1], got 1.5"),
        ({"temperature": np.float32(-1)}, "temperature must be >= 0"),
        ({"top_k": np.int32(-2)}, "top_k must be >= 0"),
        ({"max_tokens": np.int32(0)}, "max_tokens must be in 1..100"),
        ({"max_tokens": np.int32(101)}, "max_tokens must be in 1..100"),
        ({"text_input": "   "}, "text_input must not be blank"),
        ({"beam_width": np.int32(2)}, "beam_width must be 1"),
        (
            {"num_return_sequences": np.int32(15)},
            "num_return_sequences must be in 1..14 (each answer is an output",
        ),
        ({"num_return_sequences": np.int32(0)}, "num_return_sequences must be in 1..14"),
        (
            {
                "num_return_sequences": np.int32(13),
                "reasoning_streams": np.int32(2),
                "attention_mode": "cross",
            },
            "num_return_sequences must be in 1..12 (each answer is an output stream of the one decode session, "
            "at most 14 streams including 2 injected reasoning streams), got 13",
        ),
        (
            {"num_return_sequences": np.int32(2), "reasoning_streams": np.int32(1), "sync": "revise"},
            "num_return_sequences must be 1 with sync 'revise'",
        ),
        ({"return_context_logits": True}, "return_context_logits is not supported"),
        ({"presence_penalty": np.float32(2.5)}, "presence_penalty must be in [-2, 2], got 2.5"),
        ({"frequency_penalty": np.float32(-3)}, "frequency_penalty must be in [-2, 2]"),
        ({"min_tokens": np.int32(9)}, "min_tokens must be in 0..max_tokens (8), got 9"),
        (
            {"min_tokens": np.int32(2), "min_length": np.int32(3)},
            "min_tokens (2) and min_length (3) disagree",
        ),
        ({"reasoning_streams": np.int32(5)}, "reasoning_streams must be in 0..4"),
        ({"attention_mode": "mixed"}, "attention_mode must be one of"),
        ({"sync": "revise"}, "sync 'revise' needs reasoning_streams >= 1"),
        ({"repetition_penalty": np.float32(0)}, "repetition_penalty must be > 0"),
        ({"session_id": "../x"}, "session_id must be"),
        ({"top_logprobs": np.int32(21), "return_log_probs": True}, "top_logprobs must be in 0..20, got 21"),
        ({"top_logprobs": np.int32(-1), "return_log_probs": True}, "top_logprobs must be in 0..20, got -1"),
        ({"top_logprobs": np.int32(3)}, "top_logprobs needs return_log_probs true"),
    ],
)
def test_errors_name_the_field(values: dict, message: str) -> None:
    with pytest.raises(RequestError) as err:
        parse(**values)
    assert message in str(err.value)


def test_required_and_batch() -> None:
    with pytest.raises(RequestError, match="text_input is required"):
        RequestConfig.from_inputs(_get({"max_tokens": np.int32(3)}))
    get = _get({"max_tokens": np.int32(3)})

    def batched(name: str):
        if name == "text_input":
            return np.array([[b"a"], [b"b"]], dtype=object)
        return get(name)

    with pytest.raises(RequestError, match="batch size 2 is not supported"):
        RequestConfig.from_inputs(batched)


def test_context_check() -> None:
    cfg = parse(max_tokens=np.int32(90))
    with pytest.raises(RequestError, match="context limit is 100"):
        cfg.check_context(20, 100)
    cfg = parse(reasoning_streams=np.int32(2), reasoning_budget=np.int32(60))
    with pytest.raises(RequestError, match="reasoning_budget"):
        cfg.check_context(20, 100)
    # k answers share the session's slot: the prompt plus k x max_tokens must fit it.
    cfg = parse(max_tokens=np.int32(40), num_return_sequences=np.int32(2))
    cfg.check_context(20, 100)
    cfg = parse(max_tokens=np.int32(45), num_return_sequences=np.int32(2))
    with pytest.raises(
        RequestError, match=r"for each of num_return_sequences \(2\) answers needs 110 positions"
    ):
        cfg.check_context(20, 100)


def test_mailbox(tmp_path) -> None:
    box = Mailbox(tmp_path)
    with pytest.raises(SessionNotFound, match="session_id 's1'"):
        box.post("s1", "input", "hi")
    box.register("s1")
    with pytest.raises(ValueError, match="already in use"):
        box.register("s1")
    box.post("s1", "input", "one")
    box.post("s1", "input", "two")
    box.post("s1", "cancel")
    assert box.poll("s1") == [("input", "one"), ("input", "two"), ("cancel", "")]
    assert box.poll("s1") == []
    box.cancel_reasoning("s1")
    assert box.reasoning_cancelled("s1")
    box.clear_reasoning_cancel("s1")
    box.unregister("s1")
    with pytest.raises(SessionNotFound):
        box.post("s1", "input", "late")
