"""The client library and CLI against the real ``multistream`` server (``triton_server`` fixture).

Only behaviour written in docs/CONTRACTS.md §3 is asserted, so these tests
hold whatever engine runs behind the ensemble.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from client import (
    AsyncMultiStreamClient,
    Done,
    MultiStreamCancelled,
    MultiStreamClient,
    MultiStreamError,
    StreamDelta,
)

pytestmark = pytest.mark.server

PROMPT = "What is the capital of France? Answer briefly."
#: Long enough an answer that text pushed at its first delta is read before it ends.
STORY = "Write a long story about a dragon who learns to paint."
#: Tokens of the answers compared with the greedy reference below.
GREEDY_TOKENS = 6


@pytest.fixture(scope="module")
def greedy(triton_server) -> Done:
    """The greedy streamed gRPC answer to PROMPT: every other way of asking must give this text."""
    with MultiStreamClient(triton_server.grpc_url) as c:
        done = c.generate(PROMPT, max_tokens=GREEDY_TOKENS, temperature=0.0).result()
    assert done.output_text.strip() and done.finish_reasons["output"] in ("stop", "length"), done
    return done


def _url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def _check_events(events: list, reasoning_streams: int) -> Done:
    assert isinstance(events[-1], Done) and all(isinstance(e, StreamDelta) for e in events[:-1])
    done: Done = events[-1]
    deltas = events[:-1]
    names = {d.stream for d in deltas}
    assert "output" in names
    assert {n for n in names if n.startswith("reasoning")} == {
        f"reasoning/{i}" for i in range(reasoning_streams)
    }
    # Every stream ends with exactly one delta carrying finish_reason, and it is the last one.
    for name in names:
        mine = [d for d in deltas if d.stream == name]
        assert mine[-1].finish_reason in ("stop", "length")
        assert all(d.finish_reason is None for d in mine[:-1])
    assert done.output_text.strip()
    assert done.output_text == "".join(d.text for d in deltas if d.stream == "output")
    assert set(done.ttft_s) >= {"output"} and done.ttft_s["output"] > 0
    assert done.session_id
    return done


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_stream_answer_and_reasoning(triton_server, protocol):
    with MultiStreamClient(_url(triton_server, protocol), protocol) as c:
        events = list(c.generate(PROMPT, max_tokens=8, reasoning_streams=1, reasoning_budget=8))
    done = _check_events(events, reasoning_streams=1)
    assert done.tokens["output"] <= 8 and done.tokens["reasoning/0"] <= 8


def test_output_only_and_greedy_is_deterministic(triton_server):
    with MultiStreamClient(triton_server.grpc_url) as c:
        a = c.generate(PROMPT, max_tokens=6, temperature=0.0).result()
        b = c.generate(PROMPT, max_tokens=6, temperature=0.0).result()
    assert a.output_text == b.output_text and a.reasoning_texts == {}


def test_non_streaming_grpc_gives_one_response(triton_server):
    with MultiStreamClient(triton_server.grpc_url) as c:
        events = list(c.generate(PROMPT, max_tokens=6, stream=False))
    deltas = [e for e in events if isinstance(e, StreamDelta) and e.stream == "output"]
    assert len(deltas) == 1 and deltas[0].finish_reason in ("stop", "length")
    assert events[-1].output_text.strip()


def test_non_streaming_http_generate(triton_server, greedy):
    with MultiStreamClient(triton_server.http_url, "http") as c:
        done = c.generate(PROMPT, max_tokens=GREEDY_TOKENS, stream=False).result()
    assert done.output_text == greedy.output_text
    assert done.finish_reasons["output"] == greedy.finish_reasons["output"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_client(triton_server, protocol):
    async def go() -> list:
        async with AsyncMultiStreamClient(_url(triton_server, protocol), protocol) as c:
            return [
                e async for e in c.generate(PROMPT, max_tokens=6, reasoning_streams=1, reasoning_budget=6)
            ]

    _check_events(asyncio.run(go()), reasoning_streams=1)


def test_async_http_generations_share_a_connection_and_a_cancel_drops_it(triton_server):
    """Over HTTP the asyncio client keeps one connection pool for every generation (one
    per generation cost each request a TCP handshake and a new session on the path to its
    first token); a cancelled generation closes its connection, so Triton sees the hang-up,
    and the next one opens another."""
    import psutil

    port = int(triton_server.http_url.rsplit(":", 1)[1])
    me = psutil.Process()

    def ports() -> set[int]:
        return {
            c.laddr.port
            for c in me.net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
        }

    async def go() -> tuple[list[set[int]], set[int], set[int]]:
        async with AsyncMultiStreamClient(triton_server.http_url, "http") as c:
            seen = []
            for _ in range(3):
                during: set[int] = set()
                async for _ev in c.generate(PROMPT, max_tokens=4):
                    during |= ports()
                seen.append(during)
            gen = c.generate(STORY, max_tokens=800, ignore_eos=True)
            cancelled: set[int] = set()
            with pytest.raises(MultiStreamCancelled):
                async for _ev in gen:
                    if not cancelled:
                        cancelled = ports()
                        gen.cancel()
            for _ in range(50):  # the socket closes on a later turn of the loop
                if not cancelled & ports():
                    break
                await asyncio.sleep(0.02)
            after: set[int] = set()
            async for _ev in c.generate(PROMPT, max_tokens=2):
                after |= ports()
            return seen, cancelled, after

    seen, cancelled, after = asyncio.run(go())
    assert len(seen[0]) == 1 and seen[0] == seen[1] == seen[2], seen
    assert cancelled == seen[0], (seen, cancelled)
    assert after and not cancelled & after, (cancelled, after)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_server_error_surfaces_with_message(triton_server, protocol, greedy):
    with MultiStreamClient(_url(triton_server, protocol), protocol, idle_timeout_s=60) as c:
        t = time.monotonic()
        with pytest.raises(MultiStreamError) as e:
            list(c.generate(PROMPT, max_tokens=10_000_000))
        assert "max_tokens" in str(e.value)
        assert time.monotonic() - t < 30
        # The client stays usable after an error: the next request gets the full greedy answer.
        assert c.generate(PROMPT, max_tokens=GREEDY_TOKENS).result().output_text == greedy.output_text


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unknown_session_control_names_session_id(triton_server, protocol):
    with MultiStreamClient(_url(triton_server, protocol), protocol) as c:
        # "an error naming session_id": the field name or the offending value.
        with pytest.raises(MultiStreamError, match="session_id|no-such-session"):
            c.push_input("no-such-session-" + uuid.uuid4().hex, "hello")
        with pytest.raises(MultiStreamError, match="session_id|no-such-session"):
            c.cancel("no-such-session-" + uuid.uuid4().hex)


def test_push_input_and_server_cancel_while_streaming(triton_server):
    sid = "it-" + uuid.uuid4().hex
    with MultiStreamClient(triton_server.grpc_url) as c, MultiStreamClient(triton_server.grpc_url) as ctl:
        gen = c.generate(
            PROMPT, max_tokens=200, reasoning_streams=1, reasoning_budget=200, session_id=sid, ignore_eos=True
        )
        results: dict[str, object] = {}
        events = []
        for ev in gen:
            events.append(ev)
            if isinstance(ev, StreamDelta) and "pushed" not in results:
                results["pushed"] = ctl.push_input(sid, "Also name its river.")
                results["cancelled"] = ctl.cancel(sid)
    assert results == {"pushed": True, "cancelled": True}
    done = events[-1]
    assert isinstance(done, Done) and done.session_id == sid
    assert done.finish_reasons["output"] == "cancelled"
    assert done.tokens["output"] < 200


def test_local_stream_cancel(triton_server):
    """A local cancel (stream closed, and the session cancelled through session_control) frees
    the server's session: the gauges are back to idle within the server's own cancel bound."""
    from tests.reliability_helpers import freed_within_s, gauge_sum, scrape, wait_for

    def busy() -> bool:
        return gauge_sum(scrape(triton_server.metrics_url), "multistream_active_sessions") > 0

    def idle() -> bool:
        m = scrape(triton_server.metrics_url)
        return (
            gauge_sum(m, "multistream_active_sessions") + gauge_sum(m, "multistream_kv_cache_used_tokens")
            == 0
        )

    assert wait_for(idle, 30), "the server is not idle before the test"
    with MultiStreamClient(triton_server.grpc_url) as c:
        gen = c.generate(STORY, max_tokens=800, ignore_eos=True)  # only the cancel ends it soon
        n = 0
        with pytest.raises(MultiStreamCancelled):
            for _ev in gen:
                n += 1
                if n == 1:
                    assert wait_for(busy, 5), "the gauges never showed the session"
                    t_cancel = time.monotonic()
                    threading.Thread(target=gen.cancel).start()
    limit = freed_within_s()
    assert wait_for(idle, limit), f"session or KV still held {time.monotonic() - t_cancel:.1f}s after cancel"


def test_cli_json(triton_server, greedy):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            PROMPT,
            "--url",
            triton_server.grpc_url,
            "--json",
            "--max-tokens",
            str(GREEDY_TOKENS),
            "--reasoning-streams",
            "1",
            "--reasoning-budget",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    # isolated (the default): reasoning does not change the answer
    assert obj["output_text"] == greedy.output_text
    assert obj["reasoning_texts"]["reasoning/0"].strip()
    assert obj["tokens"]["reasoning/0"] == 6 or obj["finish_reasons"]["reasoning/0"] == "stop"
    assert obj["ttft_s"]["output"] > 0 and "output" in obj["tokens_per_s"]


def test_cli_live_view_http(triton_server, greedy):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            PROMPT,
            "--url",
            triton_server.http_url,
            "--protocol",
            "http",
            "--max-tokens",
            str(GREEDY_TOKENS),
            "--reasoning-streams",
            "1",
            "--reasoning-budget",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "240", "LINES": "40"},  # wide panels: the answer fits one line
    )
    assert proc.returncode == 0, proc.stderr
    assert "answer" in proc.stdout and "reasoning/0" in proc.stdout and "TTFT" in proc.stdout
    assert greedy.output_text.strip() in proc.stdout, proc.stdout


def test_cli_server_error_exit_1(triton_server):
    proc = subprocess.run(
        [sys.executable, "-m", "client", PROMPT, "--url", triton_server.grpc_url, "--max-tokens", "10000000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and "max_tokens" in proc.stderr


def test_pushed_input_is_echoed_and_request_completes(triton_server, default_model_dir):
    """The 'user' echo stream carries exactly the pushed text's tokens, and (having no
    finish_reason) does not fail the request."""
    from backend.tokenizer import Tokenizer

    pushed_text = " Paris?"
    want = Tokenizer.from_dir(default_model_dir).encode(pushed_text)
    sid = "echo-" + uuid.uuid4().hex
    with MultiStreamClient(triton_server.grpc_url) as c, MultiStreamClient(triton_server.grpc_url) as ctl:
        events = []
        pushed = None
        for ev in c.generate(STORY, max_tokens=64, session_id=sid, ignore_eos=True):  # reads all of it
            events.append(ev)
            if pushed is None and isinstance(ev, StreamDelta) and ev.stream == "output":
                pushed = ctl.push_input(sid, pushed_text)
    assert pushed is True
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reasons["output"] in ("stop", "length")
    echo = [e for e in events[:-1] if e.stream == "user"]
    assert echo and all(e.kind == "input" for e in echo)
    assert [t for e in echo for t in e.token_ids] == want, "the model did not read all of the pushed text"
    assert done.tokens["user"] == len(want)


def test_cli_interactive_pushes_typed_lines(triton_server, default_model_dir):
    """``--interactive``: a line typed while the answer streams (here at once, before the
    session has started) is pushed into the session and read in full by the model."""
    from backend.tokenizer import Tokenizer

    line = "Also, the dragon has a cat."
    want = Tokenizer.from_dir(default_model_dir).encode(line + "\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            STORY,
            "--url",
            triton_server.grpc_url,
            "--json",
            "--interactive",
            "--max-tokens",
            "64",
            "--ignore-eos",  # long enough to read the line, whatever the answer says
        ],
        input=line + "\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    obj = json.loads(proc.stdout)
    assert obj["pushed_inputs"] == [line], obj
    assert obj["tokens"].get("user") == len(want), obj["tokens"]
