"""Paged KV memory with prefix caching, mirroring vLLM V1's ``BlockPool`` and ``KVCacheManager``.

Names follow vLLM (``vllm/v1/core/block_pool.py``, ``kv_cache_manager.py``):

- The **block pool** owns ``num_gpu_blocks`` blocks. Block 0 is the *null block* and is never
  handed out (vLLM reserves it too), so ``num_gpu_blocks - 1`` blocks hold KV.
- The **free block queue** is a doubly linked list (arrays here, no per-block objects).
  Allocation pops from the front. A finished request frees its blocks *tail first*; freed blocks
  that carry a hash go to the back (they stay cached: LRU with the deepest block of a chain
  evicted first), blocks without a hash go to the front (reused first).
- **Cached blocks** are simply free-or-used blocks that carry a block hash and are registered in
  the hash map. Popping a cached free block for a new allocation evicts its hash. A prefix hit on
  a free cached block ``touch``-es it: ``ref_cnt += 1`` and it leaves the free queue, so it counts
  against free capacity at admission.
- **Usage** (``vllm:kv_cache_usage_perc``) is ``1 - free / (num_gpu_blocks - 1)``; cached-but-free
  blocks count as free.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_NIL = -1


class FreeBlockQueue:
    """Doubly linked list of free block ids with O(1) popleft, append, appendleft and remove."""

    __slots__ = ("prev", "next", "head", "tail", "size", "in_queue")

    def __init__(self, num_blocks: int, initial: Sequence[int]):
        self.prev = np.full(num_blocks, _NIL, dtype=np.int64).tolist()
        self.next = np.full(num_blocks, _NIL, dtype=np.int64).tolist()
        self.in_queue = [False] * num_blocks
        self.head = _NIL
        self.tail = _NIL
        self.size = 0
        for b in initial:
            self.append(b)

    def popleft(self) -> int:
        b = self.head
        if b == _NIL:
            raise IndexError("free block queue is empty")
        self.remove(b)
        return b

    def remove(self, b: int) -> None:
        p, n = self.prev[b], self.next[b]
        if p != _NIL:
            self.next[p] = n
        else:
            self.head = n
        if n != _NIL:
            self.prev[n] = p
        else:
            self.tail = p
        self.prev[b] = self.next[b] = _NIL
        self.in_queue[b] = False
        self.size -= 1

    def append(self, b: int) -> None:
        self.prev[b] = self.tail
        self.next[b] = _NIL
        if self.tail != _NIL:
            self.next[self.tail] = b
        else:
            self.head = b
        self.tail = b
        self.in_queue[b] = True
        self.size += 1

    def appendleft(self, b: int) -> None:
        self.next[b] = self.head
        self.prev[b] = _NIL
        if self.head != _NIL:
            self.prev[self.head] = b
        else:
            self.tail = b
        self.head = b
        self.in_queue[b] = True
        self.size += 1

    def __len__(self) -> int:
        return self.size

    def to_list(self) -> list[int]:
        out, b = [], self.head
        while b != _NIL:
            out.append(b)
            b = self.next[b]
        return out


class BlockPool:
    """All KV blocks of one replica: ref counts, block hashes, free queue and the hash map."""

    def __init__(self, num_gpu_blocks: int, enable_caching: bool = True):
        if num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be >= 2 (block 0 is the null block)")
        self.num_gpu_blocks = num_gpu_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_gpu_blocks
        self.block_hash: list[int | None] = [None] * num_gpu_blocks
        # hash -> block id, or -> dict of block ids when several blocks hold the same content
        # (two requests that both missed and computed the same prefix concurrently), as vLLM keeps.
        self.cached: dict[int, int | dict[int, None]] = {}
        self.free_queue = FreeBlockQueue(num_gpu_blocks, range(num_gpu_blocks))
        self.null_block = self.free_queue.popleft()  # block 0, never used for KV
        self.ref_cnt[self.null_block] = 1
        self.evictions = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.size

    def usage(self) -> float:
        return 1.0 - self.free_queue.size / (self.num_gpu_blocks - 1)

    def get_cached_block(self, h: int) -> int | None:
        v = self.cached.get(h)
        if v is None:
            return None
        if isinstance(v, int):
            return v
        return next(iter(v))

    # -- allocation ------------------------------------------------------------------------
    def get_new_blocks(self, n: int) -> list[int]:
        if n > self.free_queue.size:
            raise ValueError(f"cannot allocate {n} blocks, only {self.free_queue.size} free")
        out = []
        fq = self.free_queue
        for _ in range(n):
            b = fq.popleft()
            if self.block_hash[b] is not None:
                self._evict(b)
            self.ref_cnt[b] = 1
            out.append(b)
        return out

    def _evict(self, b: int) -> None:
        h = self.block_hash[b]
        v = self.cached.get(h)
        if isinstance(v, dict):
            v.pop(b, None)
            if len(v) == 1:
                self.cached[h] = next(iter(v))
            elif not v:
                del self.cached[h]
        elif v == b:
            del self.cached[h]
        self.block_hash[b] = None
        self.evictions += 1

    def touch(self, blocks: Sequence[int]) -> None:
        """A prefix hit takes blocks: free cached ones leave the free queue."""
        fq = self.free_queue
        for b in blocks:
            if self.ref_cnt[b] == 0:
                fq.remove(b)
            self.ref_cnt[b] += 1

    def cache_block(self, b: int, h: int) -> None:
        """Register a full block's hash (done when the block is scheduled full, as vLLM does)."""
        self.block_hash[b] = h
        v = self.cached.get(h)
        if v is None:
            self.cached[h] = b
        elif isinstance(v, int):
            if v != b:
                self.cached[h] = {v: None, b: None}
        else:
            v[b] = None

    def free_blocks(self, ordered_blocks: Sequence[int]) -> None:
        """Release blocks given in eviction order (callers pass a request's blocks tail first)."""
        fq = self.free_queue
        for b in ordered_blocks:
            self.ref_cnt[b] -= 1
            if self.ref_cnt[b] == 0:
                if self.block_hash[b] is not None:
                    fq.append(b)  # stays cached; LRU from the front
                else:
                    fq.appendleft(b)  # nothing worth keeping: reuse first

    def reset_prefix_cache(self) -> None:
        for h in list(self.cached):
            v = self.cached[h]
            for b in ([v] if isinstance(v, int) else list(v)):
                self.block_hash[b] = None
        self.cached.clear()

    # -- invariants (used by tests) --------------------------------------------------------
    def check_invariants(self) -> None:
        free = self.free_queue.to_list()
        assert len(free) == self.free_queue.size, "free queue size mismatch"
        assert len(set(free)) == len(free), "block twice in free queue"
        assert self.null_block not in free, "null block in free queue"
        for b in range(self.num_gpu_blocks):
            in_q = self.free_queue.in_queue[b]
            assert self.ref_cnt[b] >= 0, f"negative ref count on block {b}"
            assert in_q == (self.ref_cnt[b] == 0), f"block {b}: ref_cnt {self.ref_cnt[b]} but in_queue={in_q}"
        for h, v in self.cached.items():
            for b in ([v] if isinstance(v, int) else v):
                assert self.block_hash[b] == h, f"hash map points to block {b} without that hash"


class KVCacheManager:
    """Per-request block tables on top of a :class:`BlockPool` (vLLM's ``KVCacheManager``).

    A request (any object with the attributes used below, see :class:`sim.engine.EngineRequest`)
    holds ``blocks`` (its block table), ``block_hashes`` (precomputed hashes of its full prompt
    blocks), ``num_cached_blocks`` (how many of its blocks are registered in the hash map) and
    ``hash_key`` (a per-request key for hashing blocks beyond the precomputed ones).
    """

    def __init__(self, num_gpu_blocks: int, block_size: int, enable_caching: bool = True,
                 watermark: float = 0.0):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_gpu_blocks, enable_caching)
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        # Prefix-cache stats in tokens (vllm:prefix_cache_queries / _hits).
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.free_queue.size

    def usage(self) -> float:
        return self.pool.usage()

    def get_computed_blocks(self, req) -> tuple[list[int], int]:
        """Longest prefix hit: leading prompt blocks found in the cache.

        Capped so at least the last prompt token is recomputed (its logits are needed), as
        ``KVCacheManager.get_computed_blocks`` does with ``max_cache_hit_length = num_tokens - 1``.
        """
        if not self.enable_caching:
            return [], 0
        hashes = req.block_hashes
        max_blocks = (req.num_tokens - 1) // self.block_size
        out: list[int] = []
        get = self.pool.get_cached_block
        for i in range(min(max_blocks, len(hashes))):
            b = get(hashes[i])
            if b is None:
                break
            out.append(b)
        return out, len(out) * self.block_size

    def cached_prefix_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading hashes are in the cache now (for 'precise' prefix routing)."""
        if not self.enable_caching:
            return 0
        n = 0
        cached = self.pool.cached
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def allocate_slots(self, req, num_new_tokens: int, new_computed_blocks: Sequence[int] = (),
                       apply_watermark: bool = False) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req``; False if blocks ran out.

        ``new_computed_blocks`` are prefix-cache hits being attached at admission. Hits on free
        cached blocks leave the free queue, so they count against free capacity.
        """
        pool = self.pool
        bs = self.block_size
        num_computed = req.num_computed_tokens + len(new_computed_blocks) * bs
        num_required = -(-(num_computed + num_new_tokens) // bs)
        num_new = num_required - len(req.blocks) - len(new_computed_blocks)
        num_evictable_hits = 0
        rc = pool.ref_cnt
        for b in new_computed_blocks:
            if rc[b] == 0:
                num_evictable_hits += 1
        need = max(num_new, 0) + num_evictable_hits
        free = pool.free_queue.size
        if apply_watermark:
            free -= self.watermark_blocks
        if need > free:
            return False
        if new_computed_blocks:
            pool.touch(new_computed_blocks)
            req.blocks.extend(new_computed_blocks)
            req.num_cached_blocks = len(req.blocks)
        if num_new > 0:
            req.blocks.extend(pool.get_new_blocks(num_new))
        if self.enable_caching:
            self._cache_full_blocks(req, num_computed + num_new_tokens)
        return True

    def _cache_full_blocks(self, req, num_tokens: int) -> None:
        """Register hashes of blocks that are full once ``num_tokens`` tokens are computed."""
        num_full = num_tokens // self.block_size
        i = req.num_cached_blocks
        if num_full <= i:
            return
        hashes = req.block_hashes
        pool = self.pool
        blocks = req.blocks
        while i < num_full:
            if i >= len(hashes):
                req.extend_block_hashes(i + 1)
                hashes = req.block_hashes
            pool.cache_block(blocks[i], hashes[i])
            i += 1
        req.num_cached_blocks = num_full

    def free(self, req) -> None:
        """Release a request's blocks, tail first (deepest block of the chain evicted first)."""
        blocks = req.blocks
        if blocks:
            self.pool.free_blocks(reversed(blocks))
        req.blocks = []
        req.num_cached_blocks = 0

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens
