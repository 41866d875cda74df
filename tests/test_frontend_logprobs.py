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


#: A prompt whose greedy answer (the default model) is Japanese script, whose characters the
#: byte-level tokenizer splits across tokens: deltas whose tokens have no text yet.
SPLIT_PROMPT = "Write the word cat in Japanese."


def test_streamed_logprobs_cover_tokens_without_text(front: Front) -> None:
    """Every answer token's entry streams, those of a character split across tokens too
    (their chunk has empty text): one streamed entry per token the usage counts, on chat and
    on completions. (Compared with the usage of the same request, not with a second request:
    the split characters' bytes are near-ties that bf16 rounding may flip between runs.)"""
    sdk = front.sdk()
    msgs = [{"role": "user", "content": SPLIT_PROMPT}]
    chunks = list(
        sdk.chat.completions.create(
            model=MODEL,
            messages=msgs,
            max_tokens=12,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert len(streamed) == chunks[-1].usage.completion_tokens == 12
    assert any(e.token == "" for e in streamed), "the prompt no longer splits characters: pick another"
    assert any(c.choices and c.choices[0].delta.content == "" and c.choices[0].logprobs for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "".join(e.token for e in streamed) == text and text

    parts = list(
        sdk.completions.create(
            model=MODEL,
            prompt="Emoji: \U0001f431\U0001f436",  # raw text: it goes on in emoji, 4 bytes each
            max_tokens=12,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    tokens = [t for c in parts if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == parts[-1].usage.completion_tokens == 12 and "" in tokens


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


# ---------------------------------------------------------------------------------- responses
INCLUDE = ["message.output_text.logprobs"]


def test_responses_logprobs_match_chat(front: Front) -> None:
    """``include`` + ``top_logprobs`` on ``/v1/responses``, streaming and not and through GET:
    typed by the SDK, the same tokens and values as chat's ``logprobs`` for the same greedy
    request, each delta's entries spelling that delta's text."""
    from openai.types.responses import ResponseOutputText

    sdk = front.sdk()
    chat = sdk.chat.completions.create(
        model=MODEL, messages=MSGS, max_tokens=6, logprobs=True, top_logprobs=K
    )
    want = chat.choices[0].logprobs.content
    r = sdk.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=6, include=INCLUDE, top_logprobs=K
    )
    part = next(o for o in r.output if o.type == "message").content[0]
    assert isinstance(part, ResponseOutputText) and r.top_logprobs == K
    assert len(part.logprobs) == r.usage.output_tokens
    _check_chat_entries(part.logprobs)
    assert [e.token for e in part.logprobs] == [e.token for e in want]
    assert [e.logprob for e in part.logprobs] == pytest.approx([e.logprob for e in want], abs=1e-5)
    assert [[t.token for t in e.top_logprobs] for e in part.logprobs] == [
        [t.token for t in e.top_logprobs] for e in want
    ]
    assert "".join(e.token for e in part.logprobs) == part.text == chat.choices[0].message.content
    got = sdk.responses.retrieve(r.id)
    assert got.output[0].content[0].logprobs == part.logprobs

    with sdk.responses.stream(
        model=MODEL, input=QUESTION, max_output_tokens=6, include=INCLUDE, top_logprobs=K
    ) as stream:
        events = list(stream)
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    for d in deltas:
        assert d.logprobs and "".join(e.token for e in d.logprobs) == d.delta
        for e in d.logprobs:
            values = [t.logprob for t in e.top_logprobs]
            assert len(values) == K and values == sorted(values, reverse=True) and values[0] == e.logprob
    streamed = [e for d in deltas for e in d.logprobs]
    assert [e.token for e in streamed] == [e.token for e in part.logprobs]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in part.logprobs], abs=1e-5)
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [e.token for e in done.logprobs] == [e.token for e in streamed]
    final = next(o for o in events[-1].response.output if o.type == "message").content[0]
    assert [e.logprob for e in final.logprobs] == [e.logprob for e in streamed]


def test_responses_without_include_have_no_logprobs(front: Front) -> None:
    r = front.sdk().responses.create(model=MODEL, input=QUESTION, max_output_tokens=3)
    assert r.output_text and r.output[0].content[0].logprobs == []


def test_responses_accept_includes_with_nothing_to_add(front: Front) -> None:
    """OpenAI's other ``include`` values (what the Agents SDK sends with ``store: false``, tool
    results) have nothing to add on this server: accepted, and only logprobs change the response."""
    sdk = front.sdk()
    r = sdk.responses.create(
        model=MODEL,
        input=QUESTION,
        max_output_tokens=3,
        include=["reasoning.encrypted_content", "file_search_call.results"],
    )
    assert r.error is None and r.output_text and r.output[0].content[0].logprobs == []
    r = sdk.responses.create(
        model=MODEL, input=QUESTION, max_output_tokens=3, include=["reasoning.encrypted_content", *INCLUDE]
    )
    assert len(r.output[0].content[0].logprobs) == r.usage.output_tokens


def test_responses_logprobs_without_alternatives(front: Front) -> None:
    """``top_logprobs`` 0 (or left out): each token's own log probability, no alternatives."""
    r = front.sdk().responses.create(model=MODEL, input=QUESTION, max_output_tokens=3, include=INCLUDE)
    entries = r.output[0].content[0].logprobs
    assert len(entries) == r.usage.output_tokens and all(
        e.top_logprobs == [] and e.logprob <= 0 for e in entries
    )


@pytest.mark.parametrize(
    ("extra", "param", "rule"),
    [
        ({"include": INCLUDE, "top_logprobs": 21}, "top_logprobs", "<= 20"),
        ({"include": INCLUDE, "top_logprobs": -1}, "top_logprobs", ">= 0"),
        ({"include": INCLUDE, "top_logprobs": "3"}, "top_logprobs", "integer"),
        ({"include": INCLUDE, "top_logprobs": 2.5}, "top_logprobs", "integer"),
        ({"include": INCLUDE, "top_logprobs": True}, "top_logprobs", "integer"),
        ({"top_logprobs": 3}, "top_logprobs", "message.output_text.logprobs"),
        ({"include": "message.output_text.logprobs"}, "include", "list of strings"),
        ({"include": ["message.output_text.logprob"]}, "include", "is not one of"),
    ],
)
def test_bad_responses_logprobs_are_400s(front: Front, extra: dict, param: str, rule: str) -> None:
    status, err, _ = _post(f"{front.url}/v1/responses", {"model": MODEL, "input": QUESTION} | extra)
    assert status == 400 and err["error"]["param"] == param, err
    assert param in err["error"]["message"] and rule in err["error"]["message"], err
