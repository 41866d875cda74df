"""``prefill_at = decode`` (the default on a CPU): prompts computed inside decode's (and
reasoning's) own steps.

The prefill model then hands over an empty ``prompt_kv`` / ``prompt_logits`` and the engine
that serves the session computes the prompt with chunked prefill between the rows of its
running sessions (docs/performance.md has the trade-off measured). The reference for the
served answer is an in-process engine given the bare prompt, which takes the same path. The
other setting, ``prefill`` (the KV hand-off), is what the BF16-wire server of
``tests/test_gpu_handoff.py`` runs.
"""

from __future__ import annotations

import pytest

from backend.serving import handoff
from client.sync import MultiStreamClient
from launcher.serve import _cli_parameters, _parse
from tests.reliability_helpers import gauge_sum, scrape, wait_for
from tests.server_helpers import READY_TIMEOUT, TEST_MODEL_DIR, small_server
from tests.test_serving import DTYPES, STORY, _decode_directly, _infer, _tensors, in_process_answer, stream

PROMPT = "Write two sentences about a lighthouse keeper and the sea."


def test_the_setting_and_its_refusals_name_the_rule() -> None:
    assert handoff.resolve_prefill_at("", device="cpu") == "decode"  # the default on a CPU
    assert handoff.resolve_prefill_at("auto", device="cuda:0") == "prefill"
    assert handoff.resolve_prefill_at("auto", device="cpu", prefill_backend="trtllm") == "prefill"
    assert handoff.resolve_prefill_at("auto", device="cpu", plain_wire=False) == "prefill"
    assert handoff.resolve_prefill_at("prefill", device="cpu") == "prefill"
    assert handoff.resolve_prefill_at("decode", device="cpu") == "decode"
    with pytest.raises(ValueError, match="prefill_at must be one of auto, prefill, decode, got 'later'"):
        handoff.resolve_prefill_at("later", device="cpu")
    with pytest.raises(ValueError, match="prefill_backend=trtllm"):
        handoff.resolve_prefill_at("decode", device="cpu", prefill_backend="trtllm")
    with pytest.raises(ValueError, match="CPU deployments"):
        handoff.resolve_prefill_at("decode", device="cuda:0")
    with pytest.raises(ValueError, match="CPU deployments"):
        handoff.resolve_prefill_at("decode", device="cpu", plain_wire=False)
    empty = handoff.empty_arrays()
    assert handoff.from_arrays(empty["prompt_kv"], empty["prompt_logits"], vocab_size=7) is None
    assert _cli_parameters(_parse(["--prefill-at", "decode"])) == {"prefill": {"prefill_at": "decode"}}


@pytest.fixture(scope="module")
def prefill_server(gil_check, triton_server):
    """The other setting: prefill computes prompts and hands their KV to decode."""
    with small_server(
        model_dir=TEST_MODEL_DIR,
        dtype=triton_server.config.dtype,
        max_sessions=4,
        max_context=1024,
        parameters={"prefill": {"prefill_at": "prefill"}},
        ready_timeout=READY_TIMEOUT,
    ) as handle:
        yield handle


def lookups(srv, model: str) -> float:
    return gauge_sum(scrape(srv.metrics_url), "multistream_prefix_cache_lookup_tokens", model=model)


@pytest.mark.server
def test_by_default_decode_computes_the_prompt_and_answers_as_the_engine_does(triton_server) -> None:
    """With no setting (auto on a CPU): decode looked the prompt up, prefill did not; the
    greedy answer is an in-process engine's, which takes the same path; reasoning runs."""
    srv = triton_server
    assert "prompts computed by decode" in srv.log_path.read_text(errors="replace")
    with MultiStreamClient(srv.grpc_url) as c:
        first = c.generate(PROMPT, max_tokens=24, temperature=0.0).result()
        assert wait_for(lambda: lookups(srv, "decode") > 0, 15), "decode never looked a prompt up"
        assert lookups(srv, "prefill") == 0, "prefill computed a prompt although prefill_at is decode"
        thought = c.generate(PROMPT, max_tokens=8, reasoning_streams=1, reasoning_budget=8).result()
    assert thought.finish_reasons.get("reasoning/0") in ("stop", "length") and thought.output_text
    assert first.output_text == in_process_answer(srv.config, PROMPT, 24)[2]


@pytest.mark.server
def test_prefill_hands_decode_the_prompt_bit_for_bit(prefill_server) -> None:
    """``prefill_at = prefill``: the ensemble's answer is the in-process engine's; prefill's
    ``prompt_kv`` / ``prompt_logits`` are the in-process export bit for bit; decode takes the
    prompt from them instead of recomputing it: tampered hand-off tensors change its answer
    (forced logits pick its first token, a zeroed KV changes the rest)."""
    import numpy as np
    import torch

    from backend.engine import Engine, EngineConfig
    from backend.model_store import resolve_model_dir

    srv = prefill_server
    url = srv.grpc_url
    assert "prompts computed by prefill" in srv.log_path.read_text(errors="replace")
    res = stream(url, text_input=STORY, max_tokens=32)
    assert res.error is None, res.error
    prompt, ids, text = in_process_answer(srv.config, STORY, 32)
    assert res.ids() == ids and res.text() == text
    assert wait_for(lambda: lookups(srv, "prefill") > 0, 15), "prefill never looked a prompt up"
    assert lookups(srv, "decode") == 0, "decode computed a prompt although prefill handed it over"

    threads = torch.get_num_threads()
    engine = Engine.from_model_dir(
        resolve_model_dir(srv.config.model_dir),
        EngineConfig(dtype=srv.config.dtype, threads=1, max_sessions=1, max_context=1024),
    )
    try:
        local = engine.prefill_export(prompt, timeout=60)
        forced_first = engine.tokenizer.encode(" Banana")[0]
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)

    # The ensemble's steps one by one: preprocessing -> prefill -> decode.
    values = _tensors({"text_input": STORY, "max_tokens": 32, "stream": True})
    pre = _infer(
        url, "preprocessing", {n: (a, DTYPES[n][0]) for n, a in values.items()}, ["input_ids", "request_json"]
    )
    request = {"input_ids": (pre["input_ids"], "INT32"), "request_json": (pre["request_json"], "BYTES")}
    kv_logits = _infer(url, "prefill", request, ["prompt_kv", "prompt_logits"])
    kv, logits = kv_logits["prompt_kv"], kv_logits["prompt_logits"]
    assert torch.equal(torch.from_numpy(kv[0]), local.kv.float()), "prefill's prompt_kv != in-process export"
    assert torch.equal(torch.from_numpy(logits).reshape(local.logits.shape), local.logits.float())
    genuine = _decode_directly(url, {**request, "prompt_kv": (kv, "FP32"), "prompt_logits": (logits, "FP32")})
    assert genuine == ids
    forced = logits.copy()
    forced[0, forced_first] = forced.max() + 10.0
    first = _decode_directly(url, {**request, "prompt_kv": (kv, "FP32"), "prompt_logits": (forced, "FP32")})
    assert first[0] == forced_first != ids[0], "decode did not sample its first token from prompt_logits"
    blank = _decode_directly(
        url, {**request, "prompt_kv": (np.zeros_like(kv), "FP32"), "prompt_logits": (logits, "FP32")}
    )
    assert blank[0] == ids[0] and blank != ids, "decode ignored prompt_kv (recomputed the prompt?)"
