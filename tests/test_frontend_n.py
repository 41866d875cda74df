"""``n`` > 1 on the OpenAI front, through the official ``openai`` SDK, against the real server.

The front sends such a request to the ensemble like any other: decode runs the n answers as
n answer streams of ONE engine session sharing the prompt KV (``backend/serving/decode.py``,
``backend.engine.session.answer_specs``). ``ignore_eos`` with a small ``max_tokens`` makes
every choice exactly ``max_tokens`` long, so usage can be checked to the token; a seeded,
sampled request (seed, seed + 1 per choice) makes the choices differ reproducibly.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator

import pytest

from tests.reliability_helpers import gauge_sum, scrape, wait_for
from tests.test_frontend import MODEL, Front, _post

pytestmark = pytest.mark.server

TOKENS = 6
SAMPLED = {"temperature": 1.0, "seed": 11, "max_tokens": TOKENS, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def front(triton_server) -> Iterator[Front]:
    f = Front(triton_server.grpc_url, "--max-concurrent", "8")
    yield f
    f.stop()


def _idle(triton_server) -> bool:
    return gauge_sum(scrape(triton_server.metrics_url), "multistream_active_sessions") == 0


def test_chat_n2_whole_and_streamed(front: Front) -> None:
    sdk = front.sdk()
    extra = {"seed": SAMPLED["seed"], "ignore_eos": True}
    r = sdk.chat.completions.create(
        model=MODEL, messages=CHAT, n=2, temperature=1.0, max_tokens=TOKENS, extra_body=extra
    )
    assert [c.index for c in r.choices] == [0, 1]
    texts = [c.message.content for c in r.choices]
    assert all(t.strip() for t in texts) and texts[0] != texts[1], texts
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert r.usage.completion_tokens == 2 * TOKENS and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 2 * TOKENS

    parts, finish, usage = {0: "", 1: ""}, {}, None
    for chunk in sdk.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        n=2,
        temperature=1.0,
        max_tokens=TOKENS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert parts == {0: texts[0], 1: texts[1]}  # seeded: the same two answers streamed
    assert usage is not None and usage.completion_tokens == 2 * TOKENS


def test_completions_n2_whole_and_streamed(front: Front) -> None:
    sdk = front.sdk()
    extra = {"seed": SAMPLED["seed"], "ignore_eos": True}
    kw = dict(model=MODEL, prompt="The sky is", n=2, temperature=1.0, max_tokens=TOKENS, extra_body=extra)
    r = sdk.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text != r.choices[1].text and all(c.text for c in r.choices)
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert r.usage.completion_tokens == 2 * TOKENS
    parts, finish = {0: "", 1: ""}, {}
    for chunk in sdk.completions.create(stream=True, **kw):
        for c in chunk.choices:
            parts[c.index] += c.text or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert parts == {0: r.choices[0].text, 1: r.choices[1].text}
    assert finish == {0: "length", 1: "length"}


def test_responses_refuse_n(front: Front) -> None:
    status, err, _ = _post(f"{front.url}/v1/responses", {"model": MODEL, "input": "Hi", "n": 2})
    assert status == 400 and err["error"]["param"] == "n", err
    assert "/v1/chat/completions" in err["error"]["message"]


def test_n_beyond_the_streams_of_a_session_is_400(front: Front) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "n": 99}
    status, err, _ = _post(f"{front.url}/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == "n", err
    assert "1..14" in err["error"]["message"] and "one decode session" in err["error"]["message"], err


def _start_long(front: Front) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse, str]:
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=60)
    # n answers share one slot: the prompt plus n x max_tokens must fit max_context (1024 here).
    body = {"model": MODEL, "messages": CHAT, "n": 2, "max_tokens": 400, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # running
    return conn, resp, resp.getheader("X-Session-Id")


def test_disconnect_frees_the_n_answers_session(front: Front, triton_server) -> None:
    """n = 2 is ONE engine session (the active-session gauge shows 1, and stays there while both
    answers stream); a client that hangs up frees it."""
    assert wait_for(lambda: _idle(triton_server), 30), "the server is not idle before the test"
    conn, resp, _ = _start_long(front)
    seen = set()
    for _ in range(20):  # both answers are streaming now
        line = resp.readline()
        if line.startswith(b"data: {"):
            seen |= {c["index"] for c in json.loads(line[6:])["choices"]}
        if seen == {0, 1}:
            break
    assert seen == {0, 1}, seen
    gauge = lambda: gauge_sum(scrape(triton_server.metrics_url), "multistream_active_sessions")  # noqa: E731
    assert wait_for(lambda: gauge() == 1, 10), "the two answers never showed as one session"
    assert max(gauge() for _ in range(5)) == 1, "the two answers ran as more than one session"
    resp.close()
    conn.close()  # hang up mid-stream
    assert wait_for(lambda: _idle(triton_server), 30), "sessions of a client that disconnected still run"


def test_session_cancel_stops_all_n(front: Front, triton_server) -> None:
    """``/v1/sessions/{id}/cancel`` with the request's id stops both answers (they are one
    session), and both choices end ``cancelled``."""
    assert wait_for(lambda: _idle(triton_server), 30), "the server is not idle before the test"
    conn, resp, sid = _start_long(front)
    status, body, _ = _post(f"{front.url}/v1/sessions/{sid}/cancel", {})
    assert status == 200 and body["accepted"], body
    finish = {}
    for line in resp:
        if line.startswith(b"data: {"):
            for c in json.loads(line[6:])["choices"]:
                if c.get("finish_reason"):
                    finish[c["index"]] = c["finish_reason"]
    conn.close()
    assert finish == {0: "cancelled", 1: "cancelled"}, finish
    assert wait_for(lambda: _idle(triton_server), 30)
