"""CUDA graphs of the engine's step at fixed batch buckets, with an eager fallback.

Why: a 135M-1B model's decode step on a GPU is bound by kernel launches, not by the GPU
(30 layers x ~15 kernels, each a few microseconds of Python and driver work, against
microseconds of math). vLLM, SGLang and gpt-fast capture the step once per batch size
and replay it: one launch per step. This module does the same *around* the model's
forward (``backend.models.llama.LlamaModel.forward``), which stays as it is:

- A step's packed batch (``PackedBatch``) is padded to a bucket ``(sessions, queries per
  session, keys)``: every session gets exactly ``queries`` token slots, so the padded batch
  is a rectangle, and attention reads ``keys`` cache positions (the rest masked). Each
  bucket owns fixed-address input buffers; a step copies its tensors into them and
  replays the bucket's graph. Logits agree with eager to rounding (the padded matmuls may
  pick other cuBLAS kernels); whether greedy tokens stay identical on a GPU is what
  ``python -m bench.gpu_check`` reports (on CPU the padded batch is checked against eager).
- Padding is neutral by construction. Padding tokens write their K/V to the last cache
  position of a slot that has no token in the step (a KV position beyond a session's
  length is masked until that session writes it itself, in the step that reads it), and
  their queries see key 0 only, so their softmax stays finite; their logits are dropped.
- Anything the buckets do not cover (long prefill chunks, int4 CPU weights, a step that
  uses every slot and needs padding) runs eagerly, unchanged.

The padding logic is the part that can be wrong, so it is shared by both modes:
``CudaGraphRunner(..., capture=False)`` runs the padded batch eagerly, which is how the
CPU test suite checks it against the unpadded forward (tests/test_gpu_check.py).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from backend.models.inputs import PackedBatch

#: Sessions per step the graphs cover (padded up to the next one; at least 2: with one
#: session the forward slices its slot by a Python int, which a graph would freeze).
SESSION_BUCKETS = (2, 4, 8, 16, 32, 48, 64, 96, 128)
#: Tokens per session per step: 1 for single-stream decode, C for a C-stream row.
QUERY_BUCKETS = (1, 2, 4, 8, 16)
#: Smallest key bucket; the others double up to the pool's ``max_context``.
MIN_KEY_BUCKET = 256
#: Graphs kept at most (lazily captured); beyond it steps run eagerly.
MAX_GRAPHS = 64

Forward = Callable[[PackedBatch, list[torch.Tensor], list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class Bucket:
    """The padded shape of a step: ``sessions`` x ``queries`` tokens, ``keys`` cache positions."""

    sessions: int
    queries: int
    keys: int

    @property
    def tokens(self) -> int:
        return self.sessions * self.queries


def key_buckets(max_context: int, smallest: int = MIN_KEY_BUCKET) -> tuple[int, ...]:
    """Doubling key lengths from ``smallest``, the last one exactly ``max_context``."""
    out = []
    k = min(smallest, max_context)
    while k < max_context:
        out.append(k)
        k *= 2
    out.append(max_context)
    return tuple(out)


def _round_up(value: int, buckets: Sequence[int]) -> int | None:
    i = bisect.bisect_left(buckets, value)
    return buckets[i] if i < len(buckets) else None


def choose_bucket(
    sessions: int,
    queries: int,
    keys: int,
    *,
    session_buckets: Sequence[int] = SESSION_BUCKETS,
    query_buckets: Sequence[int] = QUERY_BUCKETS,
    key_bucket_list: Sequence[int],
) -> Bucket | None:
    """The smallest bucket holding the step, or None when the step is too large for any."""
    b = _round_up(max(sessions, 2), session_buckets)
    q = _round_up(queries, query_buckets)
    k = _round_up(keys, key_bucket_list)
    if b is None or q is None or k is None:
        return None
    return Bucket(b, q, k)


class _KnownMax(torch.Tensor):
    """Positions whose ``max()`` is answered on the host.

    The forward sizes its RoPE cache with ``int(batch.positions.max())``, a device-to-host
    copy, which CUDA forbids while a stream is being captured. Every position of a bucket is
    below ``max_context``, whose RoPE rows exist before capture, so the answer is known.
    """

    __torch_function__ = torch._C._disabled_torch_function_impl  # plain tensors out of every op
    known_max: int

    def max(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if args or kwargs:
            return torch.Tensor.max(self.as_subclass(torch.Tensor), *args, **kwargs)
        return torch.tensor(self.known_max)


class StaticBatch:
    """Fixed-address input buffers of one bucket and the padded ``PackedBatch`` over them."""

    def __init__(self, bucket: Bucket, device: torch.device, max_context: int, channel_embedding: bool):
        n = bucket.tokens
        self.bucket = bucket
        self.max_context = max_context
        long = {"dtype": torch.long, "device": device}
        self.tokens = torch.zeros(n, **long)
        self.positions = torch.zeros(n, **long)
        self.channels = torch.zeros(n, **long) if channel_embedding else None
        self.slot = torch.zeros(n, **long)
        self.cache_index = torch.zeros(n, **long)
        self.slots = torch.zeros(bucket.sessions, **long)
        self.pad_index = torch.arange(n, **long)
        self.logit_index = torch.arange(n, **long)
        self.valid = torch.zeros(n, dtype=torch.bool, device=device)
        self.mask = torch.zeros(
            bucket.sessions, 1, bucket.queries, bucket.keys, dtype=torch.bool, device=device
        )

    def fill(self, batch: PackedBatch, pad_slot: int) -> torch.Tensor:
        """Copies ``batch`` into the buffers; returns, for each logit ``batch`` asks for, its
        row in the padded output. Device work only (no host sync)."""
        b = self.bucket
        mq = batch.max_q
        real = batch.num_sessions
        # Packed token i sits at pad_index[i] = session * max_q + j; in the bucket, at session * Q + j.
        dst = (batch.pad_index // mq) * b.queries + batch.pad_index % mq
        self.tokens.zero_().index_put_((dst,), batch.tokens)
        self.positions.zero_().index_put_((dst,), batch.positions.to(torch.long))
        if self.channels is not None:
            self.channels.zero_()
            if batch.channel_embed_ids is not None:
                self.channels.index_put_((dst,), batch.channel_embed_ids)
        self.slot.fill_(pad_slot).index_put_((dst,), batch.slot)
        self.cache_index.fill_(self.max_context - 1).index_put_((dst,), batch.cache_index)
        self.slots.fill_(pad_slot)
        self.slots[:real].copy_(batch.slots_tensor)
        self.mask.zero_()
        self.mask[:real, :, :mq, : batch.key_len].copy_(batch.mask)
        self.valid.zero_().index_put_((dst,), torch.ones_like(dst, dtype=torch.bool))
        self.mask[:, :, :, 0] |= ~self.valid.view(b.sessions, 1, b.queries)
        return dst[batch.logit_index]

    def packed(self, for_capture: bool) -> PackedBatch:
        """The padded batch. ``slot_list`` is deliberately not a run of slot numbers: the
        forward then gathers keys through ``slots_tensor`` (a buffer) instead of slicing a
        Python range, which a graph would freeze to the slots of its first step."""
        positions = self.positions
        if for_capture:
            positions = positions.as_subclass(_KnownMax)
            positions.known_max = self.max_context - 1
        return PackedBatch(
            tokens=self.tokens,
            positions=positions,
            channel_embed_ids=self.channels,
            slot=self.slot,
            cache_index=self.cache_index,
            slot_list=[-1] * self.bucket.sessions,
            slots_tensor=self.slots,
            pad_index=self.pad_index,
            max_q=self.bucket.queries,
            key_len=self.bucket.keys,
            mask=self.mask,
            logit_index=self.logit_index,
            split=None,
        )


@dataclass
class GraphStats:
    """What the runner did, for ``Engine.stats``-style reporting and the device check."""

    replays: int = 0
    eager_steps: int = 0
    captures: int = 0
    capture_s: float = 0.0
    #: Why steps fell back to eager: reason -> count.
    fallbacks: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "replays": self.replays,
            "eager_steps": self.eager_steps,
            "captures": self.captures,
            "capture_s": round(self.capture_s, 3),
            "fallbacks": dict(self.fallbacks or {}),
        }


class CudaGraphRunner:
    """A drop-in for ``model.forward`` that replays a captured graph per bucket.

    ``capture=False`` runs the padded batch eagerly instead (same buffers, same padding):
    the CPU-testable twin of the graph path.
    """

    def __init__(
        self,
        forward: Forward,
        kv_k: list[torch.Tensor],
        kv_v: list[torch.Tensor],
        *,
        device: torch.device,
        channel_embedding: bool,
        capture: bool = True,
        session_buckets: Sequence[int] = SESSION_BUCKETS,
        query_buckets: Sequence[int] = QUERY_BUCKETS,
        max_graphs: int = MAX_GRAPHS,
        prepare: Callable[[int], None] | None = None,
    ):
        self.forward = forward
        self.kv_k, self.kv_v = kv_k, kv_v
        self.device = torch.device(device)
        self.capture = capture
        self.num_slots = kv_k[0].shape[0]
        self.max_context = kv_k[0].shape[2]
        self.channel_embedding = channel_embedding
        # Up to the pool's size, which is itself the last bucket (a full pool needs no padding).
        self.session_buckets = tuple(b for b in session_buckets if b < self.num_slots) + (self.num_slots,)
        self.query_buckets = tuple(query_buckets)
        self.key_buckets = key_buckets(self.max_context)
        self.max_graphs = max_graphs
        self.stats = GraphStats(fallbacks={})
        #: Set when a capture failed (the reason): graphs are off for good in this process,
        #: because a failed capture can leave the allocator's graph pool in an unknown state.
        self.broken: str | None = None
        self._static: dict[Bucket, StaticBatch] = {}
        self._graphs: dict[Bucket, tuple[Any, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        if prepare is not None:
            prepare(self.max_context)  # e.g. the model's RoPE rows for every position

    # ------------------------------------------------------------------ selection
    def bucket_for(self, batch: PackedBatch) -> tuple[Bucket | None, str]:
        """The bucket a step runs in, or None and the reason it runs eagerly."""
        if batch.split is not None:
            return None, "int4 split"
        bucket = choose_bucket(
            batch.num_sessions,
            batch.max_q,
            batch.key_len,
            session_buckets=self.session_buckets,
            query_buckets=self.query_buckets,
            key_bucket_list=self.key_buckets,
        )
        if bucket is None:
            return None, "larger than every bucket"
        if bucket not in self._graphs and len(self._graphs) >= self.max_graphs and self.capture:
            return None, "graph cap reached"
        return bucket, ""

    def pad_slot(self, batch: PackedBatch) -> int | None:
        """A slot with no token in this step (padding writes there), or None."""
        used = set(batch.slot_list)
        for s in range(self.num_slots - 1, -1, -1):
            if s not in used:
                return s
        return None

    # ------------------------------------------------------------------ running
    def __call__(
        self, batch: PackedBatch, kv_k: list[torch.Tensor], kv_v: list[torch.Tensor]
    ) -> torch.Tensor:
        if self.broken:
            self._fallback("capture failed")
            return self.forward(batch, kv_k, kv_v)
        bucket, reason = self.bucket_for(batch)
        pad = self.pad_slot(batch) if bucket is not None else None
        if bucket is not None and pad is None and bucket.tokens != batch.tokens.shape[0]:
            bucket, reason = None, "padding needs a free slot"
        if bucket is not None and kv_k[0] is not self.kv_k[0]:
            bucket, reason = None, "another KV pool than the one captured"
        if bucket is None:
            self._fallback(reason)
            return self.forward(batch, kv_k, kv_v)
        static = self._static.get(bucket)
        if static is None:
            static = self._static[bucket] = StaticBatch(
                bucket, self.device, self.max_context, self.channel_embedding
            )
        rows = static.fill(batch, pad if pad is not None else self.num_slots - 1)
        if not self.capture:
            self.stats.replays += 1
            return self.forward(static.packed(for_capture=False), self.kv_k, self.kv_v)[rows]
        graph = self._graphs.get(bucket)
        if graph is None:
            try:
                graph = self._capture(bucket, static)
            except Exception as exc:  # noqa: BLE001 - a step must not fail because a capture did
                self.broken = f"capture of {bucket} failed: {type(exc).__name__}: {exc}"
                print(f"[cuda_graphs] {self.broken}; every step runs eagerly from now on", flush=True)
                self._fallback("capture failed")
                return self.forward(batch, kv_k, kv_v)
        graph[0].replay()
        self.stats.replays += 1
        return graph[1][rows]

    def _fallback(self, reason: str) -> None:
        self.stats.eager_steps += 1
        assert self.stats.fallbacks is not None
        self.stats.fallbacks[reason] = self.stats.fallbacks.get(reason, 0) + 1

    def _capture(self, bucket: Bucket, static: StaticBatch) -> tuple[Any, torch.Tensor]:
        """Warm up on a side stream (cuBLAS / SDPA workspaces), then capture one replayable step.

        The buffers already hold the step that asked for this bucket; capturing runs the
        forward on them once more, and its KV writes are the same values at the same
        positions, so the step's state is unchanged.
        """
        t0 = time.perf_counter()
        packed = static.packed(for_capture=True)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.forward(static.packed(for_capture=False), self.kv_k, self.kv_v)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self.forward(packed, self.kv_k, self.kv_v)
        self._graphs[bucket] = (graph, out)
        self.stats.captures += 1
        self.stats.capture_s += time.perf_counter() - t0
        return self._graphs[bucket]

    @property
    def graphs(self) -> list[Bucket]:
        return sorted(self._graphs, key=lambda b: (b.sessions, b.queries, b.keys))


def graphs_wanted(setting: str, device: str | torch.device) -> bool:
    """``auto`` / ``on`` / ``off`` (the ``cuda_graphs`` model parameter) on this device.

    ``auto`` means on for CUDA, off elsewhere; ``on`` without CUDA is an error rather than a
    silent eager run, so a deployment that asked for graphs knows it did not get them.
    """
    setting = (setting or "auto").lower()
    cuda = torch.device(device).type == "cuda"
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"cuda_graphs must be auto, on or off, got {setting!r}")
    if setting == "on" and not cuda:
        raise ValueError(f"cuda_graphs=on needs a CUDA device, the engine runs on {device}")
    return cuda and setting != "off"


def install(engine: Any, *, capture: bool = True, **kwargs: Any) -> CudaGraphRunner:
    """Routes ``engine``'s forwards through a :class:`CudaGraphRunner`; returns it.

    Wraps ``engine.model.forward`` the way ``backend.serving.instance.use_own_cuda_stream``
    does, so the engine and the model code stay unaware of graphs.
    """
    model = engine.model
    ensure_rope = getattr(model, "_ensure_rope", None)
    runner = CudaGraphRunner(
        model.forward,
        engine.pool.k,
        engine.pool.v,
        device=model.device,
        channel_embedding=model.channel_embedding is not None,
        capture=capture,
        prepare=ensure_rope,
        **kwargs,
    )
    model.forward = runner  # type: ignore[method-assign]
    engine.cuda_graphs = runner
    return runner


__all__ = [
    "Bucket",
    "CudaGraphRunner",
    "StaticBatch",
    "choose_bucket",
    "graphs_wanted",
    "install",
    "key_buckets",
]
