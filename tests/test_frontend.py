"""The OpenAI front (``python -m frontend``) against the real tritonserver, through the official
``openai`` SDK (code nobody here wrote): sync and async, streaming and not, chat, completions
and responses, several reasoning streams through the SDK's extra fields, input and cancel
mid-stream, a disconnect that frees its session, and the bad-input catalogue.

Greedy requests (the server's default) make the front comparable with the project's own gRPC
client: the same prompt must give the same answer through both.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from client import MultiStreamClient
from launcher.serve import free_port
from tests.reliability_helpers import gauge_sum, scrape, wait_for

pytestmark = pytest.mark.server

MODEL = "multistream"
QUESTION = "What is the capital of France? Answer briefly."
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Front:
    """A ``python -m frontend`` child process on a free port."""

    def __init__(self, triton: str, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "frontend", "--triton", triton, "--port", str(self.port), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ok = wait_for(self._healthy, timeout=60, period=0.2)
        assert ok, f"the front did not start: {self.stop()}"

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            return True  # it died: the assert after wait_for reports its output
        try:
            return _get(f"{self.url}/health")[0] == 200
        except OSError:
            return False

    def sdk(self, key: str = "unused", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120, **kw)

    def async_sdk(self, key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def metrics(self, key: str | None = None) -> dict:
        return _metrics_text(_get(f"{self.url}/metrics", key)[1])

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stdout.read() if self.proc.stdout else ""


def _get(url: str, key: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _post(url: str, body: object, key: str | None = None) -> tuple[int, dict, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read() or b"{}"), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}"), e.headers


def _metrics_text(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


@pytest.fixture(scope="module")
def front(triton_server) -> Iterator[Front]:
    # Over Triton's HTTP endpoint, as the launcher runs it (launcher.serve.FRONT_PROTOCOL);
    # the gRPC upstream is the front's own default, tested by test_api_key_and_busy and the
    # logprobs / n modules.
    f = Front(triton_server.http_url, "--protocol", "http", "--max-concurrent", "8")
    yield f
    f.stop()


def _extra(msg) -> dict:
    return msg.model_extra or {}


# ---------------------------------------------------------------------------------- basics


def test_models_health_and_metrics(front: Front) -> None:
    models = front.sdk().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert front.sdk().models.retrieve(MODEL).id == MODEL
    assert _get(f"{front.url}/health/ready")[0] == 200
    status, text = _get(f"{front.url}/metrics")
    assert status == 200
    for family in ("multistream_front_requests_total", "multistream_front_inflight_requests"):
        assert family in text


def test_chat_answer_equals_the_grpc_clients(front: Front, triton_server) -> None:
    """A plain client reading only ``content`` gets the answer, the same as the project's client."""
    with MultiStreamClient(triton_server.grpc_url) as c:
        direct = c.generate(QUESTION, max_tokens=12).result()
    r = front.sdk().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=12
    )
    assert r.choices[0].message.content == direct.output_text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == direct.tokens["output"]
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens_details.reasoning_tokens == 0
    assert _extra(r)["session_id"]


def test_chat_several_reasoning_streams_sync(front: Front) -> None:
    r = front.sdk().chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}],
        max_tokens=8,
        extra_body={"reasoning_streams": 2, "reasoning_budget": 8},
    )
    msg = r.choices[0].message
    streams = _extra(msg)["reasoning_streams"]
    assert set(streams) == {"reasoning/0", "reasoning/1"} and all(streams.values())
    assert _extra(msg)["reasoning_content"] == _extra(msg)["reasoning"] != ""
    assert msg.content
    details = r.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < r.usage.completion_tokens
    assert details.reasoning_tokens <= 2 * 8


def test_chat_streaming_async_reasoning_deltas(front: Front) -> None:
    async def go() -> list:
        client = front.async_sdk()
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"reasoning_streams": 2, "reasoning_budget": 6},
        )
        chunks = [c async for c in stream]
        await client.close()
        return chunks

    chunks = asyncio.run(go())
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = [d for d in deltas if _extra(d).get("reasoning_content")]
    assert {_extra(d)["stream"] for d in reasoning} == {"reasoning/0", "reasoning/1"}
    assert all(_extra(d)["reasoning"] == _extra(d)["reasoning_content"] and not d.content for d in reasoning)
    answer = "".join(d.content or "" for d in deltas)
    assert answer and all(_extra(d)["stream"] == "output" for d in deltas if d.content)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [finishes[-1]] and finishes[-1] in ("stop", "length")
    usage = chunks[-1].usage  # stream_options.include_usage: a last chunk without choices
    assert not chunks[-1].choices
    assert usage.completion_tokens > usage.completion_tokens_details.reasoning_tokens >= len(reasoning)


def test_chat_stream_and_non_stream_agree(front: Front) -> None:
    sdk = front.sdk()
    kw = dict(model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=10)
    full = sdk.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or "" for c in sdk.chat.completions.create(**kw, stream=True)
    )
    assert streamed == full


def test_multi_turn_goes_through_the_chat_template(front: Front) -> None:
    """An assistant turn in the conversation changes the prompt (and its token count)."""
    sdk = front.sdk()
    one = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    three = sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
        ],
        max_tokens=2,
    )
    assert three.usage.prompt_tokens > one.usage.prompt_tokens + 5


def test_completions_raw_prompt_sync_stream_and_echo(front: Front) -> None:
    sdk = front.sdk()
    prompt = "The capital of France is"
    full = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    text = full.choices[0].text
    assert text and full.object == "text_completion"
    streamed = "".join(
        c.choices[0].text
        for c in sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=8, stream=True)
    )
    assert streamed == text
    echo = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=8, echo=True)
    assert echo.choices[0].text == prompt + text
    # No chat template: the prompt is the raw text's tokens, far fewer than the templated chat.
    chat = sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=1
    )
    assert full.usage.prompt_tokens < chat.usage.prompt_tokens


def test_server_timing_on_request(front: Front) -> None:
    """``stream_options.include_server_timing`` (this server's option): every delta chunk of
    chat and completions carries the server's ``[ms since arrival, ms since the stream's last
    response]``, never more than the client itself waited; without it, no such field."""
    import time

    sdk = front.sdk()
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 6}
    t0 = time.perf_counter()
    chunks = []
    for c in sdk.chat.completions.create(**body, stream=True, stream_options={"include_server_timing": True}):
        chunks.append((time.perf_counter(), c))
    timed = [
        (t, c.model_extra["server_timing_ms"]) for t, c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert timed and all(set(_extra(c)) <= {"session_id", "server_timing_ms"} for _, c in chunks), chunks
    since_arrival = [ms[0] for _, ms in timed]
    assert since_arrival == sorted(since_arrival) and timed[0][1][0] == pytest.approx(timed[0][1][1])
    assert all(0 <= ms[1] <= ms[0] for _, ms in timed)
    # the server's time from arrival to a token is part of what the client waited for it
    assert all(ms[0] <= (t - t0) * 1000 + 1 for t, ms in timed), (t0, timed)
    plain = list(sdk.chat.completions.create(**body, stream=True))
    assert not any("server_timing_ms" in _extra(c) for c in plain)
    completion = sdk.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=4,
        stream=True,
        stream_options={"include_server_timing": True},
    )
    texts = [c for c in completion if c.choices and c.choices[0].text]
    assert texts and all(len(c.model_extra["server_timing_ms"]) == 2 for c in texts)


def test_sampling_options_and_logprobs(front: Front) -> None:
    sdk = front.sdk()
    msgs = [{"role": "user", "content": QUESTION}]
    r = sdk.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=12, logprobs=True, presence_penalty=0.5, frequency_penalty=0.5
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens and all(t.logprob <= 0 for t in content)
    assert "".join(t.token for t in content) == r.choices[0].message.content
    streamed = list(
        sdk.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, logprobs=True, stream=True)
    )
    lps = [
        t.logprob
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert len(lps) == 6 or 0 < len(lps) < 6 and streamed[-1].choices[0].finish_reason == "stop"
    longer = sdk.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=60, extra_body={"min_tokens": 40}
    )
    assert longer.usage.completion_tokens >= 40
    text = sdk.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, logprobs=0)
    assert "".join(text.choices[0].logprobs.tokens) == text.choices[0].text
    for bad, param in (
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"n": 0}, "n"),  # n > 1 works (tests/test_frontend_n.py); 0 breaks its rule
        ({"presence_penalty": 3}, "presence_penalty"),
    ):
        status, err, _ = _post(
            f"{front.url}/v1/chat/completions", {"model": MODEL, "messages": msgs, "max_tokens": 2} | bad
        )
        assert status == 400 and err["error"]["param"] == param, err


# ---------------------------------------------------------------------------------- responses


def test_responses_one_reasoning_item_per_stream(front: Front) -> None:
    sdk = front.sdk()
    r = sdk.responses.create(
        model=MODEL,
        input=QUESTION,
        max_output_tokens=8,
        extra_body={"reasoning_streams": 2, "reasoning_budget": 6},
    )
    kinds = [(o.type, _extra(o)["stream"]) for o in r.output]
    assert sorted(kinds) == [
        ("message", "output"),
        ("reasoning", "reasoning/0"),
        ("reasoning", "reasoning/1"),
    ]
    assert r.output_text and all(o.content[0].text for o in r.output if o.type == "reasoning")
    assert r.usage.output_tokens_details.reasoning_tokens > 0 and r.usage.input_tokens > 5
    got = sdk.responses.retrieve(r.id)
    assert got.output_text == r.output_text and got.status == r.status
    follow = sdk.responses.create(
        model=MODEL, input="Repeat it.", previous_response_id=r.id, max_output_tokens=4
    )
    assert follow.usage.input_tokens > r.usage.input_tokens


def test_responses_streaming_events(front: Front) -> None:
    """Each reasoning stream streams at its own output_index; the SDK's accumulator agrees."""
    sdk = front.sdk()
    with sdk.responses.stream(
        model=MODEL,
        input="Say hello.",
        max_output_tokens=48,
        extra_body={"reasoning_streams": 2, "reasoning_budget": 6},
    ) as stream:
        events = list(stream)
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    added = {e.output_index: e.item for e in events if e.type == "response.output_item.added"}
    reasoning_idx = {i for i, item in added.items() if item.type == "reasoning"}
    message_idx = {i for i, item in added.items() if item.type == "message"}
    assert len(reasoning_idx) == 2 and len(message_idx) == 1
    assert {e.output_index for e in events if e.type == "response.reasoning_text.delta"} == reasoning_idx
    assert {e.output_index for e in events if e.type == "response.output_text.delta"} == message_idx
    assert [e.sequence_number for e in events] == sorted(e.sequence_number for e in events)
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text


def test_responses_background_cancel(front: Front) -> None:
    sdk = front.sdk()
    r = sdk.responses.create(
        model=MODEL,
        input="Count slowly from one to one hundred.",
        max_output_tokens=400,
        background=True,
        extra_body={
            "reasoning_streams": 1,
            "reasoning_budget": 400,
            "ignore_eos": True,
        },  # runs until cancelled
    )
    assert r.status == "in_progress"
    assert wait_for(lambda: sdk.responses.retrieve(r.id).output, timeout=60)
    cancelled = sdk.responses.cancel(r.id)
    assert cancelled.status == "cancelled", cancelled
    assert sdk.responses.retrieve(r.id).usage.output_tokens < 400
    with pytest.raises(openai.BadRequestError):
        sdk.responses.cancel(r.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve("resp_missing")


# ---------------------------------------------------------------------------------- sessions


def test_input_and_cancel_mid_stream(front: Front) -> None:
    sdk = front.sdk()
    sid = f"front-{uuid.uuid4().hex[:12]}"
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count slowly from one to one hundred."}],
        max_tokens=300,
        stream=True,
        extra_body={"session_id": sid, "ignore_eos": True},  # still running at the cancel
    )
    finish = None
    pushed = cancelled_at = 0
    for n, chunk in enumerate(stream):
        assert _extra(chunk)["session_id"] == sid
        if n == 2:
            status, body, _ = _post(f"{front.url}/v1/sessions/{sid}/input", {"input": " Stop counting."})
            assert status == 200 and body["accepted"] is True
            pushed = n
        if n == 4:
            status, body, _ = _post(f"{front.url}/v1/sessions/{sid}/cancel", {})
            assert status == 200 and body["accepted"] is True
            cancelled_at = n
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert pushed and cancelled_at and finish == "cancelled"
    status, body, _ = _post(f"{front.url}/v1/sessions/{sid}/input", {"input": "x"})
    assert status == 404 and body["error"]["param"] == "session_id"


def test_disconnect_mid_stream_frees_the_session(front: Front, triton_server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=60)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": 500,
        "stream": True,
        "ignore_eos": True,  # only the hang-up can end it soon
    }
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    sid = resp.getheader("X-Session-Id")
    assert resp.readline().startswith(b"data: ")  # the stream is running
    assert front.metrics()["multistream_front_inflight_requests"] == 1
    resp.close()
    conn.close()  # hang up mid-stream
    assert wait_for(lambda: front.metrics()["multistream_front_inflight_requests"] == 0, timeout=30)
    assert wait_for(
        lambda: gauge_sum(scrape(triton_server.metrics_url), "multistream_active_sessions") == 0, timeout=30
    ), "the engine still runs the session of a client that disconnected"
    status, err, _ = _post(f"{front.url}/v1/sessions/{sid}/cancel", {})
    assert status == 404  # the server no longer knows it: it ended early, not at max_tokens
    assert front.metrics()["multistream_front_cancelled_total"] >= 1


# ---------------------------------------------------------------------------------- errors

BAD = [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 100000}, "max_completion_tokens"),
    ({"reasoning_streams": 99}, "reasoning_streams"),
    ({"reasoning_budget": 0}, "reasoning_budget"),
    ({"attention_mode": "sideways"}, "attention_mode"),
    ({"sync": "revise"}, "sync"),
    ({"session_id": "no spaces allowed"}, "session_id"),
    ({"seed": -1}, "seed"),
    ({"stop": 7}, "stop"),
    ({"reasoning_streamz": 1}, "reasoning_streamz"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logit_bias": {"1": 5}}, "logit_bias"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
    ),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options"),
    ({"stream_options": {"include_server_timing": 1}}, "stream_options"),
    ({"model": None}, "model"),
]


@pytest.mark.parametrize(("change", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_input_is_400_naming_the_field(front: Front, change: dict, param: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | change
    body = {k: v for k, v in body.items() if v is not None}
    status, err, _ = _post(f"{front.url}/v1/chat/completions", body)
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param, err
    assert err["error"]["message"]


def test_error_statuses(front: Front) -> None:
    sdk = front.sdk()
    with pytest.raises(openai.NotFoundError) as e:
        sdk.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    status, err, _ = _post(f"{front.url}/v1/chat/completions", b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2)
    assert e.value.body["param"] == "prompt"
    assert _post(f"{front.url}/v1/sessions/nope/cancel", {})[0] == 404


def test_api_key_and_busy(triton_server) -> None:
    key = "sk-test-" + uuid.uuid4().hex
    f = Front(triton_server.grpc_url, "--api-key", key, "--max-concurrent", "1")
    try:
        assert _get(f"{f.url}/v1/models")[0] == 401
        assert _get(f"{f.url}/v1/models", "wrong")[0] == 401
        assert _get(f"{f.url}/metrics")[0] == 401
        assert _get(f"{f.url}/health/ready")[0] == 200  # health stays open
        with pytest.raises(openai.AuthenticationError):
            f.sdk("wrong").models.list()
        sdk = f.sdk(key)
        assert [m.id for m in sdk.models.list().data] == [MODEL]
        # One generation in flight; the next is refused at once with 429 + Retry-After.
        stream = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=400,
            stream=True,
            extra_body={"ignore_eos": True},  # still in flight when the next request comes (closed below)
        )
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        status, err, headers = _post(
            f"{f.url}/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
            key,
        )
        assert status == 429 and int(headers["Retry-After"]) >= 1, err
        with pytest.raises(openai.RateLimitError):
            sdk.completions.create(model=MODEL, prompt="x", max_tokens=2)
        stream.close()
        assert wait_for(lambda: f.metrics(key)["multistream_front_inflight_requests"] == 0, timeout=30)
        assert f.metrics(key)["multistream_front_errors_total"] >= 2
    finally:
        f.stop()


def test_triton_down_is_503() -> None:
    f = Front(f"127.0.0.1:{free_port()}")
    try:
        assert _get(f"{f.url}/health/ready")[0] == 503
        with pytest.raises(openai.InternalServerError) as e:
            f.sdk().chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2
            )
        assert e.value.status_code == 503
    finally:
        f.stop()


def test_front_cli_defaults_to_loopback_without_key() -> None:
    from frontend.__main__ import build_parser, settings_from

    s = settings_from(build_parser().parse_args([]))
    assert s.api_key is None or os.environ.get("MULTISTREAM_API_KEY")
    assert settings_from(build_parser().parse_args(["--api-key", "k"])).host_default() == "0.0.0.0"
    if not os.environ.get("MULTISTREAM_API_KEY"):
        assert s.host_default() == "127.0.0.1"


def test_launcher_starts_the_front_beside_triton(triton_server) -> None:
    """What ``scripts/run.sh`` (``python -m launcher``) does once tritonserver is ready."""
    from launcher.serve import FRONT_PROTOCOL, start_front, stop_front

    port = free_port()
    child = start_front(triton_server, port, None)
    try:
        assert child is not None
        assert ["--protocol", FRONT_PROTOCOL] == child.args[child.args.index("--protocol") :][:2]
        assert _get(f"http://127.0.0.1:{port}/health/ready")[0] == 200
        assert json.loads(_get(f"http://127.0.0.1:{port}/v1/models")[1])["data"][0]["id"] == MODEL
    finally:
        stop_front(child)
    assert child.poll() is not None


def test_bench_front_cost_runs_every_path(front: Front, triton_server) -> None:
    """``bench.front_cost`` (``python -m bench.aiperf --skip-aiperf``): every path answers,
    and the ratios are computed from the same requests (figures live in docs/openai.md)."""
    from bench import front_cost

    got = front_cost.compare(front.url, triton_server.grpc_url, [2], 4, 4, extra={"ignore_eos": True})["2"]
    per_round = max(2, -(-4 // front_cost.ROUNDS))  # at least one request per worker and round
    for path in front_cost.PATHS:
        assert (
            got[path]["requests"] == per_round * front_cost.ROUNDS and got[path]["output_tokens_per_s"] > 0
        ), got
    assert got["ttft_added_ms_p50"] == got["front"]["ttft_ms_p50"] - got["grpc"]["ttft_ms_p50"]
    assert got["throughput_ratio"] > 0 and got["sdk_throughput_ratio"] > 0
    # the side-by-side phase: one worker per path, the 4 requests split between them
    same = got["same_time"]
    assert (
        same["grpc"]["requests"] + same["front"]["requests"] == 4
        and min(same["grpc"]["requests"], same["front"]["requests"]) >= 1
    ), same
    assert got["ttft_added_ms_p50_same_time"] == same["front"]["ttft_ms_p50"] - same["grpc"]["ttft_ms_p50"]
    # outside the server: each path's TTFT minus the server's own arrival-to-first-token
    outside = {p: got[p]["outside_server_ms_p50"] for p in ("grpc", "front")}
    assert all(v is not None and v > 0 for v in outside.values()), outside
    assert got["ttft_added_ms_p50_outside_server"] == outside["front"] - outside["grpc"]
