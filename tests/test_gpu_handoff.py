"""The GPU hand-off wire (BF16 through DLPack) on a real tritonserver, on CPU.

On a GPU deployment ``prompt_kv`` is declared ``TYPE_BF16`` and crosses prefill -> decode
-> (BLS) reasoning through DLPack (``backend.serving.gpu_handoff``). The same declarations
and the same code path run here with CPU tensors (``handoff_dtype = "bfloat16"``), so
everything but the device memory is exercised: Triton 2.51's BF16 tensors between stubs,
the DLPack export in prefill, the DLPack import in decode and in reasoning. With a bf16
engine the wire is exact, so the answers equal those of the FP32 wire (the session server).
"""

from __future__ import annotations

import pytest

from backend.engine import resolve_dtype
from client.sync import MultiStreamClient
from launcher.deploy_config import DeployConfig
from tests.reliability_helpers import gauge_sum, scrape, wait_for
from tests.server_helpers import READY_TIMEOUT, TEST_MODEL_DIR, small_server

pytestmark = pytest.mark.server

PROMPT = "Why is the sky blue?"
OPTIONS = {"max_tokens": 12, "reasoning_streams": 1, "reasoning_budget": 10, "seed": 7}


@pytest.fixture(scope="module")
def bf16_server(gil_check):
    with small_server(
        config=DeployConfig(handoff_dtype="bfloat16"),
        model_dir=TEST_MODEL_DIR,
        dtype="bfloat16",
        max_sessions=4,
        max_context=1024,
        ready_timeout=READY_TIMEOUT,
    ) as handle:
        yield handle


def _answer(url: str) -> tuple[str, dict[str, str], dict[str, str]]:
    with MultiStreamClient(url) as client:
        done = client.generate(PROMPT, **OPTIONS).result()
    return done.output_text, done.reasoning_texts, done.finish_reasons


def test_bf16_wire_is_rendered(bf16_server):
    repo = bf16_server.run_dir / "model_repository"
    for name in ("prefill", "decode", "reasoning"):
        assert 'name: "prompt_kv" data_type: TYPE_BF16' in (repo / name / "config.pbtxt").read_text()


def test_bf16_wire_serves_answer_and_reasoning(bf16_server):
    """The wire is used: with it, ``prefill_at`` auto keeps prompts in prefill (the hand-off)."""
    text, reasoning, finish = _answer(bf16_server.grpc_url)
    assert text.strip() and reasoning["reasoning/0"].strip()
    assert finish == {"output": "length", "reasoning/0": "length"}
    assert "prompts computed by prefill" in bf16_server.log_path.read_text(errors="replace")
    assert wait_for(
        lambda: (
            gauge_sum(
                scrape(bf16_server.metrics_url), "multistream_prefix_cache_lookup_tokens", model="prefill"
            )
            > 0
        ),
        15,
    ), "prefill computed no prompt: the hand-off was not exercised"


def test_bf16_wire_equals_the_fp32_wire(bf16_server, triton_server):
    """Same model, same bf16 engine, same seed: the wire must not change a token (the session
    server computes prompts in decode, ``prefill_at`` auto: the hand-off must not either)."""
    if resolve_dtype(triton_server.config.dtype) != resolve_dtype("bfloat16"):
        pytest.skip("the session server's engine is not bf16 on this CPU: its answers are another model's")
    assert _answer(bf16_server.grpc_url) == _answer(triton_server.grpc_url)
