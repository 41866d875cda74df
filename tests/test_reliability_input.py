"""Bad input against the real ``multistream`` ensemble: a clear error, and the server keeps serving.

Why against a real tritonserver: half of the rules are Triton's own (dtype, shape, required
inputs, checked against the ensemble's config.pbtxt before any Python runs) and half are
``preprocessing``'s (``backend.serving.request``); only the real server shows what a client
actually gets. Every expected message must name the input and the rule it breaks.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.serving.request import INPUTS, LIST_INPUTS
from client import MultiStreamClient, MultiStreamError
from tests.reliability_helpers import (
    assert_serves_normally,
    request_inputs,
    stream_infer,
    tensor,
)

pytestmark = pytest.mark.server

#: The fixture's limits (tests/conftest.py: max_context 1024 -> max_tokens_limit 1024).
MAX_CONTEXT = 1024
TRITON_TYPE = {
    "TYPE_STRING": "BYTES",
    "TYPE_INT32": "INT32",
    "TYPE_FP32": "FP32",
    "TYPE_UINT64": "UINT64",
    "TYPE_BOOL": "BOOL",
}

# (id, prompt, max_tokens, extra inputs {name: (value, datatype)}, substrings the error must hold)
RULES: list[tuple[str, Any, int, dict[str, tuple[Any, str]], list[str]]] = [
    ("empty-prompt", "", 4, {}, ["text_input", "blank"]),
    ("whitespace-prompt", " \n\t  ", 4, {}, ["text_input", "blank"]),
    ("prompt-too-long", "word " * 1200, 4, {}, ["text_input", "too long", "tokens", f"limit is {MAX_CONTEXT}"]),
    ("prompt-plus-max-tokens-too-long", "word " * 500, 1000, {}, ["max_tokens", "tokens", f"limit is {MAX_CONTEXT}"]),
    ("invalid-utf8", b"caf\xc3 \xff\xfe", 4, {}, ["text_input", "UTF-8"]),
    ("max-tokens-zero", "Hi", 0, {}, ["max_tokens", f"1..{MAX_CONTEXT}", "got 0"]),
    ("max-tokens-negative", "Hi", -5, {}, ["max_tokens", f"1..{MAX_CONTEXT}", "got -5"]),
    ("max-tokens-above-limit", "Hi", MAX_CONTEXT + 1, {}, ["max_tokens", f"1..{MAX_CONTEXT}", f"got {MAX_CONTEXT + 1}"]),
    ("temperature-negative", "Hi", 4, {"temperature": (-0.5, "FP32")}, ["temperature", ">= 0", "-0.5"]),
    ("temperature-nan", "Hi", 4, {"temperature": (float("nan"), "FP32")}, ["temperature", ">= 0"]),
    ("top-p-zero", "Hi", 4, {"top_p": (0.0, "FP32")}, ["top_p", "(0, 1]", "0.0"]),
    ("top-p-above-one", "Hi", 4, {"top_p": (1.5, "FP32")}, ["top_p", "(0, 1]", "1.5"]),
    ("top-p-negative", "Hi", 4, {"top_p": (-0.1, "FP32")}, ["top_p", "(0, 1]"]),
    ("top-k-negative", "Hi", 4, {"top_k": (-1, "INT32")}, ["top_k", ">= 0", "-1"]),
    ("repetition-penalty-zero", "Hi", 4, {"repetition_penalty": (0.0, "FP32")}, ["repetition_penalty", "> 0"]),
    ("repetition-penalty-inf", "Hi", 4, {"repetition_penalty": (float("inf"), "FP32")}, ["repetition_penalty", "> 0"]),
    ("beam-width-2", "Hi", 4, {"beam_width": (2, "INT32")}, ["beam_width", "must be 1", "not supported"]),
    ("num-return-sequences-15", "Hi", 4, {"num_return_sequences": (15, "INT32")}, ["num_return_sequences", "1..14", "output stream"]),
    ("return-context-logits", "Hi", 4, {"return_context_logits": (True, "BOOL")}, ["return_context_logits", "not supported"]),
    ("return-generation-logits", "Hi", 4, {"return_generation_logits": (True, "BOOL")}, ["return_generation_logits", "not supported"]),
    ("frequency-penalty-above-2", "Hi", 4, {"frequency_penalty": (2.5, "FP32")}, ["frequency_penalty", "[-2, 2]", "2.5"]),
    ("presence-penalty-below-minus-2", "Hi", 4, {"presence_penalty": (-3.0, "FP32")}, ["presence_penalty", "[-2, 2]", "-3.0"]),
    ("min-length-above-max-tokens", "Hi", 4, {"min_length": (5, "INT32")}, ["min_tokens", "0..max_tokens (4)", "got 5"]),
    ("min-tokens-and-min-length-disagree", "Hi", 8, {"min_length": (2, "INT32"), "min_tokens": (3, "INT32")}, ["min_tokens", "min_length", "disagree"]),
    ("attention-mode-unknown", "Hi", 4, {"attention_mode": ("sideways", "BYTES")}, ["attention_mode", "isolated", "cross", "sideways"]),
    ("sync-unknown", "Hi", 4, {"sync": ("later", "BYTES")}, ["sync", "none", "revise"]),
    ("too-many-reasoning-streams", "Hi", 4, {"reasoning_streams": (5, "INT32")}, ["reasoning_streams", "0..4", "got 5"]),
    ("negative-reasoning-streams", "Hi", 4, {"reasoning_streams": (-1, "INT32")}, ["reasoning_streams", "0..4"]),
    ("reasoning-budget-zero", "Hi", 4, {"reasoning_streams": (1, "INT32"), "reasoning_budget": (0, "INT32")}, ["reasoning_budget", "got 0"]),
    ("stream-not-a-bool", "Hi", 4, {"stream": ("maybe", "BYTES")}, ["stream", "BOOL"]),
    ("session-id-bad-chars", "Hi", 4, {"session_id": ("../etc", "BYTES")}, ["session_id", "letters, digits"]),
    ("top-logprobs-above-20", "Hi", 4, {"return_log_probs": (True, "BOOL"), "top_logprobs": (21, "INT32")}, ["top_logprobs", "0..20", "got 21"]),
    ("top-logprobs-without-log-probs", "Hi", 4, {"top_logprobs": (2, "INT32")}, ["top_logprobs", "needs return_log_probs"]),
]  # fmt: skip


def _error(url: str, inputs: list[Any]) -> str:
    out = stream_infer(url, inputs, timeout=60)
    assert out.error is not None, f"expected an error, got {out.responses}"
    assert not out.error.startswith("TIMEOUT"), out.error
    return out.error


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "extra", "expected"), [r[1:] for r in RULES], ids=[r[0] for r in RULES]
)
def test_rule_violation_names_field_and_rule(triton_server, prompt, max_tokens, extra, expected) -> None:
    """Each broken rule gets an error naming the input and the rule; the server keeps serving."""
    url = triton_server.grpc_url
    message = _error(url, request_inputs(prompt, max_tokens, **extra))
    for part in expected:
        assert part in message, f"{part!r} missing from the error: {message!r}"
    assert "Traceback" not in message and "failed:" not in message, message
    assert_serves_normally(url)


def _wrong_type(triton_type: str) -> tuple[Any, str]:
    """A value of a data type the input does not accept."""
    return (7, "INT32") if triton_type == "BYTES" else ("seven", "BYTES")


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_wrong_dtype_of_every_input(triton_server, name) -> None:
    """Triton checks data types against the ensemble config before any model runs."""
    expected_type = TRITON_TYPE[INPUTS[name]]
    value, dtype = _wrong_type(expected_type)
    inputs = {"text_input": ("Hi", "BYTES"), "max_tokens": (4, "INT32"), name: (value, dtype)}
    message = _error(triton_server.grpc_url, [tensor(n, v, t) for n, (v, t) in inputs.items()])
    assert f"'{name}'" in message and "data-type" in message and expected_type in message, message


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_wrong_shape_of_every_input(triton_server, name) -> None:
    """Every input is ``[batch, 1]`` (``[batch, n]`` for word lists): a missing batch dimension,
    or two values where one is expected, is refused with the expected and the actual shape."""
    dtype = TRITON_TYPE[INPUTS[name]]
    good = {"text_input": "Hi", "max_tokens": 4}
    value = {"BYTES": "x", "INT32": 1, "FP32": 0.5, "UINT64": 1, "BOOL": False}[dtype]
    inputs = [tensor(n, v, TRITON_TYPE[INPUTS[n]]) for n, v in good.items() if n != name]
    inputs.append(tensor(name, [value], dtype, shape=(1,)))  # no batch dimension
    message = _error(triton_server.grpc_url, inputs)
    assert f"'{name}'" in message and "shape" in message and "got [1]" in message, message
    if name not in LIST_INPUTS:
        inputs[-1] = tensor(name, [value, value], dtype, shape=(1, 2))
        message = _error(triton_server.grpc_url, inputs)
        assert f"'{name}'" in message and "got [1,2]" in message, message


def test_batch_of_two_and_missing_required_input(triton_server) -> None:
    url = triton_server.grpc_url
    two = [
        tensor("text_input", ["a", "b"], "BYTES", shape=(2, 1)),
        tensor("max_tokens", [4, 4], "INT32", shape=(2, 1)),
    ]
    message = _error(url, two)
    assert "batch size 2" in message and "one request per prompt" in message, message
    message = _error(url, [tensor("text_input", "Hi", "BYTES")])
    assert "max_tokens" in message and "missing required input" in message, message
    assert_serves_normally(url)


def test_session_input_for_unknown_and_ended_sessions(triton_server) -> None:
    """``session_control`` refuses a session that never existed or has ended, naming ``session_id``."""
    with MultiStreamClient(triton_server.grpc_url, idle_timeout_s=60) as client:
        with pytest.raises(
            MultiStreamError, match=r"session_id 'no-such-session-\w+' is not a running session"
        ):
            client.push_input(f"no-such-session-{uuid.uuid4().hex[:6]}", "hello")
        sid = f"rel-ended-{uuid.uuid4().hex[:8]}"
        done = client.generate("Say hi.", max_tokens=3, session_id=sid).result()
        assert done.session_id == sid
        for call in (lambda: client.push_input(sid, "more"), lambda: client.cancel(sid)):
            with pytest.raises(
                MultiStreamError, match=rf"session_id '{sid}' is not a running session \(unknown or ended\)"
            ):
                call()
    assert_serves_normally(triton_server.grpc_url)


# -- property: random inputs -----------------------------------------------------------------------

_TYPES = ["BYTES", "INT32", "INT64", "UINT64", "FP32", "FP64", "BOOL"]
_SHAPES = [(1, 1), (1, 1), (1, 1), (1, 1), (1,), (2, 1), (1, 2), (1, 0)]


def _values(dtype: str, name: str) -> st.SearchStrategy:
    if dtype == "BYTES":
        return st.one_of(
            st.text(max_size=60),
            st.binary(max_size=40),
            st.sampled_from(["isolated", "cross", "revise", "none", "true"]),
        )
    if dtype == "BOOL":
        return st.booleans()
    if dtype in ("FP32", "FP64"):
        return st.one_of(st.floats(-2, 3), st.floats(allow_nan=True, allow_infinity=True, width=32))
    lo = 0 if dtype == "UINT64" else -(2**31)
    hi = 2**63 if dtype == "UINT64" else 2**31 - 1
    if name in ("max_tokens", "reasoning_budget"):  # keep valid generations short: < 60 s for 40 examples
        return st.one_of(st.integers(max(lo, -3), 8), st.sampled_from([0, MAX_CONTEXT + 1, hi]))
    return st.one_of(st.integers(max(lo, -3), 6), st.integers(lo, hi))


_VALID = {
    "stream": ("BOOL", st.booleans()),
    "temperature": ("FP32", st.floats(0, 2)),
    "top_p": ("FP32", st.floats(0.05, 1)),
    "top_k": ("INT32", st.integers(0, 50)),
    "seed": ("UINT64", st.integers(0, 2**63)),
    "repetition_penalty": ("FP32", st.floats(0.5, 2)),
    "stop_words": ("BYTES", st.text(min_size=1, max_size=4)),
    "reasoning_streams": ("INT32", st.integers(0, 4)),
    "reasoning_budget": ("INT32", st.integers(1, 6)),
    "attention_mode": ("BYTES", st.sampled_from(["isolated", "cross"])),
}


@st.composite
def valid_request(draw: st.DrawFn) -> list[tuple[str, str, tuple[int, ...], list[Any]]]:
    """Random but valid: a non-blank prompt, 1..6 tokens, a random subset of valid options."""
    text = draw(st.text(min_size=1, max_size=80).filter(lambda t: t.strip()))
    spec = [
        ("text_input", "BYTES", (1, 1), [text]),
        ("max_tokens", "INT32", (1, 1), [draw(st.integers(1, 6))]),
    ]
    for name in draw(st.lists(st.sampled_from(sorted(_VALID)), max_size=6, unique=True)):
        dtype, values = _VALID[name]
        spec.append((name, dtype, (1, 1), [draw(values)]))
    return spec


@st.composite
def random_request(draw: st.DrawFn) -> list[tuple[str, str, tuple[int, ...], list[Any]]]:
    """A random subset of the inputs with random values; in about a third of the requests one
    input also gets a random type and shape (Triton's own checks), the rest reach
    ``preprocessing`` (and, when valid, generate a few tokens)."""
    if draw(st.integers(0, 2)) == 0:  # a third: valid values, so generation paths run too
        return draw(valid_request())
    names = draw(st.lists(st.sampled_from(sorted(INPUTS)), max_size=8, unique=True))
    for required in ("text_input", "max_tokens"):
        if required not in names and draw(st.integers(0, 9)) > 0:
            names.append(required)
    broken = draw(st.sampled_from(names)) if names and draw(st.integers(0, 2)) == 0 else None
    spec = []
    for name in names:
        dtype = TRITON_TYPE[INPUTS[name]]
        shape: tuple[int, ...] = (1, draw(st.integers(0, 3))) if name in LIST_INPUTS else (1, 1)
        if name == broken:
            dtype = draw(st.sampled_from(_TYPES))
            shape = draw(st.sampled_from(_SHAPES))
        n = 1
        for d in shape:
            n *= d
        values = [draw(_values(dtype, name)) for _ in range(n)]
        spec.append((name, dtype, shape, values))
    return spec


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(spec=random_request())
def test_random_inputs_get_a_result_or_a_clean_error(triton_server, spec) -> None:
    """Whatever arrives, the answer is a complete result or a clean error, never a hang or a crash."""
    inputs = [tensor(name, values, dtype, shape=shape) for name, dtype, shape, values in spec]
    out = stream_infer(triton_server.grpc_url, inputs, timeout=45)
    assert out.error is None or not out.error.startswith("TIMEOUT"), f"hang on {spec}: {out.error}"
    if out.error is not None:
        assert out.error.strip(), f"empty error for {spec}"
        assert "Traceback" not in out.error and "Error(" not in out.error, (
            f"unclean error for {spec}: {out.error}"
        )
        return
    assert out.final, f"no final response for {spec}"
    streams = {r["stream_name"] for r in out.responses if r.get("stream_name") and r["stream_name"] != "user"}
    reasons = out.finish_reasons()
    for name in streams:
        assert reasons.get(name) in ("stop", "length"), (
            f"stream {name} of {spec} ended with {reasons.get(name)!r}"
        )


def test_serves_normally_after_random_inputs(triton_server) -> None:
    """Runs after the property test (file order): the server is still healthy."""
    assert_serves_normally(triton_server.grpc_url)
