"""Prefix caching: a prompt whose beginning was computed recently reuses that KV instead of
recomputing it, across requests and sessions, in bounded memory.

How: a prefix is cut into blocks of ``block`` tokens. Each full block is known by a digest
chained over everything its keys and values depend on: the digest of the block before it,
every token of the block with its grid coordinates (token id, row, channel, embedding row),
and the attention rules among prefix tokens (which channels of the prefix see which, and
the silence token ``skip_silence`` hides). Equal digests therefore mean equal KV, whatever
session, stream layout or request the blocks came from; a different system prompt, turn or
layout simply misses. When a session is admitted, its slot is filled with the longest
cached run of blocks and its prefill starts after them; when a session's prefill has
finished, its full blocks are copied into the cache. The prefix's last row is always
computed, since its logits start the streams.

Bounds and safety: the cache holds copies (never views of pool slots, which are reused), up
to ``capacity_bytes``, evicting least recently used blocks; a lookup refreshes a run's
blocks from last to first, so a run's tail goes before its head and what stays reachable
from the start is what is kept. The weights never change inside an engine, so no entry
ever goes stale; a new model means a new engine and an empty cache.

All tensor work of the cache is here; the scheduler only calls :meth:`PrefixCache.admit`
when it gives a session its slot. Everything runs on the engine thread.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from backend.engine.kv_cache import KVPool
from backend.engine.session import Session


@dataclass
class PrefixCacheStats:
    lookups: int = 0
    hits: int = 0  # lookups that reused at least one block
    lookup_tokens: int = 0  # prefix tokens asked for (cacheable part)
    hit_tokens: int = 0  # of which came from the cache
    inserted_blocks: int = 0
    evicted_blocks: int = 0
    blocks: int = 0
    bytes: int = 0
    capacity_bytes: int = 0


class PrefixCache:
    """Full blocks of prefix KV keyed by chained digests, LRU-evicted under a byte budget."""

    def __init__(self, pool: KVPool, capacity_bytes: int, block: int = 16):
        if block < 1:
            raise ValueError(f"prefix cache block must be >= 1 token, got {block}")
        self.pool = pool
        self.block = block
        self.capacity_bytes = capacity_bytes
        k = pool.k[0]
        self._block_bytes = 2 * len(pool.k) * k.shape[1] * block * k.shape[3] * k.element_size()
        #: digest -> KV of one block ``[layers, 2, kv_heads, block, head_dim]``, LRU order.
        self._blocks: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.stats = PrefixCacheStats(capacity_bytes=capacity_bytes)

    @property
    def enabled(self) -> bool:
        return self.capacity_bytes >= self._block_bytes

    # ------------------------------------------------------------------ keys
    def _digests(self, session: Session) -> list[bytes]:
        """One digest per full block the session may reuse (the last row is never among them)."""
        p = session.prefix
        usable = p.last_row[0] // self.block  # blocks entirely before the last row
        if usable == 0:
            return []
        chans = sorted(set(p.chans))
        vis = session.vis[chans][:, chans].to(torch.uint8).numpy().tobytes()
        skip = -1
        if session.rules is not None and session.rules.skip_silence:
            skip = int(session.rules.silence_id)
        context = repr((chans, skip)).encode() + vis
        coords = np.array([p.tokens, p.rows, p.chans, p.embeds], dtype=np.int64).T  # [n, 4]
        out, h = [], hashlib.blake2b(context, digest_size=16).digest()
        for b in range(usable):
            h = hashlib.blake2b(
                h + coords[b * self.block : (b + 1) * self.block].tobytes(), digest_size=16
            ).digest()
            out.append(h)
        return out

    # ------------------------------------------------------------------ lookup
    def admit(self, session: Session) -> int:
        """Fills a just-admitted session's slot with its longest cached prefix; returns the
        number of prefix tokens reused (its prefill starts there)."""
        if not self.enabled or session.imported or session.prefilled:
            return 0
        digests = self._digests(session)
        self.stats.lookups += 1
        self.stats.lookup_tokens += len(digests) * self.block
        run = []
        for d in digests:
            kv = self._blocks.get(d)
            if kv is None:
                break
            run.append((d, kv))
        if not run:
            return 0
        for d, _ in reversed(run):  # refresh tail first: the head ends most recent
            self._blocks.move_to_end(d)
        n = len(run) * self.block
        p = session.prefix
        start = self.pool.reserve(session.slot, list(p.rows[:n]), list(p.chans[:n]), list(p.tokens[:n]))
        kv = torch.cat([kv for _, kv in run], dim=3)  # [layers, 2, kvh, n, hd]
        for li in range(len(self.pool.k)):
            self.pool.k[li][session.slot, :, start : start + n] = kv[li, 0]
            self.pool.v[li][session.slot, :, start : start + n] = kv[li, 1]
        session.prefilled = n
        self.stats.hits += 1
        self.stats.hit_tokens += n
        return n

    # ------------------------------------------------------------------ insert
    def insert(self, session: Session) -> int:
        """Copies the full blocks of a session whose prefill just finished; returns how many
        were new. Called before anything else can write the slot (same engine step)."""
        if not self.enabled or session.imported or session.slot < 0:
            return 0
        digests = self._digests(session)  # hashing is microseconds against the copy below
        new = [i for i, d in enumerate(digests) if d not in self._blocks]
        if not new:
            return 0
        lo, hi = new[0] * self.block, (new[-1] + 1) * self.block
        kv = torch.stack(
            [
                torch.stack(
                    [self.pool.k[li][session.slot, :, lo:hi], self.pool.v[li][session.slot, :, lo:hi]]
                )
                for li in range(len(self.pool.k))
            ]
        )  # one copy of the new span: [layers, 2, kvh, hi - lo, hd]
        for i in reversed(new):  # the run's head is inserted last, so it is evicted last
            off = i * self.block - lo
            self._blocks[digests[i]] = kv[:, :, :, off : off + self.block].clone()
            self.stats.inserted_blocks += 1
        self._evict()
        return len(new)

    def _evict(self) -> None:
        while len(self._blocks) * self._block_bytes > self.capacity_bytes:
            self._blocks.popitem(last=False)
            self.stats.evicted_blocks += 1
        self.stats.blocks = len(self._blocks)
        self.stats.bytes = len(self._blocks) * self._block_bytes

    def clear(self) -> None:
        self._blocks.clear()
        self._evict()
