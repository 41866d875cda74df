"""OpenAI ``top_logprobs`` end to end against the real tritonserver: the official ``openai`` SDK
through the front (chat and completions, streaming and not), the ensemble's and
``tensorrt_llm_bls``' ``top_logprobs_*`` outputs through tritonclient and the project's client
(gRPC and HTTP), and the bad-input rules.

Greedy decoding (the server's default) makes the sampled token the most likely one, so it must
be the first alternative, with the same log probability.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from client import MultiStreamClient, StreamDelta
from tests.reliability_helpers import request_inputs
from tests.test_frontend import MODEL, QUESTION, Front, _post

pytestmark = pytest.mark.server

K = 3
MSGS = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def front(triton_server) -> Iterator[Front]:
    f = Front(triton_server.grpc_url)
    yield f
    f.stop()


def _check_chat_entries(entries: list) -> None:
    """Each sampled token: k alternatives, log probabilities <= 0 and sorted, itself the first."""
    assert entries
    for e in entries:
        tops = e.top_logprobs
        assert len(tops) == K, e
        values = [t.logprob for t in tops]
        assert all(v <= 0 for v in values) and values == sorted(values, reverse=True), values
        assert all(isinstance(t.token, str) and isinstance(t.bytes, list) for t in tops)
        assert tops[0].logprob == pytest.approx(e.logprob, abs=1e-6)
        assert tops[0].token == e.token and tops[0].bytes == e.bytes, (e.token, tops)


def test_chat_top_logprobs_through_the_sdk(front: Front) -> None:
    sdk = front.sdk()
    r = sdk.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=4, logprobs=True, top_logprobs=K)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    _check_chat_entries(content)
    chunks = sdk.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=4, logprobs=True, top_logprobs=K, stream=True
    )
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    _check_chat_entries(streamed)
    assert [e.token for e in streamed] == [e.token for e in content]


def test_completions_logprobs_k_through_the_sdk(front: Front) -> None:
    sdk = front.sdk()
    prompt = "The capital of France is"
    r = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=K)
    lp = r.choices[0].logprobs
    streamed = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=4, logprobs=K, stream=True)
    parts = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    for tokens, values, tops in (
        (lp.tokens, lp.token_logprobs, lp.top_logprobs),
        (
            [t for p in parts for t in p.tokens],
            [v for p in parts for v in p.token_logprobs],
            [d for p in parts for d in p.top_logprobs],
        ),
    ):
        assert len(tops) == len(tokens) == len(values) > 0
        for token, value, top in zip(tokens, values, tops, strict=True):
            assert 1 <= len(top) <= K and list(top.values()) == sorted(top.values(), reverse=True)
            first, first_value = next(iter(top.items()))
            assert first == token and first_value == pytest.approx(value, abs=1e-6) and value <= 0


def _raw_stream(url: str, model: str, inputs: list) -> list:
    """Every response of one gRPC stream request (tritonclient, as NVIDIA's clients read them)."""
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    out = []
    try:
        client.async_stream_infer(
            model, inputs, request_id=uuid.uuid4().hex, enable_empty_final_response=True
        )
        while True:
            result, error = q.get(timeout=120)
            assert error is None, error
            params = result.get_response().parameters
            if result.as_numpy("output_ids") is not None:
                out.append(result)
            if params["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


@pytest.mark.parametrize("model", ["ensemble", "tensorrt_llm_bls"])
def test_top_logprobs_outputs_shapes(triton_server, model: str) -> None:
    """``top_logprobs_*`` are ``[batch, beam, tokens, k]`` beside ``output_log_probs``
    ``[batch, beam, tokens]``, on the ensemble's alias and the BLS model alike."""
    inputs = request_inputs(QUESTION, 3, return_log_probs=(True, "BOOL"), top_logprobs=(K, "INT32"))
    responses = _raw_stream(triton_server.grpc_url, model, inputs)
    assert responses
    for res in responses:
        n = res.as_numpy("output_ids").size
        lps = res.as_numpy("output_log_probs")
        ids, values, text = (res.as_numpy(f"top_logprobs_{x}") for x in ("ids", "values", "text"))
        assert lps.shape == (1, 1, n) and ids.shape == values.shape == text.shape == (1, 1, n, K)
        assert ids.dtype == np.int32 and values.dtype == np.float32
        if n:
            assert ids[0, 0, 0, 0] == res.as_numpy("output_ids").reshape(-1)[0]  # greedy: the top one
            assert values[0, 0, 0, 0] == lps[0, 0, 0]


@pytest.mark.parametrize(("protocol", "model"), [("grpc", "multistream"), ("http", "multistream")])
def test_project_client_parses_top_logprobs(triton_server, protocol: str, model: str) -> None:
    url = triton_server.grpc_url if protocol == "grpc" else triton_server.http_url
    with MultiStreamClient(url, protocol, model_name=model) as c:
        events = list(c.generate(QUESTION, max_tokens=3, return_log_probs=True, top_logprobs=K))
    deltas = [e for e in events if isinstance(e, StreamDelta) and e.token_ids]
    assert deltas
    for d in deltas:
        assert len(d.top_logprobs) == len(d.token_ids) == len(d.logprobs)
        for tok, lp, tops in zip(d.token_ids, d.logprobs, d.top_logprobs, strict=True):
            assert [t.id for t in tops][0] == tok and tops[0].logprob == lp and len(tops) == K
            assert tops[0].token.encode("utf-8") == tops[0].bytes or tops[0].token.startswith("bytes:")


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ("chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
        ("chat/completions", {"top_logprobs": 3}, "top_logprobs"),
        ("chat/completions", {"logprobs": False, "top_logprobs": 3}, "top_logprobs"),
        ("completions", {"logprobs": 21}, "logprobs"),
        ("completions", {"logprobs": -1}, "logprobs"),
    ],
)
def test_bad_top_logprobs_are_400s_naming_the_field(front: Front, path: str, extra: dict, param: str) -> None:
    body = {"model": MODEL, "max_tokens": 2} | (
        {"messages": MSGS} if path.startswith("chat") else {"prompt": "The capital of France is"}
    )
    status, err, _ = _post(f"{front.url}/v1/{path}", body | extra)
    assert status == 400 and err["error"]["param"] == param, err
    assert param in err["error"]["message"], err
