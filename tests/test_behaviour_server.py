"""What the request options and the multi-stream modes *do*, against the shared real server.

The validation of every input is tested elsewhere (tests/test_reliability_input.py); here each
option's effect is checked against something it must equal: the server's own greedy answer
with the option off, or the in-process engine on the same weights and dtype. Also ``sync:
"revise"`` end to end, ``cross`` serving, and the ``timing_ms`` output.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.server

QUESTION = "Name the capital of France."  # greedy margin >= 1 logit over its first 8 answer tokens, int4 or dense prompt
STORY = "Write a long story about a dragon who learns to paint."
REPEAT = "List the days of the week, again and again."
TYPES = {
    "text_input": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32),
    "stream": ("BOOL", np.bool_),
    "temperature": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "seed": ("UINT64", np.uint64),
    "random_seed": ("UINT64", np.uint64),
    "repetition_penalty": ("FP32", np.float32),
    "end_id": ("INT32", np.int32),
    "stop_words": ("BYTES", np.object_),
    "exclude_input_in_output": ("BOOL", np.bool_),
    "reasoning_streams": ("INT32", np.int32),
    "reasoning_budget": ("INT32", np.int32),
    "attention_mode": ("BYTES", np.object_),
    "sync": ("BYTES", np.object_),
}


@dataclass
class Response:
    """One response of the server, as received (``t``: the client's monotonic clock)."""

    t: float
    stream: str
    text: str
    ids: list[int]
    finish: str
    timing_ms: list[float]


@dataclass
class Reply:
    responses: list[Response] = field(default_factory=list)
    t0: float = 0.0
    t_end: float = 0.0

    def of(self, stream: str) -> list[Response]:
        return [r for r in self.responses if r.stream == stream]

    def ids(self, stream: str = "output") -> list[int]:
        return [i for r in self.of(stream) for i in r.ids]

    def text(self, stream: str = "output") -> str:
        return "".join(r.text for r in self.of(stream))

    def finish(self, stream: str = "output") -> str:
        ends = [r.finish for r in self.of(stream) if r.finish]
        assert len(ends) == 1, f"{stream} ended {len(ends)} times: {ends}"
        return ends[0]


def ask(url: str, timeout: float = 180, **values: Any) -> Reply:
    """One ``multistream`` request over a gRPC stream (``stream`` true unless given)."""
    import tritonclient.grpc as grpcclient

    values.setdefault("stream", True)
    inputs = []
    for name, value in values.items():
        datatype, np_type = TYPES[name]
        items = value if isinstance(value, list) else [value]
        arr = np.array([[v.encode() if isinstance(v, str) else v for v in items]], dtype=np_type)
        inp = grpcclient.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    got: queue.Queue = queue.Queue()
    reply = Reply()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put((time.monotonic(), result, error)))
    try:
        reply.t0 = time.monotonic()
        client.async_stream_infer("multistream", inputs, enable_empty_final_response=True)
        while True:
            t, result, error = got.get(timeout=timeout)
            assert error is None, error
            name = result.as_numpy("stream_name")
            if name is not None:
                stream = name.reshape(-1)[0].decode()
                text_name = "reasoning_output" if stream.startswith("reasoning") else "text_output"
                reply.responses.append(
                    Response(
                        t,
                        stream,
                        result.as_numpy(text_name).reshape(-1)[0].decode(),
                        result.as_numpy("output_ids").reshape(-1).tolist(),
                        result.as_numpy("finish_reason").reshape(-1)[0].decode(),
                        result.as_numpy("timing_ms").reshape(-1).tolist(),
                    )
                )
            if result.get_response().parameters["triton_final_response"].bool_param:
                reply.t_end = t
                return reply
    finally:
        client.stop_stream()
        client.close()


@pytest.fixture(scope="module")
def url(triton_server) -> str:
    return triton_server.grpc_url


@pytest.fixture(scope="module")
def tokenizer(triton_server):
    from backend.model_store import resolve_model_dir
    from backend.tokenizer import Tokenizer

    return Tokenizer.from_dir(resolve_model_dir(triton_server.config.model_dir))


@pytest.fixture(scope="module")
def local_engine(triton_server):
    """The engine in this process, configured as the server's decode instances are."""
    import torch

    from backend.engine import Engine, EngineConfig
    from backend.model_store import resolve_model_dir

    threads = torch.get_num_threads()
    engine = Engine.from_model_dir(
        resolve_model_dir(triton_server.config.model_dir),
        EngineConfig(dtype=triton_server.config.dtype, threads=1, max_sessions=2, max_context=1024),
    )
    yield engine
    engine.shutdown()
    torch.set_num_threads(threads)


def local_answer(engine, prompt: list[int], **sampling: Any) -> list[int]:
    """Token ids the in-process engine answers ``prompt`` with."""
    from backend.engine import SamplingParams, StreamSpec

    q: queue.Queue = queue.Queue()
    engine.submit(prompt, [StreamSpec("output", sampling=SamplingParams(**sampling))], on_event=q.put)
    ids: list[int] = []
    while True:
        ev = q.get(timeout=120)
        ids += ev.token_ids
        if ev.finished:
            return ids


def chat(tokenizer, text: str) -> list[int]:
    from backend.serving.preprocessing import prompt_ids

    return prompt_ids(tokenizer, text)


@pytest.fixture(scope="module")
def greedy_question(url) -> Reply:
    reply = ask(url, text_input=QUESTION, max_tokens=16)
    assert len(reply.ids()) >= 6 and "Paris" in reply.text(), reply.text()
    return reply


# ------------------------------------------------------------------------------- request options
def test_stop_words_cut_the_answer_before_the_word(url, greedy_question):
    full = greedy_question.text()
    words = full.split()
    stop = words[len(words) // 2]
    cut = ask(url, text_input=QUESTION, max_tokens=16, stop_words=[stop])
    assert cut.finish() == "stop"
    assert cut.text() == full[: full.index(stop)]


def test_end_id_ends_the_answer_at_that_token(url, greedy_question):
    ids = greedy_question.ids()
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])  # first occurrence, not the first token
    ended = ask(url, text_input=QUESTION, max_tokens=16, end_id=ids[k])
    assert ended.ids() == ids[: k + 1]
    assert ended.finish() == "stop"


def test_seed_and_random_seed_replay_a_sampled_answer(url):
    sampled = {"text_input": STORY, "max_tokens": 16, "temperature": 1.0, "top_k": 50}
    a = ask(url, seed=11, **sampled).ids()
    assert len(a) == 16
    assert ask(url, seed=11, **sampled).ids() == a
    assert ask(url, random_seed=11, **sampled).ids() == a, "random_seed is TensorRT-LLM's name for seed"
    assert ask(url, seed=12, **sampled).ids() != a


def test_repetition_penalty_is_the_engines(url, local_engine, tokenizer):
    plain = ask(url, text_input=REPEAT, max_tokens=32).ids()
    penalised = ask(url, text_input=REPEAT, max_tokens=32, repetition_penalty=1.3).ids()
    assert penalised == local_answer(
        local_engine, chat(tokenizer, REPEAT), max_tokens=32, repetition_penalty=1.3
    )
    assert penalised != plain


def test_exclude_input_in_output_false_prepends_the_prompt(triton_server, greedy_question):
    import json
    import urllib.request

    def generate(body: dict) -> dict:
        req = urllib.request.Request(
            f"http://{triton_server.http_url}/v2/models/multistream/generate",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())

    body = {"text_input": QUESTION, "max_tokens": 16}
    assert generate(body)["text_output"] == greedy_question.text()
    full = generate({**body, "exclude_input_in_output": False})["text_output"]
    assert full == QUESTION + greedy_question.text()


# ------------------------------------------------------------------------------- outputs
def test_timing_ms_is_time_since_arrival_and_since_the_streams_last_response(url):
    """``timing_ms`` = [ms since the request arrived, ms since this stream's previous response]:
    rising, within what the client itself measured, and consistent response to response."""
    reply = ask(url, text_input=QUESTION, max_tokens=12, reasoning_streams=1, reasoning_budget=12)
    total_ms = (reply.t_end - reply.t0) * 1000
    for stream in ("output", "reasoning/0"):
        mine = reply.of(stream)
        assert len(mine) >= 2, stream
        since_arrival = [r.timing_ms[0] for r in mine]
        assert all(len(r.timing_ms) == 2 for r in mine)
        assert since_arrival == sorted(since_arrival) and since_arrival[0] > 0, (stream, since_arrival)
        # The server's clock starts when preprocessing sees the request, after the client sent it.
        for r in mine:
            assert r.timing_ms[0] <= (r.t - reply.t0) * 1000 + 1.0, (stream, r.timing_ms, r.t - reply.t0)
        assert since_arrival[-1] <= total_ms + 1.0
        # The first response's gap is from arrival; every later one is the difference of arrivals.
        assert mine[0].timing_ms[1] == pytest.approx(mine[0].timing_ms[0], abs=0.05)
        for prev, cur in zip(mine, mine[1:], strict=False):
            assert cur.timing_ms[1] == pytest.approx(cur.timing_ms[0] - prev.timing_ms[0], abs=0.05), stream


# ------------------------------------------------------------------------------- multi-stream modes
def test_sync_revise_answers_again_conditioned_on_the_reasoning(url, local_engine, tokenizer):
    """``sync: "revise"``: once the answer and reasoning are done, a ``revision`` stream answers
    again with the reasoning text as notes: exactly the engine's greedy answer to that prompt
    (and that answer depends on the notes: other notes give another one)."""
    from backend.serving.decode import revision_prompt

    question = "Suggest a name for a friendly dragon, and say why."
    reply = ask(
        url,
        text_input=question,
        max_tokens=24,
        reasoning_streams=1,
        reasoning_budget=24,
        sync="revise",
        seed=5,  # the reasoning is sampled: seeded, the whole reply replays
    )
    notes = {"reasoning/0": reply.text("reasoning/0")}
    assert notes["reasoning/0"].strip() and reply.ids("revision"), [r.stream for r in reply.responses]
    assert reply.finish("revision") in ("stop", "length")
    last_reasoning = max(r.t for r in reply.of("reasoning/0"))
    last_answer = max(r.t for r in reply.of("output"))
    assert min(r.t for r in reply.of("revision")) > max(last_reasoning, last_answer)
    revise = lambda n: local_answer(local_engine, revision_prompt(tokenizer, question, n), max_tokens=24)  # noqa: E731
    assert reply.ids("revision") == revise(notes)
    assert revise({"reasoning/0": "The dragon lives by the sea and loves storms."}) != revise(
        {"reasoning/0": "The dragon is tiny, green and afraid of fire."}
    ), "the revision does not depend on the notes"


def test_cross_mode_answer_reads_the_reasoning(url):
    """``cross``: the reasoning tokens enter the answer's session (engine-level exactness in
    tests/test_behaviour_engine.py), so the greedy answer changes; in ``isolated`` mode the
    same request's answer is the one without reasoning at all."""
    ask_story = {"text_input": STORY, "max_tokens": 48}
    alone = ask(url, **ask_story).ids()
    thinking = {"reasoning_streams": 1, "reasoning_budget": 32}
    isolated = ask(url, attention_mode="isolated", **thinking, **ask_story)
    assert isolated.ids() == alone
    cross = ask(url, attention_mode="cross", **thinking, **ask_story)
    assert cross.ids("reasoning/0"), "no reasoning"
    first_reasoning = min(r.t for r in cross.of("reasoning/0") if r.ids)
    assert first_reasoning < max(r.t for r in cross.of("output")), "reasoning came after the whole answer"
    assert cross.ids() != alone
