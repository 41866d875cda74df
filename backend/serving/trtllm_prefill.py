"""A TensorRT-LLM prefill backend: TRT-LLM computes the prompt, a KV cache connector hands
its blocks over in the project's ``prompt_kv`` layout.

Targets **TensorRT-LLM 1.1.0** (the version in ``nvcr.io/nvidia/tritonserver:25.12-trtllm-
python-py3``, the image the Dockerfile pins): its LLM API with the PyTorch backend
(``tensorrt_llm.LLM(backend="pytorch")``) and the KV cache connector interface of
``tensorrt_llm._torch.pyexecutor.kv_cache_connector`` (``KvCacheConnectorScheduler`` /
``KvCacheConnectorWorker``, configured through ``llm_args.KvCacheConnectorConfig``).

Why a connector: the LLM API returns tokens and logits, not the KV cache. TRT-LLM calls a
connector's scheduler half once per step with the blocks each request owns, and its worker
half at the end of every forward (``wait_for_save``). ``PromptKVScheduler`` (in
``backend.serving.trtllm_connector``) notes the step in which a request's last prompt token
is computed; ``PromptKVWorker`` then
gathers that request's blocks from the registered pool (``[blocks, layers, 2,
tokens_per_block * kv_heads * head_dim]``) into ``[layers, 2, kv_heads, P, head_dim]``
(:func:`gather_prompt_kv`) on TRT-LLM's stream and hands it to the waiting caller through
:data:`SINK`. TRT-LLM runs its executor in this process for that
(``TLLM_WORKER_USE_SINGLE_PROCESS=1``), so the connector and the caller share memory.

Chosen by the prefill parameter ``prefill_backend``: ``torch`` (the engine), ``trtllm``, or
``auto`` = trtllm when ``tensorrt_llm`` imports, the instance is on a GPU and the checkpoint
has no channel embedding (TRT-LLM knows nothing of the paper's channels). Prompts of the
paper's layout (grid prefixes) always go to the torch engine.

Before serving, the instance prefills a probe prompt through both backends and keeps the
pool's block layout (``HND`` / ``NHD``; parameter ``trtllm_kv_layout``, default ``auto``)
under which the KVs agree (:func:`choose_layout`): a wrong layout would not fail, it would
answer from garbage. None agreeing: ``auto`` serves with torch, ``trtllm`` refuses to start.

Not proven on a GPU yet: ``python -m bench.gpu_check --trtllm`` in the TensorRT-LLM image
compares this backend's KV and first token with the torch prefill under both layouts
(docs/gpu.md).
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backend.engine import Prefix, PrefixKV
from backend.models.config import ModelConfig

#: The TensorRT-LLM release whose API this module is written against.
TRTLLM_VERSION = "1.1.0"
BACKENDS = ("auto", "torch", "trtllm")
#: Where TensorRT-LLM imports the connector classes from (they subclass its own ABCs, so
#: they live apart: importing this module must not import tensorrt_llm, every stub does).
CONNECTOR_MODULE = "backend.serving.trtllm_connector"
#: Block layouts of TRT-LLM's pool: per (block, layer, K|V), ``[kv_heads, tokens, head_dim]``
#: (its C++ attention kernels) or ``[tokens, kv_heads, head_dim]``.
LAYOUTS = ("HND", "NHD")


# ---------------------------------------------------------------------- selection
def trtllm_available() -> tuple[bool, str]:
    """Whether ``tensorrt_llm`` imports here, and its version or why not."""
    if importlib.util.find_spec("tensorrt_llm") is None:
        return False, "tensorrt_llm is not installed"
    try:
        import tensorrt_llm
    except Exception as exc:  # noqa: BLE001 - a wheel that cannot load (no GPU driver, ...)
        return False, f"tensorrt_llm does not import: {type(exc).__name__}: {exc}"
    return True, str(getattr(tensorrt_llm, "__version__", "unknown"))


def select_backend(
    setting: str,
    *,
    device: str | torch.device,
    channel_embedding: bool,
    available: tuple[bool, str] | None = None,
) -> tuple[str, str]:
    """``(backend, reason)`` for the ``prefill_backend`` parameter on this instance.

    ``trtllm`` asked for but impossible is an error naming the missing condition; ``auto``
    falls back to ``torch`` and says why.
    """
    setting = (setting or "auto").lower()
    if setting not in BACKENDS:
        raise ValueError(f"prefill_backend must be one of {', '.join(BACKENDS)}, got {setting!r}")
    if setting == "torch":
        return "torch", "prefill_backend=torch"
    ok, detail = available if available is not None else trtllm_available()
    problems = []
    if not ok:
        problems.append(detail)
    if torch.device(device).type != "cuda":
        problems.append(f"the instance runs on {device}, TensorRT-LLM needs a GPU")
    if channel_embedding:
        problems.append("the checkpoint has a channel embedding, which TensorRT-LLM does not compute")
    if problems:
        if setting == "trtllm":
            raise ValueError("prefill_backend=trtllm: " + "; ".join(problems))
        return "torch", "auto: " + "; ".join(problems)
    return "trtllm", f"tensorrt_llm {detail}"


# ---------------------------------------------------------------------- block gather
def gather_prompt_kv(
    pool: torch.Tensor,
    block_ids: Sequence[int],
    num_tokens: int,
    *,
    num_kv_heads: int,
    head_dim: int,
    layout: str = "HND",
) -> torch.Tensor:
    """A request's first ``num_tokens`` cached tokens as ``[layers, 2, kv_heads, P, head_dim]``.

    ``pool`` is what TRT-LLM registers with a connector: ``[blocks, layers, 2, X]`` with
    ``X = tokens_per_block * kv_heads * head_dim`` in ``layout``; ``block_ids`` are the
    request's blocks in token order.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"trtllm_kv_layout must be one of {LAYOUTS}, got {layout!r}")
    if pool.dim() != 4:
        raise ValueError(f"the KV pool must be [blocks, layers, 2, X], got shape {tuple(pool.shape)}")
    _, layers, kv_factor, per_block = pool.shape
    if kv_factor != 2 or per_block % (num_kv_heads * head_dim):
        raise ValueError(
            f"KV pool block of {kv_factor} x {per_block} values does not hold K and V of "
            f"{num_kv_heads} heads x {head_dim}"
        )
    tokens_per_block = per_block // (num_kv_heads * head_dim)
    needed = math.ceil(num_tokens / tokens_per_block)
    if len(block_ids) < needed:
        raise ValueError(
            f"{num_tokens} tokens need {needed} blocks of {tokens_per_block}, got {len(block_ids)}"
        )
    ids = torch.as_tensor(list(block_ids[:needed]), dtype=torch.long, device=pool.device)
    blocks = pool.index_select(0, ids)  # [nb, L, 2, X]
    nb = blocks.shape[0]
    if layout == "HND":
        grid = blocks.view(nb, layers, 2, num_kv_heads, tokens_per_block, head_dim).permute(1, 2, 3, 0, 4, 5)
    else:
        grid = blocks.view(nb, layers, 2, tokens_per_block, num_kv_heads, head_dim).permute(1, 2, 4, 0, 3, 5)
    flat = grid.reshape(layers, 2, num_kv_heads, nb * tokens_per_block, head_dim)
    return flat[:, :, :, :num_tokens].contiguous()


# ---------------------------------------------------------------------- connector <-> caller
@dataclass
class Capture:
    """One request whose prompt is complete after the current forward: gather its blocks."""

    request_id: int
    prompt: tuple[int, ...]
    block_ids: list[int]


class PromptSink:
    """Where the worker delivers gathered KV and the caller waits for it, keyed by prompt.

    Keyed by the prompt's token ids because TensorRT-LLM's request ids are its own; two
    identical prompts in flight get identical KV, so first come, first served is exact.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, ...], collections.deque[concurrent.futures.Future]] = {}
        self.num_kv_heads = 0
        self.head_dim = 0
        self.layout = "HND"

    def configure(self, *, num_kv_heads: int, head_dim: int, layout: str) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"trtllm_kv_layout must be one of {LAYOUTS}, got {layout!r}")
        self.num_kv_heads, self.head_dim, self.layout = num_kv_heads, head_dim, layout

    def expect(self, prompt: Sequence[int]) -> concurrent.futures.Future:
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._waiting.setdefault(tuple(prompt), collections.deque()).append(fut)
        return fut

    def forget(self, prompt: Sequence[int], fut: concurrent.futures.Future) -> None:
        with self._lock:
            queue = self._waiting.get(tuple(prompt))
            if queue is not None and fut in queue:
                queue.remove(fut)
                if not queue:
                    del self._waiting[tuple(prompt)]

    def deliver(self, prompt: tuple[int, ...], value: Any) -> bool:
        """Hands ``value`` to the oldest caller waiting for ``prompt``; False if none waits."""
        with self._lock:
            queue = self._waiting.get(prompt)
            if not queue:
                return False
            fut = queue.popleft()
            if not queue:
                del self._waiting[prompt]
        fut.set_result(value)
        return True


#: The one sink of this process: TRT-LLM builds the connector classes by name, so they find
#: their caller here.
SINK = PromptSink()


# ---------------------------------------------------------------------- the backend
class TrtllmPrefill:
    """``prefill_export`` for plain prompts, computed by TensorRT-LLM's LLM API."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        max_context: int,
        kv_layout: str = "HND",
        kv_fraction: float = 0.2,
        tokens_per_block: int = 32,
        timeout_s: float = 120.0,
    ):
        os.environ.setdefault("TLLM_WORKER_USE_SINGLE_PROCESS", "1")  # the connector lives here
        from tensorrt_llm import LLM
        from tensorrt_llm.llmapi import KvCacheConfig
        from tensorrt_llm.llmapi.llm_args import KvCacheConnectorConfig

        cfg = ModelConfig.from_dir(Path(model_dir))
        SINK.configure(num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, layout=kv_layout)
        self.vocab_size = cfg.vocab_size
        self.timeout_s = timeout_s
        eos = json.loads((Path(model_dir) / "config.json").read_text()).get("eos_token_id")
        self.end_id = int((eos if isinstance(eos, int) else (eos or [0])[0]) or 0)
        self.llm = LLM(
            model=str(model_dir),
            backend="pytorch",
            skip_tokenizer_init=True,
            max_seq_len=max_context,
            disable_overlap_scheduler=True,
            cuda_graph_config=None,
            kv_cache_config=KvCacheConfig(
                free_gpu_memory_fraction=kv_fraction,
                enable_block_reuse=False,
                tokens_per_block=tokens_per_block,
            ),
            kv_connector_config=KvCacheConnectorConfig(
                connector_module=CONNECTOR_MODULE,
                connector_scheduler_class="PromptKVScheduler",
                connector_worker_class="PromptKVWorker",
            ),
        )

    def prefill_export(self, prompt_ids: Sequence[int]) -> PrefixKV:
        from tensorrt_llm import SamplingParams

        prompt = [int(t) for t in prompt_ids]
        fut = SINK.expect(prompt)
        try:
            params = SamplingParams(
                max_tokens=1,
                top_k=1,
                end_id=self.end_id,  # no tokenizer (skip_tokenizer_init): the LLM API needs it given
                pad_id=self.end_id,
                ignore_eos=True,
                detokenize=False,
                return_generation_logits=True,
            )
            out = self.llm.generate_async(prompt, sampling_params=params).result(timeout=self.timeout_s)
            kv, ready = fut.result(timeout=self.timeout_s)
        except BaseException:
            SINK.forget(prompt, fut)
            raise
        if ready is not None:
            ready.synchronize()
            kv.record_stream(torch.cuda.current_stream(kv.device))
        logits = out.outputs[0].generation_logits
        if logits is None:
            raise RuntimeError("TensorRT-LLM returned no generation logits for the prefill")
        logits = torch.as_tensor(logits)
        last = logits.reshape(-1, logits.shape[-1])[:1, : self.vocab_size]  # a padded vocabulary is cut
        return PrefixKV(kv=kv, logits=last.float())

    def export_with_layout(self, prompt_ids: Sequence[int], layout: str) -> PrefixKV:
        """:meth:`prefill_export` reading the pool as ``layout`` (for :func:`choose_layout`)."""
        SINK.layout = layout
        return self.prefill_export(prompt_ids)

    def shutdown(self) -> None:
        self.llm.shutdown()


#: Cosine between TensorRT-LLM's prompt KV and the torch engine's below which the blocks
#: were read in the wrong layout (a wrong layout gives unrelated numbers, near 0; two
#: correct bf16 computations agree to ~0.9999).
MIN_KV_COSINE = 0.99


def kv_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two prompt KVs; -1 when their shapes differ or it is not finite (a wrong
    layout may read never-written memory)."""
    if tuple(a.shape) != tuple(b.shape):
        return -1.0
    a, b = a.float().flatten(), b.float().to(a.device).flatten()
    c = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return c if math.isfinite(c) else -1.0


def choose_layout(
    export: Callable[[list[int], str], PrefixKV],
    reference: PrefixKV,
    prompt: list[int],
    layouts: Sequence[str] = LAYOUTS,
) -> tuple[str, dict[str, float]]:
    """The block layout under which TensorRT-LLM's KV of ``prompt`` matches ``reference``
    (the torch engine's), and the cosine of each candidate.

    Why at start-up: a wrong layout is not an error, it is garbage KV and wrong answers. The
    prefill instance has the torch engine loaded anyway, so it proves the layout once on a
    probe prompt before serving; none matching raises.
    """
    scores = {layout: kv_cosine(reference.kv, export(prompt, layout).kv) for layout in layouts}
    best = max(scores, key=lambda k: scores[k])
    if scores[best] < MIN_KV_COSINE:
        raise RuntimeError(
            f"TensorRT-LLM's prompt KV matches the torch prefill under no block layout "
            f"(cosine by layout: {scores}; needed >= {MIN_KV_COSINE})"
        )
    return best, scores


def plain_prompt(prefix: Any) -> list[int] | None:
    """The token ids of a plain prompt (ids or ``Prefix.prompt``); None for a grid prefix."""
    if isinstance(prefix, Prefix):
        return list(prefix.tokens) if prefix == Prefix.prompt(prefix.tokens) else None
    return [int(t) for t in prefix]


def attach(engine: Any, params: dict[str, str], model_dir: str | Path, device: str) -> str:
    """Routes ``engine.prefill_export`` of plain prompts to TensorRT-LLM when selected.

    Returns the backend in use. ``auto`` that fails to start TensorRT-LLM logs why and keeps
    the torch engine; an explicit ``trtllm`` raises, so the instance does not start.
    """
    setting = params.get("prefill_backend", "auto") or "auto"
    backend, reason = select_backend(
        setting, device=device, channel_embedding=engine.model.channel_embedding is not None
    )
    if backend == "torch":
        print(f"[prefill] backend torch ({reason})", flush=True)
        return "torch"
    layout_setting = params.get("trtllm_kv_layout", "auto") or "auto"
    if layout_setting != "auto" and layout_setting not in LAYOUTS:
        raise ValueError(f"trtllm_kv_layout must be auto or one of {LAYOUTS}, got {layout_setting!r}")
    original = engine.prefill_export
    adapter = None
    try:
        adapter = TrtllmPrefill(
            model_dir,
            max_context=engine.config.max_context,
            kv_fraction=float(params.get("trtllm_kv_fraction", "0.2") or 0.2),
        )
        probe = [2 + i % (adapter.vocab_size - 2) for i in range(40)]  # more than one block
        layout, scores = choose_layout(
            adapter.export_with_layout,
            original(probe),
            probe,
            LAYOUTS if layout_setting == "auto" else (layout_setting,),
        )
        SINK.layout = layout
    except Exception as exc:
        if adapter is not None:
            adapter.shutdown()
        if setting == "trtllm":
            raise
        print(f"[prefill] backend torch (auto: TensorRT-LLM not usable: {exc!r})", flush=True)
        return "torch"

    def prefill_export(prefix: Any, *args: Any, **kwargs: Any) -> PrefixKV:
        ids = plain_prompt(prefix)
        if ids is None or args or any(v is not None for k, v in kwargs.items() if k != "timeout"):
            return original(prefix, *args, **kwargs)
        return adapter.prefill_export(ids)

    engine.prefill_export = prefill_export
    engine.trtllm_prefill = adapter
    print(f"[prefill] backend trtllm ({reason}; block layout {layout}, KV cosine {scores})", flush=True)
    return "trtllm"


__all__ = [
    "SINK",
    "TRTLLM_VERSION",
    "Capture",
    "PromptSink",
    "TrtllmPrefill",
    "attach",
    "choose_layout",
    "gather_prompt_kv",
    "kv_cosine",
    "plain_prompt",
    "select_backend",
    "trtllm_available",
]
