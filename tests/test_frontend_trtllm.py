"""The TensorRT-LLM drop-in, driven exactly as NVIDIA's ``end_to_end_grpc_client.py`` drives it.

That client (TensorRT-LLM repository, ``triton_backend/inflight_batcher_llm/client/``) builds
every input as a ``[1, 1]`` (or ``[1, n]`` for word lists) numpy array of a fixed dtype,
always sends ``text_input``, ``max_tokens``, ``stream``, ``beam_width``, ``temperature`` and
``exclude_input_in_output``, asks for ``text_output`` only (plus the log-prob outputs with
``--return-log-probs``), addresses the model as ``ensemble`` or ``tensorrt_llm_bls``, and
reads ``result.as_numpy("text_output")[0].decode()``: appended per response when streaming,
the whole text otherwise. ``trtllm_call`` below is our own code doing the same.
"""

from __future__ import annotations

import queue
import re
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from backend.serving import request as server_request

pytestmark = pytest.mark.server

PROMPT = "Name the capital of France."  # greedy margin >= 1 logit over its first 8 answer tokens, int4 or dense prompt
MODELS = ("ensemble", "tensorrt_llm_bls")


def _tensor(name: str, arr: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
    t.set_data_from_numpy(arr)
    return t


def trtllm_inputs(prompt: str, output_len: int, streaming: bool, **opt) -> dict[str, np.ndarray]:
    """The inputs the TensorRT-LLM client sends, with its dtypes and shapes."""
    prompt_arr = np.array([[prompt]]).astype(object)
    inputs = {
        "text_input": prompt_arr,
        "max_tokens": np.ones_like(prompt_arr).astype(np.int32) * output_len,
        "stream": np.array([[streaming]], dtype=bool),
        "beam_width": np.array([[opt.get("beam_width", 1)]], dtype=np.int32),
        "temperature": np.array([[opt.get("temperature", 1.0)]], dtype=np.float32),
        "exclude_input_in_output": np.array([[opt.get("exclude_input_in_output", False)]], dtype=bool),
    }
    if opt.get("num_return_sequences") is not None:
        inputs["num_return_sequences"] = np.array([[opt["num_return_sequences"]]], dtype=np.int32)
    for words in ("bad_words", "stop_words"):
        if opt.get(words):
            inputs[words] = np.array([opt[words]], dtype=object)
    for name in ("repetition_penalty", "presence_penalty", "frequency_penalty"):
        if opt.get(name) is not None:
            inputs[name] = np.array([[opt[name]]], dtype=np.float32)
    for name in ("return_log_probs", "return_context_logits", "return_generation_logits"):
        if opt.get(name):
            inputs[name] = np.array([[True]], dtype=bool)
    for name in ("end_id", "pad_id"):
        if opt.get(name) is not None:
            inputs[name] = np.array([[opt[name]]], dtype=np.int32)
    if opt.get("seed") is not None:  # TensorRT-LLM's BLS takes a seed (its client sends none)
        inputs["seed"] = np.array([[opt["seed"]]], dtype=np.uint64)
    return inputs


def trtllm_call(url: str, model: str, prompt: str, streaming: bool, output_len: int = 12, **opt) -> dict:
    """One request as the client makes it; its text as the client reads it, and its errors."""
    inputs = trtllm_inputs(prompt, output_len, streaming, **opt)
    if opt.get("batch"):  # --batch-inputs: several prompts stacked on the batch dimension
        inputs = {k: np.concatenate([v, v], axis=0) for k, v in inputs.items()}
    outputs = [grpcclient.InferRequestedOutput("text_output")]
    if opt.get("return_log_probs"):
        outputs += [grpcclient.InferRequestedOutput(n) for n in ("cum_log_probs", "output_log_probs")]
    k = opt.get("num_return_sequences") or 1
    if k > 1 and not opt.get("no_sequence_index"):  # the client asks for it exactly then
        outputs.append(grpcclient.InferRequestedOutput("sequence_index"))
    if opt.get("with_ids"):  # not the client's: our tests' look at the token ids
        outputs.append(grpcclient.InferRequestedOutput("output_ids"))
    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: got.put(error or result))
    client.async_stream_infer(
        model, [_tensor(k, v) for k, v in inputs.items()], outputs=outputs, request_id=""
    )
    client.stop_stream()  # waits for the server to close the stream, as the client does
    client.close()
    texts, errors, shapes, logprobs, seqs = [""] * k, [], [], [], []
    ids: list[list[int]] = [[] for _ in range(k)]
    while not got.empty():
        result = got.get()
        if isinstance(result, InferenceServerException):
            errors.append(result.message())
            continue
        output = result.as_numpy("text_output")
        shapes.append(output.shape)
        batch_index = result.as_numpy("batch_index")
        assert batch_index is None  # not asked for
        piece = output[0].decode("utf-8")  # the client's own read: crashes on a [1, 1] output
        seq = result.as_numpy("sequence_index")
        seq = 0 if seq is None else int(seq[0][0])  # the client's read of it
        seqs.append(seq)
        texts[seq] = texts[seq] + piece if streaming else piece
        if opt.get("with_ids"):
            ids[seq] += [int(t) for t in result.as_numpy("output_ids").reshape(-1)]
        if opt.get("return_log_probs"):
            logprobs.append((result.as_numpy("cum_log_probs"), result.as_numpy("output_log_probs")))
    return {
        "text": texts[0],
        "texts": texts,
        "seqs": seqs,
        "errors": errors,
        "shapes": shapes,
        "logprobs": logprobs,
        "ids": ids,
    }


def test_ensemble_alias_and_bls_are_served(triton_server) -> None:
    assert {"multistream", "ensemble", "tensorrt_llm_bls"} <= set(triton_server.models)


@pytest.mark.parametrize("model", MODELS)
def test_client_defaults_streaming_and_not(triton_server, model: str) -> None:
    """The client's defaults: temperature 1.0, exclude_input_in_output false."""
    full = trtllm_call(triton_server.grpc_url, model, PROMPT, streaming=False)
    assert not full["errors"], full
    assert full["shapes"] == [(1,)]  # TensorRT-LLM's one-dimensional text_output
    assert full["text"].startswith(PROMPT) and len(full["text"]) > len(PROMPT)  # prompt + output
    part = trtllm_call(triton_server.grpc_url, model, PROMPT, streaming=True)
    assert not part["errors"], part
    assert part["text"].strip() and not part["text"].startswith(PROMPT)  # streaming: output only
    assert set(part["shapes"]) == {(1,)} and len(part["shapes"]) > 1


def test_bls_chain_answers_as_the_ensemble(triton_server) -> None:
    """Greedy: the BLS chain (preprocessing -> prefill -> decode) equals the ensemble's answer."""
    opts = dict(temperature=0.0, exclude_input_in_output=True)
    a = trtllm_call(triton_server.grpc_url, "ensemble", PROMPT, streaming=False, **opts)
    b = trtllm_call(triton_server.grpc_url, "tensorrt_llm_bls", PROMPT, streaming=False, **opts)
    s = trtllm_call(triton_server.grpc_url, "tensorrt_llm_bls", PROMPT, streaming=True, **opts)
    assert a["text"] and a["text"] == b["text"] == s["text"], (a, b, s)


@pytest.mark.parametrize("model", MODELS)
def test_every_option_it_sends(triton_server, model: str) -> None:
    opts = dict(
        temperature=0.0,
        exclude_input_in_output=True,
        stop_words=["Lyon"],
        repetition_penalty=1.1,
        presence_penalty=0.2,
        frequency_penalty=0.2,
        bad_words=["Paris"],
        return_log_probs=True,
        end_id=2,
        pad_id=2,
        num_return_sequences=1,
    )
    for streaming in (False, True):
        r = trtllm_call(triton_server.grpc_url, model, PROMPT, streaming=streaming, **opts)
        assert not r["errors"] and r["text"].strip(), r
        assert "Lyon" not in r["text"] and "Paris" not in r["text"]
        assert r["logprobs"], r


def test_sampling_surface_changes_the_answer(triton_server) -> None:
    """Greedy, so any change is the option's doing: bad words, min_tokens, penalties, logprobs."""
    url = triton_server.grpc_url
    base = dict(temperature=0.0, exclude_input_in_output=True)
    plain = trtllm_call(url, "ensemble", PROMPT, streaming=False, output_len=40, **base)["text"]
    assert "Paris" in plain  # the default model knows it
    banned = trtllm_call(url, "ensemble", PROMPT, streaming=False, output_len=40, bad_words=["Paris"], **base)
    assert banned["text"] and "Paris" not in banned["text"]
    count = "List the numbers from 1 to 20, separated by commas."
    repeats = trtllm_call(url, "ensemble", count, streaming=False, output_len=30, **base)["text"]
    penalised = trtllm_call(
        url, "ensemble", count, streaming=False, output_len=30, frequency_penalty=1.0, **base
    )
    assert repeats.count(",") > 5 and penalised["text"].count(",") < repeats.count(","), (repeats, penalised)
    # min_tokens (TensorRT-LLM's name) holds the end of sequence back: a longer answer.
    from client import MultiStreamClient

    with MultiStreamClient(url) as c:
        short = c.generate(PROMPT, max_tokens=60).result()
        assert short.finish_reasons["output"] == "stop"  # ended by itself
        longer = c.generate(PROMPT, max_tokens=60, min_tokens=short.tokens["output"] + 10).result()
    assert longer.tokens["output"] >= short.tokens["output"] + 10


@pytest.mark.parametrize("model", MODELS)
def test_log_probs_in_tensorrt_llms_shapes(triton_server, model: str) -> None:
    base = dict(temperature=0.0, exclude_input_in_output=True, return_log_probs=True)
    full = trtllm_call(triton_server.grpc_url, model, PROMPT, streaming=False, **base)
    ((cum, out),) = full["logprobs"]
    assert out.shape[:2] == (1, 1) and out.shape[2] >= 1 and cum.shape == (1, 1)
    assert (out <= 0).all() and abs(float(cum[0, 0]) - float(out.sum())) < 1e-3
    streamed = trtllm_call(triton_server.grpc_url, model, PROMPT, streaming=True, **base)
    per_token = np.concatenate([o.reshape(-1) for _, o in streamed["logprobs"]])
    assert np.allclose(per_token, out.reshape(-1), atol=1e-4)  # greedy: the same tokens, the same numbers
    assert abs(float(streamed["logprobs"][-1][0][0, 0]) - float(cum[0, 0])) < 1e-3  # cumulative at the end


@pytest.mark.parametrize("entry", ["bls-grpc-cancel", "bls-http-disconnect"])
def test_hung_up_clients_stop_costing_anything(triton_server, entry: str) -> None:
    """The probe of bench.cancel_probe: clients read one response, then cancel or disconnect;
    tensorrt_llm_bls sees it (is_cancelled) and the sessions end long before max_tokens."""
    from bench.cancel_probe import probe

    urls = {"grpc": triton_server.grpc_url, "http": triton_server.http_url}
    res = probe(entry, urls, clients=2, max_tokens=400, give_up_s=20.0)
    assert not res["errors"] and res["hung_up"] == 2, res
    assert res["leaked_after_s"]["still_running"] == 0, res


@pytest.mark.parametrize(
    ("opts", "needle"),
    [
        (dict(beam_width=2), "beam"),
        (dict(return_context_logits=True), "return_context_logits"),
        (dict(return_generation_logits=True), "return_generation_logits"),
        (dict(batch=True), "batch size 2"),
    ],
    ids=["beam_width", "context_logits", "generation_logits", "batch_inputs"],
)
def test_what_stays_unsupported_says_so(triton_server, opts: dict, needle: str) -> None:
    for model in MODELS:
        r = trtllm_call(triton_server.grpc_url, model, PROMPT, streaming=False, **opts)
        assert r["errors"] and needle in r["errors"][0], r


def _count(metrics: dict, model: str) -> float:
    from tests.reliability_helpers import gauge_sum

    return gauge_sum(metrics, "nv_inference_request_success", model)


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streaming"])
@pytest.mark.parametrize("model", MODELS)
def test_num_return_sequences_k_answers_of_one_session(triton_server, model: str, streaming: bool) -> None:
    """k = 2 as the client asks for it (``--num-return-sequences 2``: it requests output
    ``sequence_index``), through the ensemble and tensorrt_llm_bls: every response tagged 0 or
    1, as the client files them; seeded sampling (seed, seed + 1) makes the two differ; the
    request is one prefill and one decode session (Triton's request counters: +1 each).
    Answer i draws from the one-answer request's seed 7 + i: its first token (sampled from
    the prompt's logits, the same numbers) is that request's first token. Later tokens are the
    same computation, but in bf16 the attention sums of one session holding two answers run
    over another key layout, so their rounding (not their math) differs: the bitwise check
    is the engine's fp32 test (tests/test_engine_unit.py), the greedy one below."""
    from tests.reliability_helpers import scrape, wait_for

    before = scrape(triton_server.metrics_url)
    opts = dict(temperature=1.0, seed=7, exclude_input_in_output=True)
    r = trtllm_call(
        triton_server.grpc_url,
        model,
        PROMPT,
        streaming,
        output_len=8,
        num_return_sequences=2,
        with_ids=True,
        **opts,
    )
    assert not r["errors"], r
    assert set(r["seqs"]) == {0, 1} and all(t.strip() for t in r["texts"]), r
    assert r["texts"][0] != r["texts"][1], r
    if not streaming:  # each sequence's whole text in its own response, as TensorRT-LLM's
        assert sorted(r["seqs"]) == [0, 1], r
    assert set(r["shapes"]) == {(1,)}, r

    def counted(name: str, n: int) -> bool:
        return _count(scrape(triton_server.metrics_url), name) - _count(before, name) == n

    assert wait_for(lambda: counted("decode", 1), 10) and counted("prefill", 1)
    for i in range(2):  # answer i draws as the k = 1 request seeded 7 + i
        one = trtllm_call(
            triton_server.grpc_url,
            model,
            PROMPT,
            streaming,
            output_len=8,
            with_ids=True,
            **{**opts, "seed": 7 + i},
        )
        assert not one["errors"] and one["seqs"] and set(one["seqs"]) == {0}, one
        assert one["ids"][0][0] == r["ids"][i][0], (i, one, r)


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streaming"])
def test_num_return_sequences_greedy_answers_are_the_one_answer(triton_server, streaming: bool) -> None:
    """Greedy k = 3 on the ensemble: no answer sees another, so each is the k = 1 answer
    (the prompt's greedy margin is >= 1 logit over these tokens, well above bf16 rounding)."""
    opts = dict(temperature=0.0, exclude_input_in_output=True, output_len=8)
    one = trtllm_call(triton_server.grpc_url, "ensemble", PROMPT, streaming, **opts)
    r = trtllm_call(triton_server.grpc_url, "ensemble", PROMPT, streaming, num_return_sequences=3, **opts)
    assert not one["errors"] and not r["errors"], (one, r)
    assert one["text"].strip() and r["texts"] == [one["text"]] * 3, (one, r)


def test_num_return_sequences_bounds(triton_server) -> None:
    """k beyond the streams of one session, and k > 1 on a rule that excludes it: clear errors
    naming the field and the rule, through both client-facing models."""
    for model in MODELS:
        over = trtllm_call(triton_server.grpc_url, model, PROMPT, False, num_return_sequences=99)
        assert over["errors"] and "num_return_sequences must be in 1..14" in over["errors"][0], over
        assert "output stream of the one decode session" in over["errors"][0], over


def test_bls_config_takes_the_ensembles_inputs(tmp_path: Path) -> None:
    """The rendered tensorrt_llm_bls declares exactly the request inputs (one list, rendered)."""
    from launcher.serve import DEFAULT_REPOSITORY, build_config, render_repository

    cfg = build_config(model_dir="none")
    render_repository(DEFAULT_REPOSITORY, tmp_path, cfg, "KIND_CPU")
    text = (tmp_path / "tensorrt_llm_bls" / "config.pbtxt").read_text()
    block = text.split("input [", 1)[1].split("]\noutput", 1)[0]
    assert dict(re.findall(r'name: "(\w+)" data_type: (TYPE_\w+)', block)) == server_request.INPUTS
    alias = (tmp_path / "ensemble" / "config.pbtxt").read_text()
    assert re.search(r'^name: "ensemble"$', alias, re.M)
