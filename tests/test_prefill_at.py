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
from tests.engine_helpers import run
from tests.reliability_helpers import gauge_sum, scrape, wait_for
from tests.server_helpers import READY_TIMEOUT, TEST_MODEL_DIR, small_server

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
def decode_prefill_server(gil_check, triton_server):
    with small_server(
        model_dir=TEST_MODEL_DIR,
        dtype=triton_server.config.dtype,
        max_sessions=4,
        max_context=1024,
        ready_timeout=READY_TIMEOUT,
    ) as handle:
        yield handle


@pytest.mark.server
def test_decode_computes_the_prompt_and_answers_as_the_engine_does(decode_prefill_server) -> None:
    """With no setting (auto on a CPU): greedy answer equal to an in-process engine's; decode's
    cache saw the prompt, prefill's did not; a repeated prompt is served from decode's prefix
    cache; reasoning still runs."""
    import torch

    from backend.engine import Engine, EngineConfig, SamplingParams, StreamSpec
    from backend.model_store import resolve_model_dir
    from backend.serving.preprocessing import prompt_ids

    srv = decode_prefill_server
    assert "prompts computed by decode" in srv.log_path.read_text(errors="replace")

    def lookups(model: str) -> float:
        return gauge_sum(scrape(srv.metrics_url), "multistream_prefix_cache_lookup_tokens", model=model)

    with MultiStreamClient(srv.grpc_url) as c:
        first = c.generate(PROMPT, max_tokens=24, temperature=0.0).result()
        assert wait_for(lambda: lookups("decode") > 0, 15), (
            "decode never looked a prompt up: did it compute one?"
        )
        assert lookups("prefill") == 0, "prefill computed a prompt although prefill_at=decode"
        hits = gauge_sum(scrape(srv.metrics_url), "multistream_prefix_cache_hit_tokens", model="decode")
        again = c.generate(PROMPT, max_tokens=24, temperature=0.0).result()
        assert wait_for(
            lambda: (
                gauge_sum(scrape(srv.metrics_url), "multistream_prefix_cache_hit_tokens", model="decode")
                >= hits + 16
            ),
            15,
        ), "the repeated prompt did not come from decode's prefix cache"
        thought = c.generate(PROMPT, max_tokens=8, reasoning_streams=1, reasoning_budget=8).result()
    assert again.output_text == first.output_text
    assert thought.finish_reasons.get("reasoning/0") in ("stop", "length") and thought.output_text

    threads = torch.get_num_threads()
    engine = Engine.from_model_dir(
        resolve_model_dir(srv.config.model_dir),
        EngineConfig(dtype=srv.config.dtype, threads=1, max_sessions=1, max_context=1024),
    )
    try:
        spec = StreamSpec("output", "output", SamplingParams(max_tokens=24))
        text = run(engine, prompt_ids(engine.tokenizer, PROMPT), [spec], timeout=60).text("output")
    finally:
        engine.shutdown()
        torch.set_num_threads(threads)
    assert first.output_text == text
