"""How an engine is configured, and how ``auto`` settings resolve on the machine at hand."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from backend.kernels import native
from backend.kernels.quant import int4_supported

#: ``int4_rows_limit`` where the int4 kernel is faster than dense at every size.
NO_ROW_LIMIT = 1 << 30


def cpu_has_native_bf16() -> bool:
    """Whether torch's CPU bf16 matmuls run on bf16 instructions here (AVX512-BF16 or AMX)
    rather than emulated: on an AVX2 CPU a bf16 matmul of 128 rows is 4.4x slower than fp32."""
    flags = native.cpu_flags()
    has_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    return has_bf16 and torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def resolve_int4_prompts(setting: bool | None, kernel: str | None) -> bool:
    """``None`` (auto): prompts take the int4 weights wherever the decode rows take our int4
    kernel (``kernel`` is the model's ``int4_kernel``: ``bf16dp``, on a bf16 CPU model).

    Why everywhere it runs, measured on 2 cores: on an AVX2 EPYC a 512-token prompt took
    8.3–9.1 s dense (bf16 emulated) against 1.7 s int4 (llama-server: 3.3 s); on an AVX-512
    CPU all 30 layers' matmuls at 16 / 32 / 64 rows took 12.6 / 21.4 / 40.3 ms int4 against
    25.9 / 33.2 / 47.6 dense, and with prompts computed in decode's own steps (``prefill_at``
    ``decode``) a step of decode rows and prompt chunks stays the one fused C++ call:
    ``bench.compare`` gave 155.6 / 134.9 tok/s at 4 / 16 clients against 107.8 / 104.1 with
    dense prompts. Beyond about 100 rows dense would be faster per row (a long prompt's
    chunks), but then a prompt token's numerics would depend on the size of the step that
    computed it, and a prefix-cache hit would no longer answer as a recomputation does. The
    default model's 4-bit weights are its own (GGUF Q4_1): int4 prompts are also closer to
    its fp32 reference than bf16 ones (KL 0.0015 against 0.0024, tests/test_decode_step.py).
    """
    if setting is not None:
        return setting
    return kernel == "bf16dp"


def resolve_dtype(name: str, device: str = "cpu", quantization: str = "auto") -> torch.dtype:
    """``auto`` picks bf16 where the hardware has native bf16 math, or where the project's
    AVX2 kernels run the int4 model (``quantization`` not ``none``); else fp32.

    Measured on this project's 2-core AVX512-BF16 CPU: bf16 decode steps are ~1.6x faster
    than fp32 (weights are half the bytes and oneDNN has bf16 kernels). A CPU without
    bf16 support emulates it in torch (a bf16 matmul of 128 rows: 4.4x slower than fp32 on
    an AVX2 EPYC), hence the check. On such a CPU the AVX2 variant of our kernels
    (``backend.kernels.native``) computes in fp32 from int4 weights and bf16 activations and
    takes every matmul of an int4 model (``EngineConfig.int4_rows_limit``): 48 GMAC/s at 128
    rows against torch's fp32 18.5 on the same machine, so bf16 is the faster dtype there too.
    """
    if name in ("bf16", "bfloat16"):
        return torch.bfloat16
    if name in ("fp32", "float32"):
        return torch.float32
    if name in ("fp16", "float16"):
        return torch.float16
    if name != "auto":
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {name!r}")
    if device.startswith("cuda"):
        return torch.bfloat16
    if cpu_has_native_bf16():
        return torch.bfloat16
    if quantization != "none" and native.variant() == "avx2" and native.module() is not None:
        return torch.bfloat16
    return torch.float32


def resolve_kv_dtype(name: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """``auto``: fp32 on CPU, the model's dtype elsewhere.

    Why fp32 on CPU: attention runs in fp32 there (bf16 SDPA is several times slower for
    short queries), so a bf16 pool was converted whole, every layer of every step. That copy
    grows with the keys: one session with 4 streams spent 3.3 ms of a 31 ms step on it
    against 1.3 ms with one stream. Storing the keys in fp32 costs twice the KV memory
    (46 KB per token for SmolLM2-135M, paged in as used) and changes no number: a bf16
    value widens to fp32 exactly.
    """
    if name == "auto":
        return torch.float32 if device.type == "cpu" else model_dtype
    return resolve_dtype(name, str(device))


def resolve_quantization(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """``auto`` means int4 where its kernel exists for the model's device and dtype."""
    if name == "auto":
        return "int4" if int4_supported(device, dtype) else "none"
    return name


@dataclass
class EngineConfig:
    dtype: str = "auto"
    device: str = "cpu"
    #: ``int4``: decode rows use group-wise int4 weights (the default checkpoint ships as
    #: Q4_1, i.e. this very format); ``none``: dense; ``auto``: int4 where the kernel exists
    #: (CPU + bfloat16), dense otherwise.
    quantization: str = "auto"
    #: Steps with more decode tokens than this use the dense weights (faster at large M).
    #: An int4 kernel's cost grows with rows while a dense step stays memory-bound. All 30
    #: layers' matmuls of SmolLM2-135M, weights streamed from memory as in a real step
    #: (2 threads), in ms for 1 / 4 / 16 / 24 / 32 / 64 / 96 rows:
    #:   torch's int4 kernel  3.8 / 6.3 / 21.5 / 32.0 / 41.4 /   -  /   -
    #:   ours (bf16dp)        3.4 / 4.8 / 12.6 / 18.4 / 21.4 / 40.3 / 58.9
    #:   dense bf16          16.1 / 17.4 / 25.9 / 30.4 / 33.2 / 47.6 / 63.6
    #: None = by kernel: 96 with ours on AVX-512, no limit with ours on AVX2, 20 with torch's.
    #: (Timing one layer alone keeps its weights in cache and favours dense from ~8 rows: that
    #: misled an earlier default.)
    int4_max_rows: int | None = None
    #: Prompt tokens take the int4 weights too, in every step: a step of prompt chunks and
    #: decode rows then runs as the one C++ call of ``backend.kernels.decode_step`` instead of
    #: the torch forward with a dense/int4 split, and a prompt token computes the same in any
    #: step (``PackedSplit.from_flags``). llama.cpp computes prompts with its quantized weights as well.
    #: The price: a prompt's KV then carries the 4-bit rounding (agreement with the fp32
    #: model is tested, ``tests/test_decode_step.py``), and greedy answers at near-ties may
    #: differ from dense prompts'. ``None`` = auto (``resolve_int4_prompts``): on wherever the
    #: decode rows take our int4 kernel.
    int4_prompts: bool | None = None
    #: KV pool dtype: ``auto`` (fp32 on CPU, where attention runs in fp32; the model dtype
    #: elsewhere), or any dtype name ``resolve_dtype`` takes.
    kv_dtype: str = "auto"
    threads: int | None = None
    max_sessions: int = 16
    max_context: int = 2048
    #: Most tokens one step processes; decode rows always go first, prefill takes the rest.
    max_step_tokens: int = 256
    #: Most prompt tokens one session prefills in one step.
    prefill_chunk: int = 128
    #: Sessions waiting for a slot before ``submit`` says busy.
    max_queued: int = 64
    #: Token that fills a channel with nothing to say in ``cross`` mode (stream-trained
    #: checkpoints). None: idle channels are simply left out of the row.
    silence_token_id: int | None = None
    #: Prefix cache (``backend.engine.prefix_cache``): memory for the KV of recently computed
    #: prompt prefixes, reused by later sessions that start the same way; 0 turns it off.
    prefix_cache_mb: int = 128
    #: Tokens per cached block (only whole blocks are reused).
    prefix_cache_block: int = 16

    def int4_rows_limit(self, kernel: str | None) -> int:
        """``int4_max_rows``, or the measured crossover of the kernel in use."""
        if self.int4_max_rows is not None:
            return self.int4_max_rows
        if kernel != "bf16dp":
            return 20
        # AVX2: a dense bf16 matmul is emulated there (12x slower than our int4 kernel at 128
        # rows, ``resolve_dtype``), so int4 takes every step, prompts included.
        return 96 if native.variant() == "avx512" else NO_ROW_LIMIT
