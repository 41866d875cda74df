"""The paper's stream layout through a real tritonserver (the whole ensemble).

The deployment forces ``stream_layout=paper`` (4 channels) on the real default model, whose
channel embedding is then zero, as the paper treats an untrained checkpoint. What the server
streams is compared with the grid the engine computes in this process for the same request:
the deltas must be that grid, channel by channel and row by row.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from backend.engine import Engine
from backend.engine.layout import StreamLayout, find_silence, seed_row, user_tokens
from backend.serving.request import RequestConfig
from client import MultiStreamClient, MultiStreamError
from tests.server_helpers import PAPER_CHANNELS

pytestmark = pytest.mark.server

C = PAPER_CHANNELS
PROMPT = "Tell me what two plus two is"


def grid_in_process(engine: Engine, text: str, **options) -> dict[str, list[tuple[int, int]]]:
    """``stream -> [(row, token)]`` of the engine's own run of the request ``text``."""
    tok = engine.tokenizer
    cfg = RequestConfig(text=text, max_tokens=options.pop("max_tokens"), session_id=options.pop("session_id"))
    cfg.layout, cfg.num_channels, cfg.silence_id = "paper", C, find_silence(tok)
    cfg.temperature, cfg.top_k, cfg.top_p = 0.8, 20, 0.95
    for k, v in options.items():
        setattr(cfg, k, v)
    layout = StreamLayout(C, cfg.silence_id)
    got: dict[str, list[tuple[int, int]]] = {}
    done = threading.Event()
    live = [C - 1]

    def on_event(ev):
        if ev.kind == "user":
            got.setdefault("user", []).extend((ev.row, t) for t in ev.token_ids)
            return
        got.setdefault(ev.stream, []).extend((ev.row, t) for t in ev.token_ids)
        if ev.finished:
            live[0] -= 1
            if live[0] == 0:
                done.set()

    engine.submit(
        layout.prefix(seed_row(tok, cfg.silence_id, C, cfg.ablate_channels)),
        layout.stream_specs(cfg.grid_sampling),
        on_event=on_event,
        rules=cfg.grid_rules(),
        user_ids=user_tokens(tok, text),
        session_id=cfg.session_id,
    )
    assert done.wait(120)
    return got


def served_tokens(events) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for ev in events:
        if getattr(ev, "token_ids", None):
            out.setdefault(ev.stream, []).extend(ev.token_ids)
    return out


def test_the_served_grid_is_the_engine_grid(paper_server, paper_engine):
    client = MultiStreamClient(paper_server.grpc_url)
    events = list(
        client.generate(
            PROMPT, max_tokens=14, temperature=0.0, reasoning_streams=1, session_id="paper-greedy"
        )
    )
    done = events[-1]
    served = served_tokens(events[:-1])
    ref = grid_in_process(paper_engine, PROMPT, max_tokens=14, temperature=0.0, session_id="paper-greedy")
    assert set(served) == {"output", "reasoning/Analytical", "user"}
    for stream in ("output", "reasoning/Analytical"):
        assert served[stream] == [t for _, t in ref[stream]], stream
    # The User column is the prompt as the paper tokenizes it, one token per row from row 1.
    tok = paper_engine.tokenizer
    assert ref["user"] == [(1 + i, t) for i, t in enumerate(user_tokens(tok, PROMPT))]
    assert served["user"] == user_tokens(tok, PROMPT)
    silence = find_silence(tok)
    assert all(silence not in v for v in served.values()), "silence is never sent"
    assert done.output_text == tok.decode(served["output"])
    assert set(done.finish_reasons) >= {"output", "reasoning/Analytical"}
    # The second thinking channel is computed (it shapes the others) but not streamed.
    assert ref.get("reasoning/Skeptical") and "reasoning/Skeptical" not in served


def test_paper_sampling_defaults_and_seeds_replay(paper_server, paper_engine):
    client = MultiStreamClient(paper_server.grpc_url)
    opts = dict(max_tokens=10, seed=1234, reasoning_streams=1)
    a = served_tokens(list(client.generate(PROMPT, session_id="paper-s1", **opts))[:-1])
    b = served_tokens(list(client.generate(PROMPT, session_id="paper-s2", **opts))[:-1])
    assert a == b, "a seed replays the whole grid"
    # Unset temperature / top_k / top_p are the paper's 0.8 / 20 / 0.95, seeded per channel.
    ref = grid_in_process(paper_engine, PROMPT, max_tokens=10, seed=1234, session_id="paper-s1")
    assert a["output"] == [t for _, t in ref["output"]]
    assert a["reasoning/Analytical"] == [t for _, t in ref["reasoning/Analytical"]]


def test_non_streaming_http_generate_carries_answer_and_reasoning(paper_server, paper_engine):
    """A plain HTTP ``generate`` (one response): Output's text and the shown thinking text."""
    import json
    import urllib.request

    body = {"text_input": PROMPT, "max_tokens": 8, "temperature": 0.0, "reasoning_streams": 1}
    req = urllib.request.Request(
        f"http://{paper_server.http_url}/v2/models/multistream/generate", data=json.dumps(body).encode()
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        out = json.loads(resp.read())
    ref = grid_in_process(
        paper_engine, PROMPT, max_tokens=8, temperature=0.0, session_id=out["output_session_id"]
    )
    tok = paper_engine.tokenizer
    assert out["text_output"] == tok.decode([t for _, t in ref["output"]])
    assert out["reasoning_output"] == tok.decode([t for _, t in ref["reasoning/Analytical"]])
    assert out["finish_reason"] == "length"


def _stream_call(url: str, inputs: dict, timeout: float = 120):
    """Raw tritonclient gRPC stream: every response's arrays, or the error."""
    got: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    c.start_stream(callback=lambda result, error: got.put((result, error)))
    tensors = []
    for name, (value, dtype, np_dtype) in inputs.items():
        arr = np.array([value if isinstance(value, list) else [value]], dtype=np_dtype)
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        tensors.append(t)
    c.async_stream_infer("multistream", tensors, enable_empty_final_response=True)
    out, error = [], None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result, err = got.get(timeout=timeout)
        if err is not None:
            error = err
            break
        out.append(result)
        params = result.get_response().parameters
        if "triton_final_response" in params and params["triton_final_response"].bool_param:
            break
    c.stop_stream()
    c.close()
    return out, error


def test_channel_stats_come_with_each_token(paper_server):
    results, error = _stream_call(
        paper_server.grpc_url,
        {
            "text_input": (PROMPT.encode(), "BYTES", object),
            "max_tokens": (6, "INT32", np.int32),
            "stream": (True, "BOOL", bool),
            "temperature": (0.0, "FP32", np.float32),
            "reasoning_streams": (1, "INT32", np.int32),
            "return_channel_stats": (True, "BOOL", bool),
        },
    )
    assert error is None, error
    checked = 0
    for r in results:
        name = r.as_numpy("stream_name")
        if name is None or name.reshape(-1)[0].decode() == "user":
            continue
        ids = r.as_numpy("output_ids").reshape(-1)
        stats = r.as_numpy("channel_stats")
        if len(ids):
            pairs = stats.reshape(-1, 2)
            assert len(pairs) == len(ids)
            assert np.all(pairs[:, 0] >= 0) and np.all((pairs[:, 1] > 0) & (pairs[:, 1] <= 1))
            checked += 1
    assert checked >= 6


def test_input_and_cancel_mid_grid(paper_server, paper_engine):
    client = MultiStreamClient(paper_server.grpc_url)
    tok = paper_engine.tokenizer
    gen = client.generate(
        PROMPT, max_tokens=200, temperature=0.0, stop_silent_rows=0, session_id="paper-live"
    )
    echoed: list[int] = []
    pushed = False
    t_cancel = None
    reasons = {}
    for ev in gen:
        if getattr(ev, "stream", None) == "user":
            echoed += ev.token_ids
        elif getattr(ev, "finish_reason", None):
            reasons[ev.stream] = ev.finish_reason
        if not pushed and getattr(ev, "stream", None) == "output":
            assert client.push_input("paper-live", "and three more")
            pushed = True
        if pushed and t_cancel is None and len(echoed) >= len(user_tokens(tok, PROMPT)) + 3:
            assert client.cancel("paper-live")
            t_cancel = time.monotonic()
    assert t_cancel is not None, "the pushed text never reached channel 0"
    assert echoed == user_tokens(tok, PROMPT) + user_tokens(tok, "and three more")
    assert reasons.get("output") == "cancelled"


@pytest.mark.parametrize(
    "options, words",
    [
        ({"sync": "revise", "reasoning_streams": 1}, "sync does not apply"),
        ({"attention_mode": "isolated"}, "attention_mode does not apply"),
        ({"reasoning_budget": 16}, "reasoning_budget does not apply"),
        ({"reasoning_streams": C - 1}, "reasoning_streams must be in 0..2"),
        ({"ablate_channels": [0]}, "ablate_channels must name channels in 1..3"),
        ({"layout_start": "grid"}, "grid_rows is needed"),
        ({"layout_start": "grid", "grid_rows": "[[1, 2]]"}, "4 cells"),
        ({"max_tokens": 400}, "rows of 4 channels"),
    ],
)
def test_options_that_do_not_fit_the_layout_are_refused_by_name(paper_server, options, words):
    client = MultiStreamClient(paper_server.grpc_url)
    opts = {"max_tokens": 4, **options}
    if opts.get("ablate_channels") == [0]:  # the client checks ge=1 itself; send it raw
        results, error = _stream_call(
            paper_server.grpc_url,
            {
                "text_input": (PROMPT.encode(), "BYTES", object),
                "max_tokens": (4, "INT32", np.int32),
                "ablate_channels": ([0], "INT32", np.int32),
            },
        )
        assert error is not None and words in str(error), error
        return
    with pytest.raises(MultiStreamError, match=words):
        list(client.generate(PROMPT, **opts))


def test_a_grid_given_by_the_caller_starts_the_session(paper_server, paper_engine):
    client = MultiStreamClient(paper_server.grpc_url)
    grid = '[["-", "-", " thinking", " checking"], ["-", "-", " about", " again"]]'
    events = list(
        client.generate(
            PROMPT, max_tokens=6, temperature=0.0, layout_start="grid", grid_rows=grid, reasoning_streams=2
        )
    )
    served = served_tokens(events[:-1])
    # 6 rows sampled after the caller's 2 (rows 2..7); rows 2..6 were fed, each with the next
    # user token (row 7 ends the session before it is fed).
    assert served["user"] == user_tokens(paper_engine.tokenizer, PROMPT)[:5]
    assert events[-1].finish_reasons.get("output") == "length"
    seeded = served_tokens(
        list(client.generate(PROMPT, max_tokens=6, temperature=0.0, reasoning_streams=2))[:-1]
    )
    assert seeded["reasoning/Analytical"] != served["reasoning/Analytical"], "the start grid changed nothing"


def test_project_deployment_refuses_layout_options(triton_server):
    client = MultiStreamClient(triton_server.grpc_url)
    with pytest.raises(MultiStreamError, match="skip_silence applies only to the paper's stream layout"):
        list(client.generate("Hi", max_tokens=4, skip_silence=True))
