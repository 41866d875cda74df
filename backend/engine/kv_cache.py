"""A preallocated KV pool: one fixed slot per live session, nothing copied as it grows.

Why slots rather than paged blocks: on CPU (and for a 135M model on GPU) attention is a
small share of a step, and a slot keeps each session's keys contiguous so that
``scaled_dot_product_attention`` reads them in place. Memory is reserved once at start
(``max_sessions x max_context`` tokens), so a full server never allocates mid-request
and can tell a new session "busy" instead of running out of memory. A session that ends
or is cancelled hands its slot back at once.

Alongside keys and values, each cached token records its grid coordinates (row and
channel) and its token id: the attention mask of a step is derived from them, which is what
makes the per-stream policies (``cross`` / ``isolated``) a matter of a small visibility
matrix, and lets the paper's ``skip_silence`` hide silence keys. The pool writes this
metadata itself when positions are reserved, so no caller can forget it.
"""

from __future__ import annotations

import heapq
import threading
from dataclasses import dataclass

import numpy as np
import torch

from backend.engine.errors import CacheFullError, ContextLengthError


def _lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Zeros whose pages the OS maps only when first written (CPU).

    ``torch.zeros`` writes every byte, so a pool sized for 32 sessions x 2048 tokens costs
    its full size in RSS at start-up in every model instance (1.5 GB each for the default
    model, enough to get stubs OOM-killed on a 24 GB machine running a few servers).
    NumPy's zeros come from calloc: untouched pages stay virtual, and still read as 0, so
    masked-out keys are never garbage.
    """
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    np_dtype = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
    return torch.from_numpy(np.zeros(shape, dtype=np_dtype)).view(dtype)


@dataclass
class KVStats:
    slots_total: int
    slots_used: int
    tokens_capacity: int
    tokens_used: int
    bytes_reserved: int


class KVPool:
    """Per-layer key/value tensors ``[slots, kv_heads, max_context, head_dim]`` and token metadata."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_sessions: int,
        max_context: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.max_sessions = max_sessions
        self.max_context = max_context
        shape = (max_sessions, num_kv_heads, max_context, head_dim)
        self.k = [_lazy_zeros(shape, dtype, device) for _ in range(num_layers)]
        self.v = [_lazy_zeros(shape, dtype, device) for _ in range(num_layers)]
        # Grid coordinates of every cached token, read to build each step's mask. They stay
        # on the CPU whatever the device: the mask is built there and sent once per step.
        self.rows = torch.zeros((max_sessions, max_context), dtype=torch.int32)
        self.chans = torch.zeros((max_sessions, max_context), dtype=torch.int64)
        self.toks = torch.zeros((max_sessions, max_context), dtype=torch.int64)
        self.lengths = [0] * max_sessions
        # Lowest free slot first: live sessions stay packed at the front of the pool, so a
        # step's slots are usually one contiguous range that attention reads as a view.
        self._free = list(range(max_sessions))
        self._lock = threading.Lock()
        self._bytes = 2 * num_layers * self.k[0].numel() * self.k[0].element_size()

    def allocate(self) -> int:
        with self._lock:
            if not self._free:
                raise CacheFullError(
                    f"all {self.max_sessions} KV slots are in use (max_sessions={self.max_sessions})"
                )
            slot = heapq.heappop(self._free)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            if slot in self._free:
                return
            self.lengths[slot] = 0
            heapq.heappush(self._free, slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def reserve(self, slot: int, rows: list[int], chans: list[int], toks: list[int]) -> int:
        """Claims ``len(rows)`` new positions in ``slot`` for tokens at those grid
        coordinates; returns the first index. ``ContextLengthError`` if they do not fit."""
        count = len(rows)
        start = self.lengths[slot]
        if start + count > self.max_context:
            raise ContextLengthError(
                f"session needs {start + count} cache positions, the context limit is {self.max_context}"
            )
        self.lengths[slot] = start + count
        end = start + count
        self.rows[slot, start:end] = torch.tensor(rows, dtype=torch.int32)
        self.chans[slot, start:end] = torch.tensor(chans, dtype=torch.int64)
        self.toks[slot, start:end] = torch.tensor(toks, dtype=torch.int64)
        return start

    def import_prefix(
        self, slot: int, kv: torch.Tensor, rows: list[int], chans: list[int], toks: list[int]
    ) -> None:
        """Copies an exported prefix ``[layers, 2, kv_heads, P, head_dim]`` into an empty slot."""
        p = kv.shape[3]
        if len(rows) != p:
            raise ValueError(f"prefix KV covers {p} tokens, its grid coordinates {len(rows)}")
        start = self.reserve(slot, rows, chans, toks)
        for li in range(len(self.k)):
            self.k[li][slot, :, start : start + p] = kv[li, 0].to(self.k[li].dtype)
            self.v[li][slot, :, start : start + p] = kv[li, 1].to(self.v[li].dtype)

    def export_prefix(self, slot: int, length: int | None = None) -> torch.Tensor:
        """The first ``length`` cached tokens of a slot as ``[layers, 2, kv_heads, P, head_dim]``."""
        n = self.lengths[slot] if length is None else length
        return torch.stack(
            [torch.stack([self.k[li][slot, :, :n], self.v[li][slot, :, :n]]) for li in range(len(self.k))]
        )

    def stats(self) -> KVStats:
        used = self.max_sessions - len(self._free)
        return KVStats(
            slots_total=self.max_sessions,
            slots_used=used,
            tokens_capacity=self.max_sessions * self.max_context,
            tokens_used=sum(self.lengths),
            bytes_reserved=self._bytes,
        )
