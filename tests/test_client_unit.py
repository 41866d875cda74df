"""Client pieces that need no server: input building, response parsing, SSE, CLI, dead-server errors.

Responses are real ``tritonclient.grpc.InferResult`` objects around real
``ModelInferResponse`` protobufs (what the gRPC stream hands us), not mocks.
"""

from __future__ import annotations

import asyncio
import csv
import socket
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2
from tritonclient.utils import serialize_byte_tensor

from client import (
    AsyncMultiStreamClient,
    GenerateRequest,
    IncompleteStreamError,
    MultiStreamClient,
    MultiStreamConnectionError,
    MultiStreamError,
    StreamTracker,
    cli,
)
from client.core import (
    GenerationCore,
    StallWatch,
    cancel_action,
    control_tensors,
    make_request,
    normalize_url,
)
from client.parse import (
    SSEParser,
    fields_from_json,
    fields_from_result,
    http_error_message,
    is_final_grpc,
)
from client.request import INPUT_TYPES, OPTIONS, PARAMS, infer_inputs
from client.web.app import PARAM_TYPES, param_table, parse_params
from load import runner


def closed_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- inputs
def test_only_set_inputs_are_sent_shaped_1x1():
    t = GenerateRequest(prompt="hi", max_tokens=5).tensors()
    assert set(t) == {"text_input", "max_tokens", "stream"}
    for arr in t.values():
        assert arr.shape == (1, 1)
    assert t["text_input"][0, 0] == b"hi"
    assert t["max_tokens"].dtype == np.int32 and t["stream"].dtype == np.bool_


def test_all_optional_inputs_dtypes():
    req = GenerateRequest(
        prompt="héllo",
        max_tokens=7,
        stream=False,
        temperature=0.5,
        top_p=0.9,
        top_k=4,
        seed=2**63,
        repetition_penalty=1.1,
        stop=["\n\n", "END"],
        reasoning_streams=2,
        reasoning_budget=16,
        attention_mode="cross",
        session_id="s1",
    )
    t = req.tensors()
    assert t["temperature"].dtype == np.float32 and t["top_p"].dtype == np.float32
    assert t["top_k"].dtype == np.int32 and t["reasoning_streams"].dtype == np.int32
    assert t["seed"].dtype == np.uint64 and int(t["seed"][0, 0]) == 2**63
    assert t["stop_words"].shape == (1, 2)
    assert t["attention_mode"][0, 0] == b"cross" and t["session_id"][0, 0] == b"s1"
    assert t["text_input"][0, 0] == "héllo".encode()
    assert t["stream"][0, 0] == np.False_


@pytest.mark.parametrize("module", [grpcclient, httpclient])
def test_infer_inputs_for_both_protocols(module):
    inputs = infer_inputs(
        GenerateRequest(prompt="hi", max_tokens=3, top_k=2, attention_mode="isolated").tensors(), module
    )
    by_name = {i.name(): i for i in inputs}
    assert by_name["text_input"].datatype() == "BYTES"
    assert by_name["max_tokens"].datatype() == "INT32"
    assert by_name["stream"].datatype() == "BOOL"
    assert by_name["top_k"].datatype() == "INT32"
    assert by_name["attention_mode"].datatype() == "BYTES"
    assert all(i.shape() == [1, 1] for i in inputs)


def test_json_body_uses_scalars():
    body = GenerateRequest(prompt="hi", max_tokens=3, temperature=0.0, stop="x", session_id="abc").json_body()
    assert body == {
        "text_input": "hi",
        "max_tokens": 3,
        "stream": True,
        "temperature": 0.0,
        "stop_words": "x",
        "session_id": "abc",
    }


@pytest.mark.parametrize(
    "kw",
    [
        dict(prompt="  "),
        dict(prompt="x", max_tokens=0),
        dict(prompt="x", attention_mode="both"),
        dict(prompt="x", seed=-1),
    ],
)
def test_invalid_requests_raise_value_error(kw):
    with pytest.raises(ValueError):
        GenerateRequest(**kw).tensors()


def test_generate_validates_before_connecting():
    with pytest.raises(ValueError):
        MultiStreamClient("localhost:1").generate("x", attention_mode="sideways")


def test_generate_rejects_unknown_option_naming_valid_ones():
    with pytest.raises(TypeError, match=r"'max_token'.*valid options: max_tokens, stream"):
        MultiStreamClient("localhost:1").generate("x", max_token=5)
    with pytest.raises(TypeError, match="'beam_width'"):
        AsyncMultiStreamClient("localhost:1").generate("x", beam_width=2)
    # The options are exactly GenerateRequest's fields after the prompt; None means "unset".
    assert list(OPTIONS) == [f for f in GenerateRequest.__dataclass_fields__ if f != "prompt"]
    assert make_request("x", {"max_tokens": None, "top_k": None}) == GenerateRequest(prompt="x")
    assert "reasoning_budget" in MultiStreamClient.generate.__doc__
    assert "reasoning_budget" in AsyncMultiStreamClient.generate.__doc__


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(sync="later"), "sync must be one of none, revise"),
        (dict(max_tokens="5"), "must be an integer"),
        (dict(stop=["a", 3]), "stop must be a string"),
    ],
)
def test_generate_checks_each_option_by_its_definition(kw, message):
    with pytest.raises(ValueError, match=message):
        MultiStreamClient("localhost:1").generate("x", **kw)


def test_cli_flags_web_params_and_input_types_derive_from_generate_request():
    """One definition: every GenerateRequest option is a CLI flag and (unless it says not) a
    playground setting of its type, and INPUT_TYPES is the fields' inputs and datatypes."""
    actions = {a.dest: a for a in cli.build_parser()._actions}
    table = {row["name"]: row for row in param_table()}
    for name, p in OPTIONS.items():
        assert cli.option_flag(p) in actions[name].option_strings
        assert (name in PARAM_TYPES) == p.web and (name in table) == p.web
        if p.web:
            assert PARAM_TYPES[name] is p.pytype and table[name]["type"] == p.pytype.__name__
    assert INPUT_TYPES == {p.input: (p.datatype, INPUT_TYPES[p.input][1]) for p in PARAMS.values()}
    assert INPUT_TYPES["stop_words"][0] == "BYTES" and INPUT_TYPES["text_input"][0] == "BYTES"

    # Concretely, a float option with a rule travels the same way everywhere.
    rp = OPTIONS["repetition_penalty"]
    assert (rp.input, rp.datatype, rp.pytype) == ("repetition_penalty", "FP32", float)
    args = cli.build_parser().parse_args(["hi", "--repetition-penalty", "1.1"])
    assert cli.generate_kwargs(args)["repetition_penalty"] == 1.1
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["hi", "--repetition-penalty", "0"])
    assert parse_params({"repetition_penalty": "1.1"})["repetition_penalty"] == 1.1
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        parse_params({"repetition_penalty": "0"})
    assert table["repetition_penalty"]["min"] == 0 and table["top_p"]["max"] == 1
    assert table["attention_mode"]["choices"] == ["isolated", "cross"]
    assert INPUT_TYPES["repetition_penalty"] == ("FP32", np.float32)
    t = GenerateRequest(prompt="x", repetition_penalty=1.1).tensors()["repetition_penalty"]
    assert t.dtype == np.float32


def test_control_tensors():
    t = control_tensors("sid", "input", "more", batched=True)
    assert {k: v.shape for k, v in t.items()} == {
        "session_id": (1, 1),
        "action": (1, 1),
        "text_input": (1, 1),
    }
    t = control_tensors("sid", "cancel", None, batched=False)
    assert set(t) == {"session_id", "action"} and t["action"].shape == (1,)
    with pytest.raises(ValueError):
        control_tensors("", "cancel", None, batched=True)


def test_normalize_url():
    assert normalize_url(None, "grpc") == "localhost:8001"
    assert normalize_url(None, "http") == "localhost:8000"
    assert normalize_url("http://h:1/", "http") == "h:1"
    assert normalize_url("grpc://h:2", "grpc") == "h:2"
    with pytest.raises(ValueError):
        normalize_url("h:1", "websocket")


# ---------------------------------------------------------------- gRPC responses
def make_result(final: bool = False, **outputs) -> grpcclient.InferResult:
    """A real InferResult around a ModelInferResponse, as the gRPC stream delivers it."""
    resp = service_pb2.ModelInferResponse(model_name="multistream", model_version="1")
    for name, value in outputs.items():
        if isinstance(value, str):
            arr = np.array([[value.encode()]], dtype=np.object_)
            raw, dtype = serialize_byte_tensor(arr).item(), "BYTES"
        elif name == "output_ids":
            arr = np.array([value], dtype=np.int32)
            raw, dtype = arr.tobytes(), "INT32"
        else:
            arr = np.array([value], dtype=np.float32)
            raw, dtype = arr.tobytes(), "FP32"
        out = resp.outputs.add()
        out.name, out.datatype = name, dtype
        out.shape.extend(arr.shape)
        resp.raw_output_contents.append(raw)
    if final:
        resp.parameters["triton_final_response"].bool_param = True
    return grpcclient.InferResult(resp)


def test_fields_from_grpc_result():
    r = make_result(
        stream_name="reasoning/0",
        reasoning_output="think",
        output_ids=[5, 6],
        finish_reason="",
        session_id="s",
        timing_ms=[1.5, 0.5],
    )
    f = fields_from_result(r)
    assert f == {
        "reasoning_output": "think",
        "stream_name": "reasoning/0",
        "finish_reason": "",
        "session_id": "s",
        "output_ids": [5, 6],
        "timing_ms": [1.5, 0.5],
    }
    assert not is_final_grpc(r)
    empty = make_result(final=True)
    assert is_final_grpc(empty) and fields_from_result(empty) == {}


def test_session_id_comes_from_output_session_id():
    r = make_result(stream_name="output", text_output="a", output_session_id="sid-1")
    assert fields_from_result(r)["session_id"] == "sid-1"
    assert fields_from_json({"text_output": "a", "output_session_id": "sid-2"})["session_id"] == "sid-2"


def test_tracker_builds_done_from_grpc_results():
    tr = StreamTracker(t0=0.0)
    seq = [
        (make_result(stream_name="output", text_output="Hel", output_ids=[1], session_id="s"), 0.10),
        (make_result(stream_name="reasoning/0", reasoning_output="a", output_ids=[9]), 0.20),
        (make_result(stream_name="output", text_output="lo", output_ids=[2]), 0.20),
        (make_result(stream_name="output", text_output="!", output_ids=[3], finish_reason="stop"), 0.30),
        (
            make_result(
                stream_name="reasoning/0", reasoning_output="b", output_ids=[8], finish_reason="length"
            ),
            0.40,
        ),
        (make_result(final=True), 0.41),
    ]
    deltas = [tr.feed(fields_from_result(r), t) for r, t in seq]
    assert deltas[-1] is None  # flags-only final response carries no delta
    assert deltas[1].kind == "reasoning" and deltas[1].text == "a" and deltas[0].kind == "output"
    tr.check_complete()
    d = tr.done(t_end=0.5)
    assert d.session_id == "s" and d.output_text == "Hello!" and d.reasoning_texts == {"reasoning/0": "ab"}
    assert d.ttft_s == pytest.approx({"output": 0.1, "reasoning/0": 0.2})
    assert d.tokens == {"output": 3, "reasoning/0": 2}
    assert d.tokens_per_s["output"] == pytest.approx(2 / 0.2)
    assert d.finish_reasons == {"output": "stop", "reasoning/0": "length"}
    assert d.total_s == pytest.approx(0.5)


def test_tracker_detects_missing_final_delta_and_errors():
    tr = StreamTracker(t0=0.0)
    tr.feed({"stream_name": "output", "text_output": "x", "output_ids": [1]}, 0.1)
    with pytest.raises(IncompleteStreamError):
        tr.check_complete()
    with pytest.raises(IncompleteStreamError):
        StreamTracker().check_complete()
    tr.feed({"stream_name": "output", "finish_reason": "error"}, 0.2)
    with pytest.raises(MultiStreamError, match="error"):
        tr.check_complete()
    with pytest.raises(MultiStreamError, match="after it finished"):
        tr.feed({"stream_name": "output", "text_output": "late"}, 0.3)


def test_revision_stream_is_user_facing():
    tr = StreamTracker(t0=0.0)
    d = tr.feed({"stream_name": "revision", "text_output": "better", "finish_reason": "stop"}, 0.1)
    assert d.kind == "output" and d.text == "better"
    assert tr.done().texts == {"revision": "better"} and tr.done().reasoning_texts == {}


def test_user_echo_stream_is_input_and_needs_no_finish_reason():
    tr = StreamTracker(t0=0.0)
    tr.feed({"stream_name": "output", "text_output": "a", "output_ids": [1]}, 0.1)
    echo = tr.feed({"stream_name": "user", "text_output": "more", "output_ids": [7, 8]}, 0.2)
    tr.feed({"stream_name": "output", "text_output": "b", "output_ids": [2], "finish_reason": "stop"}, 0.3)
    assert echo.kind == "input" and echo.text == "more"
    tr.check_complete()
    d = tr.done()
    assert d.output_text == "ab" and d.texts["user"] == "more" and "user" not in d.ttft_s


def test_plain_trtllm_style_response_defaults_to_output_stream():
    tr = StreamTracker(t0=0.0)
    d = tr.feed({"text_output": "hi"}, 0.1)
    assert d.stream == "output" and d.kind == "output" and d.text == "hi"


# ---------------------------------------------------------------- HTTP / SSE
def test_sse_parser_rules():
    p = SSEParser()
    lines = [": comment\n", "event: message\n", 'data: {"a":\n', "data: 1}\r\n", "\n", "\n", "data: x\n"]
    got = [p.feed_line(line) for line in lines]
    assert got == [None, None, None, None, '{"a":\n1}', None, None]
    assert p.finish() == "x" and p.finish() is None


def test_sse_lines_become_deltas_and_error_event():
    gen = GenerationCore(GenerateRequest(prompt="hi"))
    raw = [
        b'data: {"text_output":"he","stream_name":"output","output_ids":[[1]]}\n',
        b"\n",
        b'data: {"stream_name":"reasoning/0","reasoning_output":"r","timing_ms":[1.0,2.0]}\n',
        b"\n",
    ]
    deltas = [gen._feed_sse_line(line) for line in raw]
    assert deltas[0] is None and deltas[2] is None  # an event completes on its blank line
    assert (deltas[1].stream, deltas[1].text, deltas[1].token_ids) == ("output", "he", [1])
    assert deltas[3].kind == "reasoning" and deltas[3].timing_ms == [1.0, 2.0]
    # An event not followed by a blank line still counts when the connection closes.
    assert gen._feed_sse_line(b'data: {"stream_name":"output","finish_reason":"stop"}\n') is None
    assert gen._end_sse().finish_reason == "stop"
    with pytest.raises(MultiStreamError, match="exceeds limit 512"):
        gen._feed_sse_line(b'data: {"error":"max_tokens 99999 exceeds limit 512"}\n')
        gen._feed_sse_line(b"\n")
    with pytest.raises(MultiStreamError, match="malformed"):
        gen._feed_sse_line(b"data: {nope\n")
        gen._feed_sse_line(b"\n")


def test_http_error_message():
    assert http_error_message(400, b'data: {"error":"bad input"}\n\n') == "bad input"
    assert http_error_message(400, b'{"error":"unknown model"}') == "unknown model"
    assert http_error_message(502, b"") == "HTTP 502"
    assert "binary" in http_error_message(400, b"\x00\x00\x04\x08")


# ---------------------------------------------------------------- nothing listening
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_closed_port_raises_fast(protocol):
    c = MultiStreamClient(f"127.0.0.1:{closed_port()}", protocol)
    t = time.monotonic()
    with pytest.raises(MultiStreamConnectionError, match="cannot reach server"):
        list(c.generate("hello", max_tokens=4))
    with pytest.raises(MultiStreamConnectionError):
        c.push_input("sid", "more")
    with pytest.raises(MultiStreamConnectionError):
        c.cancel("sid")
    assert time.monotonic() - t < 10
    c.close()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_async_closed_port_raises_fast(protocol):
    async def go() -> None:
        async with AsyncMultiStreamClient(f"127.0.0.1:{closed_port()}", protocol) as c:
            with pytest.raises(MultiStreamConnectionError):
                async for _ in c.generate("hello", max_tokens=4):
                    pass
            with pytest.raises(MultiStreamConnectionError):
                await c.cancel("sid")

    t = time.monotonic()
    asyncio.run(go())
    assert time.monotonic() - t < 10


# ---------------------------------------------------------------- CLI
def test_cli_arguments_map_to_generate_kwargs():
    args = cli.build_parser().parse_args(
        [
            "hi",
            "--max-tokens",
            "9",
            "--temperature",
            "0.7",
            "--top-p",
            "0.9",
            "--top-k",
            "5",
            "--seed",
            "1",
            "--reasoning-streams",
            "2",
            "--reasoning-budget",
            "64",
            "--attention-mode",
            "cross",
            "--stop",
            "a",
            "--stop",
            "b",
            "--protocol",
            "http",
            "--url",
            "h:1",
        ]
    )
    kw = cli.generate_kwargs(args)
    # Every option is a key (None = not set); only the set ones are listed here, so a new
    # GenerateRequest field does not need an edit of this test.
    assert set(kw) == set(OPTIONS)
    assert {k: v for k, v in kw.items() if v is not None} == {
        "max_tokens": 9,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 5,
        "seed": 1,
        "stop": ["a", "b"],
        "reasoning_streams": 2,
        "reasoning_budget": 64,
        "attention_mode": "cross",
        "stream": True,
    }
    assert cli.generate_kwargs(cli.build_parser().parse_args(["hi", "--no-stream"]))["stream"] is False
    assert args.protocol == "http" and args.url == "h:1"
    defaults = cli.generate_kwargs(cli.build_parser().parse_args(["hi"]))
    assert {k for k, v in defaults.items() if v is not None} == {"max_tokens", "stream"}


@pytest.mark.parametrize(
    "argv",
    [
        ["hi", "--top-p", "0"],
        ["hi", "--max-tokens", "0"],
        ["hi", "--attention-mode", "x"],
        ["hi", "--protocol", "ws"],
        ["hi", "--temperature", "-1"],
    ],
)
def test_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--json"], ["--protocol", "http"]])
def test_cli_server_down_is_one_line_exit_1(extra, capsys):
    t = time.monotonic()
    rc = cli.main(["hello", "--url", f"127.0.0.1:{closed_port()}", *extra])
    assert rc == 1 and time.monotonic() - t < 10
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: cannot reach server") and "\n" not in err
    assert captured.out.strip() == ""


def test_cli_interactive_needs_prompt_argument(capsys):
    assert cli.main(["--interactive", "--url", "127.0.0.1:1"]) == 2


# ---------------------------------------------------------------- load runner
def test_load_locust_command_and_stats(tmp_path):
    args = runner.build_parser().parse_args(["--users", "3", "--seconds", "7", "--out", str(tmp_path)])
    cmd = runner.locust_command(args, "127.0.0.1:9")
    joined = " ".join(cmd)
    for part in ("--headless", "-u 3", "-r 3", "-t 7s", "--host 127.0.0.1:9", "--html", "--csv"):
        assert part in joined
    path = tmp_path / "locust_stats.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "95%"])
        w.writerow(["grpc", "ttft_output", "4", "0", "12", "20"])
        w.writerow(["", "Aggregated", "10", "1", "15", "30"])
    stats = runner.read_stats(path)
    assert stats["Aggregated"]["requests"] == 10 and stats["Aggregated"]["failures"] == 1
    assert stats["ttft_output"]["p95_ms"] == 20


def test_load_prompts_bundle():
    import json
    from pathlib import Path

    prompts = json.loads((Path(runner.__file__).parent / "prompts.json").read_text())
    assert 10 <= len(prompts) <= 16 and all(isinstance(p, str) and p.strip() for p in prompts)
    words = sorted(len(p.split()) for p in prompts)
    assert words[0] <= 3 and words[-1] >= 250  # short to ~400 tokens


def test_load_final_counts_from_locust_json(tmp_path):
    import json

    path = tmp_path / "locust_stats.json"
    path.write_text(
        json.dumps(
            [
                {"name": "ttft_output", "method": "grpc", "num_requests": 5, "num_failures": 0},
                {"name": "full_response", "method": "grpc", "num_requests": 4, "num_failures": 2},
            ]
        )
    )
    counts = runner.read_final_counts(path)
    assert counts == {"ttft_output": (5, 0), "full_response": (4, 2), "Aggregated": (9, 2)}


def test_tracker_live_stats_match_done():
    tr = StreamTracker(t0=0.0)
    tr.feed({"stream_name": "output", "text_output": "a", "output_ids": [1]}, 0.1)
    first = tr.stats("output")
    assert (first.tokens, first.ttft_s, first.tokens_per_s, first.finish_reason) == (1, 0.1, None, None)
    tr.feed({"stream_name": "output", "text_output": "bc", "output_ids": [2, 3]}, 0.3)
    tr.feed(
        {"stream_name": "reasoning/0", "reasoning_output": "r", "output_ids": [9], "finish_reason": "length"},
        0.2,
    )
    live = tr.live_stats()
    assert live["output"].tokens == 3 and live["output"].tokens_per_s == pytest.approx(2 / 0.2)
    assert live["reasoning/0"].finish_reason == "length"
    tr.feed({"stream_name": "output", "finish_reason": "stop"}, 0.4)
    done = tr.done(t_end=0.5)
    assert done.tokens_per_s["output"] == pytest.approx(tr.stats("output").tokens_per_s)
    assert done.ttft_s["output"] == pytest.approx(tr.stats("output").ttft_s)
    assert done.tokens_per_s["reasoning/0"] == pytest.approx(1 / 0.2)  # one token: its own rate


def test_server_cancel_is_claimed_once_and_only_for_an_unfinished_generation():
    gen = GenerationCore(GenerateRequest(prompt="x"))
    sid = gen.session_id
    assert sid and sid.startswith("client-")  # chosen client side before anything is sent
    # Nothing heard from the server yet: a pending cancel (its session may not be registered).
    assert gen._claim_server_cancel() == (sid, True) and gen._claim_server_cancel() is None
    done_gen = GenerationCore(GenerateRequest(prompt="x", session_id="s1"))
    done_gen._feed_json_body(b'{"text_output": "a", "finish_reason": "stop", "output_session_id": "s1"}')
    done_gen._finish()
    assert done_gen._claim_server_cancel() is None


def test_server_cancel_is_pending_only_until_the_server_answers():
    """After a response the session is registered (or never will be): a plain cancel, which
    says "not found" for an ended session instead of remembering a cancel for its id."""
    gen = GenerationCore(GenerateRequest(prompt="x", session_id="s2"))
    assert not gen.answered
    gen._feed_sse_line(b'data: {"text_output": "a", "output_session_id": "s2"}')
    assert not gen.answered, "half an event is not an answer yet"
    gen._feed_sse_line(b"")
    assert gen.answered and gen._claim_server_cancel() == ("s2", False)
    cancelled = GenerationCore(GenerateRequest(prompt="x", session_id="s3"))
    cancelled._cancelled = True
    cancelled._heard()  # the local cancel's own error: says nothing about the session
    assert cancelled._claim_server_cancel() == ("s3", True)
    assert cancel_action(True) == "cancel_pending" and cancel_action(False) == "cancel"


def test_stall_watch_schedules_checks_and_deadline():
    watch = StallWatch(idle_timeout_s=0.3, check_every_s=0.1)
    assert not watch.check_due() and not watch.expired() and 0 < watch.wait_s() <= 0.1
    time.sleep(0.12)
    assert watch.check_due() and not watch.check_due()  # due once, then rescheduled
    watch.heard()
    assert not watch.expired()
    time.sleep(0.32)
    assert watch.expired() and watch.wait_s() == 0
    assert "no response from server for 0s" in str(watch.idle_error())
