"""The GPU path, checked on CPU: everything of it that does not need a GPU to be exercised.

- ``python -m bench.gpu_check --device cpu`` end to end (tiny shapes), so the one-shot device
  check cannot rot between GPU sessions;
- CUDA graph buckets: the padded batch the graphs replay, run eagerly, against the plain forward;
- the container's decisions read from a rendered repository: MPS, the CUDA pool, the wire;
- the GPU hand-off's tensor conversions, the TensorRT-LLM prefill's backend selection and its
  connector's block gather against a fake of TensorRT-LLM's connector calls;
- weights shared through the manifest protocol (the file transport; CUDA IPC is the device
  check's part).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from backend.engine import Engine, EngineConfig, Prefix, SamplingParams, StreamSpec, cuda_graphs
from backend.engine import shared_weights as sw
from backend.models import LlamaModel, ModelConfig
from backend.serving import gpu_handoff, trtllm_connector, trtllm_prefill
from backend.tokenizer import Tokenizer
from bench.gpu_check import write_tokenizer
from launcher import gpu
from launcher.deploy_config import DeployConfig
from launcher.serve import DEFAULT_REPOSITORY, render_repository

ROOT = Path(__file__).resolve().parent.parent


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    base.update(kw)
    return ModelConfig.from_dict(base)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path, 300)
    return Tokenizer.from_dir(path)


# ---------------------------------------------------------------------- the device check itself
def test_device_check_runs_on_cpu(tmp_path):
    """The real CLI, tiny shapes: every section runs or says why not, and its checks hold."""
    out = tmp_path / "check.json"
    cmd = [
        sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--sessions", "1,4", "--streams", "1,2",
        "--tokens", "4", "--agree-tokens", "4", "--prompts", "2", "--prompt-len", "8", "--context", "64",
        "--weights-attached", "1", "--json", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["errors"] == {}
    assert result["ok"] is True
    assert set(result["skipped"]) == {"trtllm"}
    assert result["streams"] == {"skipped": "needs CUDA"} and result["processes"] == {"skipped": "needs CUDA"}
    agree = result["agreement"]["tiny"]["cpu_float32_vs_cpu_bfloat16"]
    assert len(agree["first_divergence"]) == 2 and agree["logit_cosine_min"] > 0.9
    assert result["handoff"]["identical"] is True and result["handoff"]["wire_kv_dtype"] == "bfloat16"
    tp = result["throughput"]["tiny"]
    assert set(tp["eager"]["tok_s"]) == {"1", "4"} and all(v > 0 for v in tp["graphs"]["tok_s"].values())
    assert tp["graphs"]["graphs"]["replays"] > 0
    assert tp["graphs_vs_eager_tokens"]["identical"] is True
    assert set(result["row_step"]["tiny"]["graphs"]["sessions_4"]["ratio_to_c1"]) == {"1", "2"}
    weights = result["weights"]
    assert [r["role"] for r in weights["instances"]] == ["owner", "attached", "own copy"]
    assert weights["same_weights"] is True


# ---------------------------------------------------------------------- CUDA graph buckets
def test_buckets():
    assert cuda_graphs.key_buckets(2048) == (256, 512, 1024, 2048)
    assert cuda_graphs.key_buckets(300) == (256, 300)
    assert cuda_graphs.key_buckets(100) == (100,)
    keys = cuda_graphs.key_buckets(1024)
    assert cuda_graphs.choose_bucket(1, 1, 10, key_bucket_list=keys) == cuda_graphs.Bucket(2, 1, 256)
    assert cuda_graphs.choose_bucket(17, 3, 257, key_bucket_list=keys) == cuda_graphs.Bucket(32, 4, 512)
    assert cuda_graphs.choose_bucket(4, 17, 10, key_bucket_list=keys) is None  # a prefill chunk
    assert cuda_graphs.choose_bucket(4, 1, 1025, key_bucket_list=keys) is None


def test_graphs_setting():
    assert cuda_graphs.graphs_wanted("auto", "cpu") is False
    assert cuda_graphs.graphs_wanted("auto", "cuda:0") is True
    assert cuda_graphs.graphs_wanted("off", "cuda:0") is False
    with pytest.raises(ValueError, match="cuda_graphs=on needs a CUDA device"):
        cuda_graphs.graphs_wanted("on", "cpu")
    with pytest.raises(ValueError, match="cuda_graphs must be auto, on or off"):
        cuda_graphs.graphs_wanted("maybe", "cpu")


def _logits_of(engine: Engine, submit) -> dict[tuple, torch.Tensor]:
    logits: dict[tuple, torch.Tensor] = {}
    engine.logits_hook = lambda sid, stream, row, lg: logits.__setitem__((sid, stream, row), lg.clone())
    submit(engine)
    engine.logits_hook = None
    return logits


def _mixed_workload(engine: Engine) -> None:
    """Concurrent sessions with 1-3 streams (uneven rows), prompts long enough to prefill in
    chunks beside decoding rows, and a cross-mode session of a channel-embedding model."""
    import threading

    done = threading.Semaphore(0)
    total = 0
    for i, (streams, length, mode) in enumerate(
        [(1, 9, "isolated"), (3, 21, "cross"), (2, 5, "isolated"), (1, 40, "cross")]
    ):
        specs = [
            StreamSpec(
                "output" if c == 0 else f"reasoning/{c - 1}",
                kind="output" if c == 0 else "reasoning",
                sampling=SamplingParams(max_tokens=6 + c, ignore_eos=True),
            )
            for c in range(streams)
        ]
        total += streams

        def on_event(ev, done=done):
            if ev.finished:
                done.release()

        engine.submit(
            list(range(3 + i, 3 + i + length)), specs, attention=mode, on_event=on_event, session_id=f"s{i}"
        )
    for _ in range(total):
        assert done.acquire(timeout=120)


@pytest.mark.parametrize("channel_embedding", [0, 4])
def test_padded_graph_batches_match_the_plain_forward(tokenizer, channel_embedding):
    """What a graph replays (the batch padded to its bucket: sessions, rows, keys) run
    eagerly: every sampled logit equals the plain forward's, so the padding is neutral."""
    cfg = tiny_cfg()
    config = EngineConfig(
        dtype="float32", quantization="none", max_sessions=6, max_context=96, prefill_chunk=24
    )
    runs = {}
    for graphs in (False, True):
        model = LlamaModel.random(cfg, dtype=torch.float32, seed=5, channel_embedding=channel_embedding)
        engine = Engine(model, tokenizer, config)
        runner = cuda_graphs.install(engine, capture=False) if graphs else None
        try:
            runs[graphs] = _logits_of(engine, _mixed_workload)
        finally:
            engine.shutdown()
        if runner is not None:
            assert runner.stats.replays >= 5, runner.stats.as_dict()
            assert runner.stats.fallbacks.get("larger than every bucket", 0) > 0  # the prefill chunks
    plain, padded = runs[False], runs[True]
    assert plain.keys() == padded.keys() and len(plain) > 40
    worst = max((plain[k] - padded[k]).abs().max().item() for k in plain)
    assert worst < 1e-4, worst
    assert all(plain[k].argmax() == padded[k].argmax() for k in plain)


def test_padded_batch_layout(tokenizer):
    """Real steps of uneven rows, padded: real tokens keep their values and mask rows,
    padding writes only to the spare slot's last position, and every query row sees a key."""
    model = LlamaModel.random(tiny_cfg(), dtype=torch.float32, seed=3)
    engine = Engine(
        model, tokenizer, EngineConfig(dtype="float32", quantization="none", max_sessions=6, max_context=64)
    )
    batches = []
    forward = model.forward

    def keep(batch, k, v):
        batches.append(batch)
        return forward(batch, k, v)

    model.forward = keep
    try:
        _mixed_workload(engine)
        runner = cuda_graphs.CudaGraphRunner(
            forward, engine.pool.k, engine.pool.v, device="cpu", channel_embedding=False, capture=False
        )
    finally:
        engine.shutdown()
    uneven = [
        b
        for b in batches
        if runner.bucket_for(b)[0] is not None and b.tokens.shape[0] < runner.bucket_for(b)[0].tokens
    ]
    assert len(uneven) >= 3
    for batch in uneven:
        bucket = runner.bucket_for(batch)[0]
        pad = runner.pad_slot(batch)
        static = cuda_graphs.StaticBatch(bucket, torch.device("cpu"), 64, channel_embedding=False)
        rows = static.fill(batch, pad)
        dst = (batch.pad_index // batch.max_q) * bucket.queries + batch.pad_index % batch.max_q
        assert torch.equal(static.tokens[dst], batch.tokens) and torch.equal(static.slot[dst], batch.slot)
        assert torch.equal(static.cache_index[dst], batch.cache_index) and torch.equal(
            rows, dst[batch.logit_index]
        )
        padding = torch.ones(bucket.tokens, dtype=torch.bool)
        padding[dst] = False
        assert (static.slot[padding] == pad).all() and (static.cache_index[padding] == 63).all()
        assert pad not in batch.slot_list
        assert static.mask.any(dim=-1).all(), "a query row with no visible key gives NaN"
        real = batch.num_sessions
        assert torch.equal(static.mask[:real, :, : batch.max_q, : batch.key_len], batch.mask)
        assert not static.mask[:, :, :, batch.key_len :].any()


def test_padding_goes_to_a_slot_without_tokens(tokenizer):
    model = LlamaModel.random(tiny_cfg(), dtype=torch.float32, seed=1)
    engine = Engine(
        model, tokenizer, EngineConfig(dtype="float32", quantization="none", max_sessions=3, max_context=64)
    )
    try:
        runner = cuda_graphs.install(engine, capture=False)
        batch = SimpleNamespace(slot_list=[0, 2])
        assert runner.pad_slot(batch) == 1
        assert runner.pad_slot(SimpleNamespace(slot_list=[0, 1, 2])) is None
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- MPS, pool, wire (launcher.gpu)
def _render(tmp_path: Path, kind: str, **cfg) -> Path:
    dest = tmp_path / f"repo-{kind}"
    render_repository(DEFAULT_REPOSITORY, dest, DeployConfig(model_dir="", **cfg), kind)
    return dest


def test_mps_follows_the_rendered_instances(tmp_path):
    gpu_repo = _render(tmp_path, "KIND_GPU")
    plan = gpu.plan(gpu_repo, gpus=1)
    assert plan.instances_per_gpu == {0: 3}  # prefill + decode + reasoning share GPU 0
    assert plan.mps is True
    cpu_repo = _render(tmp_path, "KIND_CPU")
    assert gpu.plan(cpu_repo, gpus=1).mps is False
    assert gpu.plan(cpu_repo, gpus=1).instances_per_gpu == {0: 0}


def test_mps_with_instances_pinned_to_their_own_gpus(tmp_path):
    repo = tmp_path / "pinned"
    for name, gpus in (("prefill", "[0]"), ("decode", "[1]")):
        (repo / name).mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nbackend: "python"\nmax_batch_size: 8\n'
            f"instance_group [ {{ count: 1 kind: KIND_GPU gpus: {gpus} }} ]\n"
        )
    assert gpu.plan(repo, gpus=2).instances_per_gpu == {0: 1, 1: 1}
    assert gpu.plan(repo, gpus=2).mps is False
    (repo / "decode" / "config.pbtxt").write_text(
        'name: "decode"\nbackend: "python"\ninstance_group [ { count: 2 kind: KIND_GPU gpus: [1] } ]\n'
    )
    assert gpu.plan(repo, gpus=2).mps is True


def test_pool_is_sized_for_the_handoff(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "num_hidden_layers": 30,
                "num_attention_heads": 9,
                "num_key_value_heads": 3,
                "hidden_size": 576,
                "vocab_size": 49152,
            }
        )
    )
    dest = tmp_path / "rendered"
    cfg = DeployConfig(model_dir=str(model_dir), max_context=2048, instances={"prefill": 2, "decode": 3})
    render_repository(DEFAULT_REPOSITORY, dest, cfg, "KIND_GPU")
    plan = gpu.plan(dest, gpus=2)
    one = 30 * 2 * 3 * 64 * 2048 * 2 + 49152 * 4  # BF16 KV at max_context + FP32 logits
    assert plan.handoff_bytes == one
    assert plan.pool_bytes >= one * (2 * 8 + 3) and plan.pool_bytes % (16 << 20) == 0
    assert plan.tritonserver_args() == [f"--cuda-memory-pool-byte-size={g}:{plan.pool_bytes}" for g in (0, 1)]


def test_rendered_wire(tmp_path):
    gpu_repo = _render(tmp_path, "KIND_GPU")
    for name in ("prefill", "decode", "reasoning"):
        text = (gpu_repo / name / "config.pbtxt").read_text()
        assert 'name: "prompt_kv" data_type: TYPE_BF16' in text
        assert ('FORCE_CPU_ONLY_INPUT_TENSORS" value: { string_value: "no"' in text) == (name != "prefill")
    cpu_repo = _render(tmp_path, "KIND_CPU")
    for name in ("prefill", "decode", "reasoning"):
        text = (cpu_repo / name / "config.pbtxt").read_text()
        assert 'name: "prompt_kv" data_type: TYPE_FP32' in text and "FORCE_CPU_ONLY" not in text
    assert gpu.handoff_type(DeployConfig(dtype="float32"), "KIND_GPU") == "TYPE_FP32"
    assert gpu.handoff_type(DeployConfig(handoff_dtype="bfloat16"), "KIND_CPU") == "TYPE_BF16"
    with pytest.raises(ValueError, match="handoff_dtype must be auto, float32 or bfloat16"):
        gpu.handoff_type(DeployConfig(handoff_dtype="int8"), "KIND_GPU")


def _entrypoint(tmp_path: Path, **env: str) -> str:
    full = {
        **os.environ,
        "MULTISTREAM_DRY_RUN": "1",
        "MODEL_DIR": "none",
        "GPUS": "1",
        "RENDERED_REPOSITORY": str(tmp_path / "models"),
        "MULTISTREAM_RUN_DIR": str(tmp_path / "run"),
        **env,
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "docker" / "entrypoint.sh"), "--log-verbose", "1"],
        cwd=ROOT,
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_entrypoint_starts_mps_when_instances_share_a_gpu(tmp_path):
    out = _entrypoint(tmp_path)
    lines = out.strip().splitlines()
    assert lines[0] == "+ nvidia-cuda-mps-control -d"
    assert lines[1].startswith(
        f"+ tritonserver --model-repository {tmp_path / 'models'} --allow-metrics true"
    )
    assert "--cuda-memory-pool-byte-size=0:" in lines[1] and lines[1].endswith("--log-verbose 1")
    assert "quit | nvidia-cuda-mps-control" in lines[2]
    out = _entrypoint(tmp_path, MPS="off")
    assert "nvidia-cuda-mps-control" not in out
    out = _entrypoint(tmp_path, GPUS="0")  # no GPU placed: nothing shares one
    assert "mps-control -d" not in out


# ---------------------------------------------------------------------- the GPU hand-off's tensors
def test_wire_declared_by_the_model_config():
    config = {
        "input": [
            {"name": "input_ids", "data_type": "TYPE_INT32"},
            {"name": "prompt_kv", "data_type": "TYPE_BF16"},
        ],
        "output": [],
    }
    wire = gpu_handoff.declared_wire(config, "cpu")
    assert wire.kv == torch.bfloat16 and wire.logits == torch.float32 and not wire.plain
    assert gpu_handoff.declared_wire({"input": [], "output": []}).plain
    with pytest.raises(ValueError, match="prompt_kv: data_type TYPE_INT8 is not a hand-off type"):
        gpu_handoff.declared_wire({"output": [{"name": "prompt_kv", "data_type": "TYPE_INT8"}]})


def test_wire_round_trip_is_exact_for_bf16_kv():
    kv = torch.randn(2, 2, 3, 7, 8).to(torch.bfloat16).float()  # bf16 values in an fp32 pool
    logits = torch.randn(1, 300)
    wire = gpu_handoff.Wire(kv=torch.bfloat16)
    prefix = sw_prefix(kv, logits)
    assert gpu_handoff.uses_dlpack(prefix, wire) and not gpu_handoff.uses_dlpack(prefix, gpu_handoff.Wire())
    sent_kv, sent_logits = gpu_handoff.to_wire(prefix, wire)
    assert (
        sent_kv.shape == (1, 2, 2, 3, 7, 8)
        and sent_kv.dtype == torch.bfloat16
        and sent_logits.shape == (1, 300)
    )
    back = gpu_handoff.from_wire(sent_kv, sent_logits, 300, wire)
    assert torch.equal(back.kv.float(), kv) and torch.equal(back.logits, logits)
    assert back.kv.data_ptr() != sent_kv.data_ptr()  # owned: the request's buffer is not
    with pytest.raises(ValueError, match="not a multiple of the vocabulary"):
        gpu_handoff.from_wire(sent_kv, sent_logits, 299, wire)


def sw_prefix(kv, logits):
    from backend.engine import PrefixKV

    return PrefixKV(kv=kv, logits=logits)


# ---------------------------------------------------------------------- TensorRT-LLM prefill
def test_backend_selection():
    yes, no = (True, "1.1.0"), (False, "tensorrt_llm is not installed")
    pick = trtllm_prefill.select_backend
    assert pick("auto", device="cuda:0", channel_embedding=False, available=yes)[0] == "trtllm"
    backend, why = pick("auto", device="cuda:0", channel_embedding=False, available=no)
    assert backend == "torch" and "not installed" in why
    assert pick("auto", device="cpu", channel_embedding=False, available=yes)[0] == "torch"
    backend, why = pick("auto", device="cuda:0", channel_embedding=True, available=yes)
    assert backend == "torch" and "channel embedding" in why
    assert pick("torch", device="cuda:0", channel_embedding=False, available=yes)[0] == "torch"
    with pytest.raises(ValueError, match="prefill_backend=trtllm: .*needs a GPU"):
        pick("trtllm", device="cpu", channel_embedding=False, available=yes)
    with pytest.raises(ValueError, match="prefill_backend must be one of auto, torch, trtllm"):
        pick("vllm", device="cuda:0", channel_embedding=False, available=yes)


class FakeTrtllmPool:
    """TensorRT-LLM's registered pool ``[blocks, layers, 2, T * H * D]``, filled token by token
    from a known KV (loops, independent of the vectorised gather under test)."""

    def __init__(self, layers=3, heads=2, head_dim=4, tokens_per_block=4, blocks=16, layout="HND"):
        self.L, self.H, self.D, self.T, self.layout = layers, heads, head_dim, tokens_per_block, layout
        self.tensor = torch.full((blocks, layers, 2, tokens_per_block * heads * head_dim), float("nan"))

    def write(self, kv: torch.Tensor, block_ids: list[int]) -> None:
        for t in range(kv.shape[3]):
            block, off = block_ids[t // self.T], t % self.T
            for layer in range(self.L):
                for k in range(2):
                    flat = self.tensor[block, layer, k]
                    for h in range(self.H):
                        i = (h * self.T + off) if self.layout == "HND" else (off * self.H + h)
                        flat[i * self.D : (i + 1) * self.D] = kv[layer, k, h, t]


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_block_gather_matches_a_token_by_token_copy(layout):
    pool = FakeTrtllmPool(layout=layout)
    kv = torch.randn(3, 2, 2, 10, 4)  # 10 tokens: 2 full blocks and half of a third
    blocks = [7, 2, 11]
    pool.write(kv, blocks)
    got = trtllm_prefill.gather_prompt_kv(
        pool.tensor, blocks + [5], 10, num_kv_heads=2, head_dim=4, layout=layout
    )
    assert got.shape == (3, 2, 2, 10, 4) and torch.equal(got, kv)
    with pytest.raises(ValueError, match="10 tokens need 3 blocks of 4, got 2"):
        trtllm_prefill.gather_prompt_kv(
            pool.tensor, blocks[:2], 10, num_kv_heads=2, head_dim=4, layout=layout
        )
    with pytest.raises(ValueError, match="does not hold K and V of 3 heads"):
        trtllm_prefill.gather_prompt_kv(pool.tensor, blocks, 10, num_kv_heads=3, head_dim=4, layout=layout)


def _request(rid, tokens, blocks, computed, scheduled):
    """TensorRT-LLM's ``RequestData`` (kv_cache_connector.py) as the scheduler half sees it."""
    return SimpleNamespace(
        request_id=rid,
        new_tokens=tokens,
        new_block_ids=blocks,
        computed_position=computed,
        num_scheduled_tokens=scheduled,
    )


def test_connector_hands_each_prompt_over_once_complete():
    """The call order of TensorRT-LLM's py_executor for a chunked prompt (12 tokens in chunks
    of 8 + 4) beside a short one, driven by hand: register, then per step build_connector_meta
    -> bind_connector_meta -> forward -> wait_for_save."""
    pool = FakeTrtllmPool(layout="HND")
    sink = trtllm_prefill.PromptSink()
    sink.configure(num_kv_heads=2, head_dim=4, layout="HND")
    scheduler = trtllm_connector.PromptKVScheduler(llm_args=None)
    worker = trtllm_connector.PromptKVWorker(llm_args=None)
    worker.sink = sink
    worker.register_kv_caches(pool.tensor)
    long_prompt, short_prompt = tuple(range(100, 112)), (5, 6, 7)
    kv_long, kv_short = torch.randn(3, 2, 2, 12, 4), torch.randn(3, 2, 2, 3, 4)
    waiting_long, waiting_short = sink.expect(long_prompt), sink.expect(short_prompt)
    duplicate = sink.expect(short_prompt)
    steps = [
        SimpleNamespace(
            new_requests=[
                _request(1, list(long_prompt), [3, 9, 4], 0, 8),
                _request(2, list(short_prompt), [12], 0, 3),
            ],
            cached_requests=[],
        ),
        SimpleNamespace(new_requests=[], cached_requests=[_request(1, [], [], 8, 4)]),
        SimpleNamespace(new_requests=[], cached_requests=[_request(1, [555], [], 12, 1)]),  # a decode step
    ]
    pool.write(kv_short, [12])
    pool.write(kv_long[:, :, :, :8], [3, 9])  # the first forward computed 8 of the 12
    delivered = []
    for i, out in enumerate(steps):
        meta = scheduler.build_connector_meta(out)
        worker.bind_connector_meta(meta)
        if i == 1:
            pool.write(kv_long, [3, 9, 4])  # the second forward computed the rest
        worker.wait_for_save(stream=None)
        delivered.append(sorted(c.request_id for c in meta))
    assert delivered == [[2], [1], []]
    kv, ready = waiting_long.result(timeout=1)
    assert ready is None and torch.equal(kv, kv_long)
    assert torch.equal(waiting_short.result(timeout=1)[0], kv_short)
    assert not duplicate.done()  # the second identical prompt waits for its own request
    assert scheduler.request_finished(SimpleNamespace(request_id=1), [3, 9, 4]) is False
    assert scheduler.get_num_new_matched_tokens(None, 0) == (0, False)
    assert worker.get_finished([1], []) == ([], [])


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_layout_is_proven_against_the_torch_prefill(layout):
    pool = FakeTrtllmPool(layout=layout)
    kv = torch.randn(3, 2, 2, 10, 4)
    pool.write(kv, [4, 1, 8])

    def export(prompt, candidate):
        got = trtllm_prefill.gather_prompt_kv(
            pool.tensor, [4, 1, 8], 10, num_kv_heads=2, head_dim=4, layout=candidate
        )
        return sw_prefix(got, torch.zeros(1, 300))

    chosen, scores = trtllm_prefill.choose_layout(export, sw_prefix(kv, torch.zeros(1, 300)), list(range(10)))
    assert chosen == layout and scores[layout] == pytest.approx(1.0)
    other = "NHD" if layout == "HND" else "HND"
    assert scores[other] < 0.5
    with pytest.raises(RuntimeError, match="matches the torch prefill under no block layout"):
        trtllm_prefill.choose_layout(
            export, sw_prefix(kv, torch.zeros(1, 300)), list(range(10)), layouts=(other,)
        )


def test_plain_prompts_only():
    assert trtllm_prefill.plain_prompt([1, 2, 3]) == [1, 2, 3]
    assert trtllm_prefill.plain_prompt(Prefix.prompt([4, 5])) == [4, 5]
    assert trtllm_prefill.plain_prompt(Prefix.grid([[1, 2], [3, 4]])) is None


def test_attach_keeps_the_torch_engine_without_tensorrt_llm(tokenizer):
    engine = Engine(
        LlamaModel.random(tiny_cfg(), seed=2), tokenizer, EngineConfig(dtype="float32", max_sessions=2)
    )
    try:
        original = engine.prefill_export
        assert trtllm_prefill.attach(engine, {"prefill_backend": "auto"}, "/nonexistent", "cpu") == "torch"
        assert engine.prefill_export == original
        with pytest.raises(ValueError, match="prefill_backend=trtllm"):
            trtllm_prefill.attach(engine, {"prefill_backend": "trtllm"}, "/nonexistent", "cpu")
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------- weights once per device
def test_flat_view_rebuilds_the_same_model(tokenizer):
    model = LlamaModel.random(tiny_cfg(attention_bias=True), dtype=torch.float32, seed=4, channel_embedding=3)
    tensors = sw.model_tensors(model)
    assert "lm_head" not in tensors and "channel_embedding" in tensors and "layers.1.qkv_bias" in tensors
    again = sw.rebuild(model.cfg, tensors, "cpu", torch.float32)
    assert again.lm_head is again.embed and again.layers[1].qkv is model.layers[1].qkv  # no copies
    moved = sw.to_device(model, "cpu", torch.bfloat16)
    assert moved.layers[0].gate_up.dtype == torch.bfloat16 and moved.lm_head is moved.embed


def test_second_instance_attaches_instead_of_loading(tmp_path):
    cfg = tiny_cfg()
    loads = []

    def loader():
        loads.append(1)
        return LlamaModel.random(cfg, dtype=torch.bfloat16, seed=8)

    first = sw.WeightShare(tmp_path, "k").load(loader)
    second = sw.WeightShare(tmp_path, "k", timeout_s=5).load(
        lambda: pytest.fail("the second instance loaded")
    )
    assert (first.role, second.role) == ("owner", "attached") and len(loads) == 1
    a, b = sw.model_tensors(first.model), sw.model_tensors(second.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Both map the same file pages (no copy): a write through one is seen by the other.
    before = b["final_norm"][0].item()
    a["final_norm"][0] += 1.0
    assert b["final_norm"][0].item() == pytest.approx(before + 1.0, rel=1e-2)
    manifest = tmp_path / "k.manifest"
    assert manifest.is_file() and (tmp_path / "k.bin").stat().st_size >= sum(
        t.numel() * 2 for t in a.values()
    )


def test_a_dead_owners_manifest_is_not_used(tmp_path):
    import pickle

    (tmp_path / "k.manifest").write_bytes(
        pickle.dumps({"version": sw.MANIFEST_VERSION, "pid": 2**22 + 12345})
    )
    share = sw.WeightShare(tmp_path, "k", timeout_s=5)
    lock = share._try_lock()  # someone else holds the lock, its manifest points to a dead pid
    try:
        got = sw.WeightShare(tmp_path, "k", timeout_s=0.3).load(lambda: LlamaModel.random(tiny_cfg(), seed=1))
    finally:
        lock.close()
    assert got.role == "own copy" and "no manifest" in got.note


def test_sharing_setting():
    assert sw.sharing_wanted("auto", "cuda:0") and not sw.sharing_wanted("auto", "cpu")
    assert sw.sharing_wanted("on", "cpu") and not sw.sharing_wanted("off", "cuda:0")
    with pytest.raises(ValueError, match="share_weights must be auto, on or off"):
        sw.sharing_wanted("yes", "cpu")
