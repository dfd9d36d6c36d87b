"""Paged KV memory with prefix caching, mirroring vLLM V1's ``BlockPool`` and ``KVCacheManager``.

Names follow vLLM (``vllm/v1/core/block_pool.py``, ``kv_cache_manager.py``):

- The **block pool** owns ``num_gpu_blocks`` blocks. Block 0 is the *null block* and is never
  handed out (vLLM reserves it too), so ``num_gpu_blocks - 1`` blocks hold KV.
- The **free block queue** keeps free blocks in eviction order. Allocation pops from the front.
  A finished request frees its blocks *tail first*; freed blocks that carry a hash go to the back
  (they stay cached: LRU with the deepest block of a chain evicted first), blocks without a hash go
  to the front (reused first).
- **Cached blocks** are simply free-or-used blocks that carry a block hash and are registered in
  the hash map. Popping a cached free block for a new allocation evicts its hash. A prefix hit on
  a free cached block ``touch``-es it: ``ref_cnt += 1`` and it leaves the free queue, so it counts
  against free capacity at admission.
- **Usage** (``vllm:kv_cache_usage_perc``) is ``1 - free / (num_gpu_blocks - 1)``; cached-but-free
  blocks count as free.

Speed: a request allocates, registers and frees tens to hundreds of blocks at a time (a 1k-token
prompt is 64 blocks), so every pool operation works on a whole list of blocks and the common cases
(no shared blocks, no duplicate hashes) take one tight loop per list (CPython 3.11 runs a simple
``for`` loop over a list at ~15 ns per element, faster than ``map`` tricks or numpy fancy indexing
at these sizes), with a per-block fallback that is the reference semantics. The free queue is a
Python list with a moving head and lazy deletion instead of a linked list, so popping or appending
n blocks is a slice or an ``extend``. Blocks exclusive to one request (past its shared prefix) get
no per-block state at all: counters keep what vLLM observes exact (see :class:`BlockPool`).
"""

from __future__ import annotations

from typing import Callable, Sequence


class _UniqueHash:
    """Marks a full block whose hash is unique to its request (see :meth:`BlockPool.mark_unique`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNIQUE"


UNIQUE = _UniqueHash()


class FreeBlockQueue:
    """Free block ids in eviction order: O(1) per block popleft / append / appendleft / remove.

    Storage is a Python list ``_q`` whose live part starts at ``_head``, so popping or appending
    ``n`` blocks is a slice or an ``extend`` (no per-block Python work). ``remove(b)`` (a prefix hit
    taking a free block out of the middle) does not search: it leaves ``b``'s entry in place as a
    *dead* entry and counts it in ``_dead[b]``; pops skip it. A block's dead entries always come
    before its live one, since a removed block is held, keeps its hash, and so rejoins at the back
    (``appendleft`` of a block with dead entries compacts first, to keep that true).
    """

    __slots__ = ("_q", "_head", "_dead", "size", "_holes")
    _MARGIN = 1024  # free slots kept before the head for appendleft

    def __init__(self, num_blocks: int, initial: Sequence[int]):
        self._q: list[int] = list(initial)
        self._head = 0
        self._dead = [0] * num_blocks  # dead entries of each block still in _q[_head:]
        self.size = len(self._q)
        self._holes = 0  # total dead entries in _q[_head:]

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.size

    def iter_front(self):
        """Live block ids from the front (what successive pops would return), lazily."""
        q = self._q
        if not self._holes:
            for i in range(self._head, len(q)):
                yield q[i]
            return
        skip: dict[int, int] = {}
        dead = self._dead
        for i in range(self._head, len(q)):
            b = q[i]
            if dead[b] > skip.get(b, 0):
                skip[b] = skip.get(b, 0) + 1
            else:
                yield b

    def to_list(self) -> list[int]:
        return list(self.iter_front())

    def __contains__(self, b: int) -> bool:
        return b in set(self.iter_front())

    @property
    def in_queue(self) -> list[bool]:
        live = set(self.iter_front())
        return [b in live for b in range(len(self._dead))]

    # -- pops ------------------------------------------------------------------------------
    def popleft(self) -> int:
        if not self.size:
            raise IndexError("free block queue is empty")
        return self.pop_many(1)[0]

    def pop_many(self, n: int) -> list[int]:
        """The first ``n`` blocks, removed (what ``n`` successive ``popleft`` calls return)."""
        if n > self.size:
            raise IndexError(f"cannot pop {n} blocks, {self.size} free")
        h = self._head
        q = self._q
        if not self._holes:
            out = q[h:h + n]
            h += n
        else:
            dead = self._dead
            out = []
            while len(out) < n:
                b = q[h]
                h += 1
                if dead[b]:
                    dead[b] -= 1
                    self._holes -= 1
                else:
                    out.append(b)
        self._head = h
        self.size -= n
        if h > 4 * self._MARGIN and 2 * h > len(q):
            self._trim()
        return out

    def remove(self, b: int) -> None:
        """Take a block that is in the queue out of it (its entry stays, dead)."""
        self._dead[b] += 1
        self._holes += 1
        self.size -= 1
        if self._holes > 4096 and self._holes > self.size:
            self._compact()

    # -- pushes ----------------------------------------------------------------------------
    def append(self, b: int) -> None:
        self._q.append(b)
        self.size += 1

    def extend(self, blocks: Sequence[int]) -> None:
        """Append each block to the back, in order."""
        self._q.extend(blocks)
        self.size += len(blocks)

    def appendleft(self, b: int) -> None:
        self.extendleft([b])

    def extendleft(self, blocks: Sequence[int]) -> None:
        """``appendleft`` each block in order (the last one ends up at the front), like deque's."""
        self.prepend(blocks[::-1])

    def prepend(self, blocks: Sequence[int]) -> None:
        """Put ``blocks`` at the front, in this order (``extendleft`` of the reversed sequence)."""
        n = len(blocks)
        if self._holes:
            dead = self._dead
            for b in blocks:
                if dead[b]:
                    self._compact()
                    break
        if self._head < n:
            self._grow_front(n)
        h = self._head
        self._q[h - n:h] = blocks
        self._head = h - n
        self.size += n

    # -- storage housekeeping (amortised O(1) per operation) ---------------------------------
    def _grow_front(self, need: int) -> None:
        pad = max(need, len(self._q) - self._head, self._MARGIN)
        self._q = [0] * pad + self._q[self._head:]
        self._head = pad

    def _trim(self) -> None:
        """Drop the consumed front of the list, keeping a margin."""
        m = self._MARGIN
        self._q = self._q[self._head - m:]
        self._head = m

    def _compact(self) -> None:
        """Drop dead entries: rebuild the live part."""
        live = self.to_list()
        self._q = [0] * self._MARGIN + live
        self._head = self._MARGIN
        self._dead = [0] * len(self._dead)
        self._holes = 0


class BlockPool:
    """All KV blocks of one replica: ref counts, block hashes, free queue and the hash map.

    **Exclusive blocks are not tracked block by block** (``lazy_exclusive``, the default). A block
    at a position of a request's table past its shared prefix (``EngineRequest.num_shared_blocks``)
    holds content no other request can have: nobody else can ever hit it, so while its owner holds
    it its ref count is 1 and its hash mark is implied by its position (registered unique if the
    owner has registered that position, unhashed otherwise). The pool then keeps no per-block state
    for it -- ``ref_cnt`` and ``block_hash`` of such a block are left as they were, and callers say
    how many popped blocks go to exclusive positions (``num_exclusive``) and free them with
    ``untracked=True``. Everything vLLM observes is kept exactly by counters instead:

    - ``num_unhashed_free``: free blocks without a hash. They always form a *prefix* of the free
      queue (unhashed blocks are queued at the front, hashed ones at the back, and a block's hash
      changes only when it is popped), so popping ``n`` blocks evicts ``n - min(n, prefix)`` hashes;
    - ``num_mapped_free``: free blocks that are in the hash map (a popped one has its hash evicted;
      only when there are some does a pop look at the popped blocks' hashes);
    - ``num_unique``: blocks registered as unique (held, or free but still cached), for
      :meth:`num_cached_hashes`.

    Why: in steady state every allocation pops blocks that carry a hash, and writing two list
    entries per block (plus their ref counts again at free) cost ~170 ns per block here, ~15 us per
    request of the Azure conversation trace (86 blocks, all exclusive). The invariants that remain
    per block: a block is in the hash map iff its ``block_hash`` is a hash (not None or ``UNIQUE``);
    ``ref_cnt`` is exact for mapped blocks and for blocks at shared positions. With
    ``lazy_exclusive=False`` every block is tracked as vLLM does (the reference, compared with the
    lazy pool state for state in tests/test_kv_lazy.py).
    """

    def __init__(self, num_gpu_blocks: int, enable_caching: bool = True, lazy_exclusive: bool = True):
        if num_gpu_blocks < 2:
            raise ValueError("num_gpu_blocks must be >= 2 (block 0 is the null block)")
        self.num_gpu_blocks = num_gpu_blocks
        self.enable_caching = enable_caching
        self.lazy_exclusive = lazy_exclusive
        self.ref_cnt = [0] * num_gpu_blocks
        self.block_hash: list[int | None] = [None] * num_gpu_blocks
        # hash -> block id, or -> dict of block ids when several blocks hold the same content
        # (two requests that both missed and computed the same prefix concurrently), as vLLM keeps.
        self.cached: dict[int, int | dict[int, None]] = {}
        self.free_queue = FreeBlockQueue(num_gpu_blocks, range(num_gpu_blocks))
        self.null_block = self.free_queue.popleft()  # block 0, never used for KV
        self.ref_cnt[self.null_block] = 1
        self.evictions = 0
        self.num_unhashed_free = self.free_queue.size  # the unhashed prefix of the free queue
        self.num_mapped_free = 0
        self.num_unique = 0

    # -- queries ---------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.size

    def usage(self) -> float:
        return 1.0 - self.free_queue.size / (self.num_gpu_blocks - 1)

    def get_cached_block(self, h: int) -> int | None:
        v = self.cached.get(h)
        if v is None or type(v) is int:
            return v
        return next(iter(v))

    # -- allocation ------------------------------------------------------------------------
    def get_new_blocks(self, n: int, num_unique: int = 0, shared_hashes: Sequence[int] = (),
                       num_exclusive: int = 0) -> list[int]:
        """Pop ``n`` blocks from the front of the free queue, evicting the hashes they carry.

        Registration fused in (to walk the blocks once): the first ``len(shared_hashes)`` of them
        are registered in the hash map under those hashes (what :meth:`cache_blocks` would do
        next), the following ``num_unique`` are registered as unique full blocks (what
        :meth:`mark_unique` would do next), the rest carry no hash. The last ``num_exclusive`` go
        to exclusive positions of their request (see the class docstring): with a lazy pool they get
        no per-block writes. Fusing is exact when no ``shared_hashes`` is in the map before the
        evictions (then the evictions and the insertions touch different keys, and the map ends with
        the same entries in the same order); otherwise the blocks are popped first and registered
        after, as vLLM does.
        """
        if n > self.free_queue.size:
            raise ValueError(f"cannot allocate {n} blocks, only {self.free_queue.size} free")
        cached = self.cached
        k = len(shared_hashes)
        if k and not cached.keys().isdisjoint(shared_hashes):
            out = self.get_new_blocks(n, num_exclusive=num_exclusive)
            self.cache_blocks(out[:k], shared_hashes)
            if num_unique:
                self._register_unique(out[k:k + num_unique], n - k - num_exclusive)
            return out
        out = self.free_queue.pop_many(n)
        # Evictions: the popped blocks past the unhashed prefix carried a hash. Those in the map
        # (only looked for when some free block is) lose it there: they are the popped blocks whose
        # mark is a hash (an exclusive block's mark may be stale, but only ever None or UNIQUE).
        u = self.num_unhashed_free
        if u >= n:
            self.num_unhashed_free = u - n
            evicted = nmf = 0
        else:
            self.num_unhashed_free = 0
            evicted = n - u
            self.evictions += evicted
            nmf = self.num_mapped_free
        self.num_unique += num_unique
        rc, bh = self.ref_cnt, self.block_hash
        tracked = n - num_exclusive if self.lazy_exclusive else n
        e1 = min(k, tracked) if tracked > 0 else 0
        if e1:
            # Blocks registered in the map (keys not in it: see above), evicting as they go.
            shared = out[:e1] if e1 < n else out
            if nmf:
                for b, hn in zip(shared, shared_hashes):
                    h = bh[b]
                    if h is not None and h is not UNIQUE:
                        nmf -= 1
                        evicted -= 1
                        if cached.get(h) == b:  # the common case: the hash maps to this block only
                            del cached[h]
                        else:
                            self._unmap(b, h)
                    rc[b] = 1
                    bh[b] = hn
            else:
                for b, hn in zip(shared, shared_hashes):
                    rc[b] = 1
                    bh[b] = hn
            cached.update(zip(shared_hashes, shared))
        if nmf:
            for b in out[max(e1, u):]:
                h = bh[b]
                if h is not None and h is not UNIQUE:
                    bh[b] = None
                    nmf -= 1
                    evicted -= 1
                    if cached.get(h) == b:
                        del cached[h]
                    else:
                        self._unmap(b, h)
        if u < n:
            self.num_mapped_free = nmf
            self.num_unique -= evicted  # the rest carried a unique mark
        # Per-block state of the other tracked blocks: up to two runs (unique, unhashed), one loop
        # per run, no per-block test of which run a block is in.
        if tracked > e1:
            e2 = min(k + num_unique, tracked)
            for lo, hi, mark in ((e1, e2, UNIQUE), (e2, tracked, None)):
                if lo < hi:
                    for b in (out if hi - lo == n else out[lo:hi]):
                        rc[b] = 1
                        bh[b] = mark
        return out

    def _unmap(self, b: int, h: int) -> None:
        """Remove block ``b`` from the hash map entry of ``h`` (which may list several blocks)."""
        v = self.cached.get(h)
        if isinstance(v, dict):
            v.pop(b, None)
            if len(v) == 1:
                self.cached[h] = next(iter(v))
            elif not v:
                del self.cached[h]
        elif v == b:
            del self.cached[h]

    def touch(self, blocks: Sequence[int]) -> None:
        """A prefix hit takes blocks (always mapped ones): free cached ones leave the free queue."""
        fq = self.free_queue
        rc = self.ref_cnt
        for b in blocks:
            if rc[b] == 0:
                fq.remove(b)
                self.num_mapped_free -= 1
            rc[b] += 1

    def cache_block(self, b: int, h: int) -> None:
        """Register a full block's hash (done when the block is scheduled full, as vLLM does)."""
        self.block_hash[b] = h
        v = self.cached.get(h)
        if v is None:
            self.cached[h] = b
        elif type(v) is int:
            if v != b:
                self.cached[h] = {v: None, b: None}
        else:
            v[b] = None

    def mark_unique(self, blocks: Sequence[int]) -> None:
        """Register full blocks whose content is unique to their request, lazily.

        Such a block can only ever be a prefix hit for its own request, after a preemption. Until
        then it behaves as cached (hashed blocks go to the back of the free queue when freed, and
        popping one counts an eviction) but stays out of the hash map; the request indexes it with
        :meth:`index_unique` when it is preempted, which leaves the map exactly as if it had been
        registered at once (only the request can have added that hash meanwhile).
        """
        self._register_unique(blocks, len(blocks))

    def _register_unique(self, blocks: Sequence[int], tracked: int) -> None:
        self.num_unique += len(blocks)
        if not self.lazy_exclusive:
            tracked = len(blocks)
        bh = self.block_hash
        for b in (blocks if tracked >= len(blocks) else blocks[:max(tracked, 0)]):
            bh[b] = UNIQUE

    def index_unique(self, b: int, h: int) -> None:
        """Put a held block registered as unique into the hash map under ``h`` (its owner is being
        preempted and will look it up again)."""
        self.num_unique -= 1
        self.ref_cnt[b] = 1  # held by its owner only (a lazy pool did not track it)
        self.cache_block(b, h)

    def num_cached_hashes(self) -> int:
        """Entries vLLM's hash map would hold: indexed hashes plus lazily registered unique blocks."""
        return len(self.cached) + self.num_unique

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[int]) -> None:
        """``cache_block`` for each pair, in order."""
        if self.cached.keys().isdisjoint(hashes):  # no duplicate content: the common case
            bh = self.block_hash
            for b, h in zip(blocks, hashes):
                bh[b] = h
            self.cached.update(zip(hashes, blocks))
        else:
            for b, h in zip(blocks, hashes):
                self.cache_block(b, h)

    def free_blocks(self, ordered_blocks: Sequence[int], exclusive_from: int | None = None,
                    num_hashed: int = 0, untracked: bool = False) -> None:
        """Release blocks given in eviction order (callers pass a request's blocks tail first).

        A block whose ref count drops to 0 joins the free queue: at the back if it carries a hash
        (it stays cached; LRU from the front), at the front otherwise (nothing worth keeping).

        ``exclusive_from``: ``ordered_blocks`` is a request's block table reversed, whose blocks
        from index ``exclusive_from`` on are exclusive (only it ever references them, so each drops
        to 0); of those, indices below ``num_hashed`` carry a hash (back of the queue), the rest none
        (front). Same lists, same order as the per-block loop, without a branch per block.
        ``untracked``: none of the exclusive blocks is in the hash map (its owner was never
        preempted), so a lazy pool does no per-block work for them at all.
        """
        rc, bh = self.ref_cnt, self.block_hash
        mapped = 0  # blocks freed that are in the hash map
        back: list[int] = []
        front: list[int] = []
        if exclusive_from is not None:
            m = len(ordered_blocks) - exclusive_from  # the exclusive blocks come first
            excl = ordered_blocks[:m]
            if not (untracked and self.lazy_exclusive):
                for b in excl:
                    rc[b] = 0
                    h = bh[b]
                    if h is not None and h is not UNIQUE:
                        mapped += 1
            cut = max(len(ordered_blocks) - max(num_hashed, exclusive_from), 0)  # unhashed come first
            front = excl[:cut]
            back = excl[cut:]
            ordered_blocks = ordered_blocks[m:]
        for b in ordered_blocks:
            c = rc[b] - 1
            rc[b] = c
            if c == 0:
                h = bh[b]
                if h is None:
                    front.append(b)
                else:
                    back.append(b)
                    if h is not UNIQUE:
                        mapped += 1
        self.num_mapped_free += mapped
        if front:
            self.free_queue.extendleft(front)
            self.num_unhashed_free += len(front)
        if back:
            self.free_queue.extend(back)

    def free_table(self, blocks: list[int], exclusive_from: int, num_hashed: int, untracked: bool) -> None:
        """``free_blocks(blocks[::-1], exclusive_from, num_hashed, untracked)`` for a request's block
        table ``blocks`` (in table order). When every block is exclusive and untracked (a request
        with no shared prefix, never preempted: the common case), the queue gets two slices of the
        table directly: each block is copied once instead of through four temporary lists (on
        cold memory the reference-count traffic of those copies is most of the cost)."""
        if exclusive_from or not (untracked and self.lazy_exclusive):
            self.free_blocks(blocks[::-1], exclusive_from, num_hashed, untracked)
            return
        n = len(blocks)
        fq = self.free_queue
        if num_hashed < n:  # the unhashed tail goes to the front, where extendleft leaves it in table order
            fq.prepend(blocks[num_hashed:])
            self.num_unhashed_free += n - num_hashed
        if num_hashed > 0:  # the hashed ones to the back, deepest first
            fq.extend(blocks[num_hashed - 1::-1])

    def reset_prefix_cache(self) -> None:
        self.block_hash = [None] * self.num_gpu_blocks
        self.cached.clear()
        self.num_mapped_free = 0
        self.num_unique = 0
        self.free_queue._compact()  # unhashed blocks may now rejoin at the front
        self.num_unhashed_free = self.free_queue.size

    # -- invariants (used by tests) --------------------------------------------------------
    def check_invariants(self) -> None:
        fq = self.free_queue
        free = fq.to_list()
        assert len(free) == fq.size, "free queue size mismatch"
        assert len(set(free)) == len(free), "block twice in free queue"
        assert self.null_block not in free, "null block in free queue"
        assert 0 <= self.num_unhashed_free <= fq.size, "unhashed prefix longer than the free queue"
        assert self.num_unique >= 0, "negative unique count"
        free_set = set(free)
        rc, bh = self.ref_cnt, self.block_hash
        mapped_blocks = set()
        for h, v in self.cached.items():
            for b in ([v] if isinstance(v, int) else v):
                assert bh[b] == h, f"hash map points to block {b} without that hash"
                mapped_blocks.add(b)
                assert (b in free_set) == (rc[b] == 0), f"mapped block {b}: ref_cnt {rc[b]}, free={b in free_set}"
        assert self.num_mapped_free == len(mapped_blocks & free_set), "num_mapped_free is not the free mapped blocks"
        for b in range(self.num_gpu_blocks):
            h = bh[b]
            assert h is None or h is UNIQUE or b in mapped_blocks, f"block {b} has hash {h} but is not mapped"
        if not self.lazy_exclusive:  # every block tracked: the counters must match the blocks
            for b in range(self.num_gpu_blocks):
                assert rc[b] >= 0, f"negative ref count on block {b}"
                assert (b in free_set) == (rc[b] == 0), f"block {b}: ref_cnt {rc[b]} but free={b in free_set}"
            u = self.num_unhashed_free
            assert all(bh[b] is None for b in free[:u]), "a hashed block in the unhashed prefix"
            assert all(bh[b] is not None for b in free[u:]), "an unhashed block past the unhashed prefix"
            assert self.num_unique == sum(1 for h in bh if h is UNIQUE), "unique count mismatch"


class KVCacheManager:
    """Per-request block tables on top of a :class:`BlockPool` (vLLM's ``KVCacheManager``).

    A request (any object with the attributes used below, see :class:`sim.engine.EngineRequest`)
    holds ``blocks`` (its block table), ``block_hashes`` (precomputed hashes of its full prompt
    blocks), ``num_cached_blocks`` (how many of its blocks are registered in the hash map) and
    ``extend_block_hashes(n)`` (hashes for blocks beyond the precomputed ones).

    ``pending_sync`` / ``pending_blocks``: while the engine fast-forwards a decode run, some of the
    run's block operations may not be applied yet; the engine sets these callables so that every
    *observation* sees the exact state of the current simulated time: the cached prefix after
    applying them (``pending_sync``), the free-block count arithmetically (``pending_blocks``:
    blocks taken by now but not yet popped). The engine's own scheduling never runs while a run is
    pending.
    """

    def __init__(self, num_gpu_blocks: int, block_size: int, enable_caching: bool = True,
                 watermark: float = 0.0, lazy_exclusive: bool = True):
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_gpu_blocks, enable_caching, lazy_exclusive)
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        # Prefix-cache stats in tokens (vllm:prefix_cache_queries / _hits).
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.pending_sync: Callable[[], None] | None = None
        self.pending_blocks: Callable[[], int] | None = None

    @property
    def num_free_blocks(self) -> int:
        if self.pending_blocks is not None:
            return self.pool.free_queue.size - self.pending_blocks()
        return self.pool.free_queue.size

    def usage(self) -> float:
        if self.pending_blocks is not None:
            return 1.0 - (self.pool.free_queue.size - self.pending_blocks()) / (self.pool.num_gpu_blocks - 1)
        return self.pool.usage()

    def get_computed_blocks(self, req) -> tuple[list[int], int]:
        """Longest prefix hit: leading prompt blocks found in the cache.

        Capped so at least the last prompt token is recomputed (its logits are needed), as
        ``KVCacheManager.get_computed_blocks`` does with ``max_cache_hit_length = num_tokens - 1``.
        """
        if not self.enable_caching:
            return [], 0
        hashes = req.block_hashes
        max_blocks = min((req.num_tokens - 1) // self.block_size, len(hashes))
        if not req.num_preemptions and req.num_shared_blocks < max_blocks:
            # Blocks past the shared prefix are unique to this request: only its own preempted
            # blocks could be in the map under those hashes.
            max_blocks = req.num_shared_blocks
        out: list[int] = []
        get = self.pool.cached.get
        for i in range(max_blocks):
            v = get(hashes[i])
            if v is None:
                break
            out.append(v if type(v) is int else next(iter(v)))
        return out, len(out) * self.block_size

    def cached_prefix_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading hashes are in the cache now (for 'precise' prefix routing)."""
        if not self.enable_caching:
            return 0
        if self.pending_sync is not None:
            self.pending_sync()
        n = 0
        cached = self.pool.cached
        for h in hashes:
            if h not in cached:
                break
            n += 1
        return n

    def blocks_needed(self, req, num_new_tokens: int, new_computed_blocks: Sequence[int] = ()) -> tuple[int, int]:
        """(new blocks to pop, blocks the allocation takes from the free queue) -- no side effects."""
        num_computed = req.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_new = -(-(num_computed + num_new_tokens) // self.block_size) - len(req.blocks) - len(new_computed_blocks)
        if not new_computed_blocks:
            return num_new, max(num_new, 0)
        rc = self.pool.ref_cnt
        evictable_hits = sum(1 for b in new_computed_blocks if rc[b] == 0)
        return num_new, max(num_new, 0) + evictable_hits

    def can_allocate(self, req, num_new_tokens: int, new_computed_blocks: Sequence[int] = (),
                     apply_watermark: bool = False) -> bool:
        """Would ``allocate_slots`` succeed now? (No side effects.)"""
        _, need = self.blocks_needed(req, num_new_tokens, new_computed_blocks)
        free = self.pool.free_queue.size
        if apply_watermark:
            free -= self.watermark_blocks
        return need <= free

    def allocate_slots(self, req, num_new_tokens: int, new_computed_blocks: Sequence[int] = (),
                       apply_watermark: bool = False) -> bool:
        """Make room for ``num_new_tokens`` more tokens of ``req``; False if blocks ran out.

        ``new_computed_blocks`` are prefix-cache hits being attached at admission. Hits on free
        cached blocks leave the free queue, so they count against free capacity.
        """
        pool = self.pool
        num_new, need = self.blocks_needed(req, num_new_tokens, new_computed_blocks)
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
            blocks = req.blocks
            L0 = len(blocks)
            num_excl = exclusive_count(L0, num_new, req.num_shared_blocks)
            num_full = L0
            if self.enable_caching and req.num_cached_blocks == L0:
                # Register the new blocks that this allocation fills while popping them (see
                # get_new_blocks): those within the request's shared prefix in the hash map, the
                # rest as unique -- what cache_full_blocks below would do.
                num_full = (req.num_computed_tokens + len(new_computed_blocks) * self.block_size
                            + num_new_tokens) // self.block_size
            if num_full > L0:
                m = min(num_full, req.num_shared_blocks)
                if m > L0:
                    if m > len(req.block_hashes):
                        req.extend_block_hashes(m)
                    out = pool.get_new_blocks(num_new, num_full - m, req.block_hashes[L0:m], num_excl)
                else:
                    out = pool.get_new_blocks(num_new, num_full - L0, (), num_excl)
                req.num_cached_blocks = num_full
            else:
                out = pool.get_new_blocks(num_new, 0, (), num_excl)
            if L0:
                blocks.extend(out)
            else:
                req.blocks = out  # a fresh table: take the popped list itself (no copy)
        if self.enable_caching:
            self.cache_full_blocks(req, req.num_computed_tokens + len(new_computed_blocks) * self.block_size
                                   + num_new_tokens)
        return True

    def cache_full_blocks(self, req, num_tokens: int) -> None:
        """Register hashes of blocks that are full once ``num_tokens`` tokens are computed."""
        num_full = num_tokens // self.block_size
        i = req.num_cached_blocks
        if num_full <= i:
            return
        self.register_blocks(req, i, num_full)
        req.num_cached_blocks = num_full

    def register_blocks(self, req, start: int, end: int) -> None:
        """Register ``req.blocks[start:end]``: blocks that may be shared with other requests
        (index below ``req.num_shared_blocks``) go to the hash map, the others are marked unique."""
        s = req.num_shared_blocks
        pool = self.pool
        if start < s:
            m = min(end, s)
            if m > len(req.block_hashes):
                req.extend_block_hashes(m)
            pool.cache_blocks(req.blocks[start:m], req.block_hashes[start:m])
            start = m
        if start < end:
            # Positions past the shared prefix: a lazy pool only counts them (see BlockPool; this
            # runs for every block a decode fills, so no call and no slice).
            if pool.lazy_exclusive:
                pool.num_unique += end - start
            else:
                pool.mark_unique(req.blocks[start:end])

    def free(self, req, preempted: bool = False) -> None:
        """Release a request's blocks, tail first (deepest block of the chain evicted first).

        A preempted request will look its own blocks up again when readmitted, so its blocks
        marked unique are first put in the hash map (see :meth:`BlockPool.mark_unique`).
        """
        blocks = req.blocks
        if preempted and self.enable_caching and req.num_cached_blocks > req.num_shared_blocks:
            n = req.num_cached_blocks
            req.extend_block_hashes(n)
            pool = self.pool
            bh, hashes = pool.block_hash, req.block_hashes
            for i in range(req.num_shared_blocks, n):
                b = blocks[i]
                h = bh[b]
                if h is None or h is UNIQUE:  # registered unique (a lazy pool did not mark it)
                    pool.index_unique(b, hashes[i])
        if blocks:
            s = req.num_shared_blocks
            if s < len(blocks):
                # Exclusive blocks are in the hash map only if the request was ever preempted.
                self.pool.free_table(blocks, s, req.num_cached_blocks, not (preempted or req.num_preemptions))
            else:
                self.pool.free_blocks(blocks[::-1])
        req.blocks = []
        req.num_cached_blocks = 0

    def record_prefix_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        if not self.enable_caching:
            return  # vLLM's record_prefix_cache_stats records nothing with caching off
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit_tokens


def exclusive_count(table_len: int, n: int, num_shared: int) -> int:
    """How many of ``n`` blocks appended to a request's table of ``table_len`` blocks land at
    exclusive positions (index ``>= num_shared``, past its shared prefix; see :class:`BlockPool`)."""
    return min(n, max(table_len + n - num_shared, 0))


def unique_hash_base(idx: int) -> int:
    """Base of the ids of request ``idx``'s blocks whose content is unique to it: block ``i`` past
    its shared prefix (an unshared prompt block or a generated one) is ``unique_hash_base(idx) - i``.

    Such content can only ever match the request itself, so any id unique per (request, block
    index) is equivalent to a content hash; these are negative, so they never equal a prompt
    hash (unsigned 64-bit), and a ``range`` of them costs nothing to make.
    """
    return -((idx + 1) << 32)


class PromptBlockHashes:
    """The engine block hashes of every prompt of a workload, for the cluster to hand to requests.

    Calling it with a row index gives ``(hashes, num_shared)``: the leading ``num_shared`` blocks
    are keyed by the trace's prefix identity (token ids or hash ids) and may be shared with other
    requests; they are the chained hashes of :func:`traces.schema.engine_block_hashes`. The rest
    hold content unique to the request and get the ids ``unique_hash_base(row) - i``, the same
    scheme as the engine's generated blocks (``EngineRequest.extend_block_hashes``).
    A prompt with no shared block gets its ids as a ``range`` rather than a list.

    Why: hashing a prompt block by block in Python at each arrival costs about a microsecond per
    block, more than simulating the request. The shared prefixes are computed with the vectorised,
    bit-identical :func:`traces.hashing.engine_block_hashes_csr`, a chunk of ``chunk`` consecutive
    requests at a time (arrivals come in order), so memory stays bounded whatever the workload
    size; a row outside the current chunk (a retry) uses the scalar reference, as does a workload
    the vectorised path cannot reproduce exactly. Unique tails are not hashed at all. The trace
    module's reference hashes the unique tail with a per-request key instead; both give the same
    equalities (a unique block equals only itself), which is all the engine and routers use.
    """

    def __init__(self, workload, block_size: int, chunk: int = 8192):
        import numpy as np

        from traces import hashing

        df = workload.df
        self.block_size = block_size
        self.chunk = chunk
        self.workload = workload
        prompt = df["prompt_tokens"].to_numpy(dtype="int64")
        self._hashing = hashing
        self._token = workload.list_csr("token_ids") if workload.has("token_ids") else None
        self._hash = workload.list_csr("hash_ids") if workload.has("hash_ids") and workload.hash_block_size else None
        self.vectorised = True
        if self._token is not None:
            off, val, present = self._token
            if not hashing.TUPLE_HASH_OK or (val.size and val.min() < 0):
                self.vectorised = False
        self._start = -1
        self._offsets = None
        self._values = None
        # Leading blocks keyed by the trace's identity (as in engine_block_hashes: token ids win).
        n_full = prompt // block_size
        known = np.zeros(len(prompt), dtype=np.int64)
        use_tok = np.zeros(len(prompt), dtype=bool)
        if self._token is not None:
            off, _, present = self._token
            use_tok = present.astype(bool)
            known = np.where(use_tok, np.minimum(n_full, np.diff(off) // block_size), known)
        if self._hash is not None:
            off, _, present = self._hash
            covered = np.diff(off) * int(workload.hash_block_size)
            known = np.where(present.astype(bool) & ~use_tok, np.minimum(n_full, covered // block_size), known)
        self.num_shared = known.tolist()
        self.num_full = n_full.tolist()
        # Only the shared prefixes are hashed: as prompts of num_shared full blocks.
        self._shared_prompt = known * block_size
        self._any_shared = bool(known.any())

    def __call__(self, i: int) -> tuple[Sequence[int], int]:
        s = self.num_shared[i]
        base = -((i + 1) << 32)  # unique_hash_base(i), inlined: this runs once per arrival
        if not s:
            # Nothing shared: the unique ids as a range, which EngineRequest keeps as it is.
            return range(base, base - self.num_full[i], -1), 0
        if not self.vectorised:
            return self.scalar(i), s
        start = i - i % self.chunk
        if start != self._start:
            if self._start >= 0 and start < self._start:
                # an earlier row again (a retry): not worth a whole chunk
                return self.scalar(i), s
            self._compute(start)
        off = self._offsets
        j = i - start
        out = self._values[off[j]:off[j + 1]].tolist()
        n = self.num_full[i]
        if n > s:
            out.extend(range(base - s, base - n, -1))
        return out, s

    def _compute(self, start: int) -> None:
        import numpy as np

        end = min(start + self.chunk, len(self._shared_prompt))
        kw: dict = {}
        for name, csr in (("token", self._token), ("hash", self._hash)):
            if csr is None:
                continue
            off, val, present = csr
            o = off[start:end + 1]
            kw[f"{name}_ids"] = (o - o[0], val[o[0]:o[-1]])
            kw[f"{name}_present"] = present[start:end]
        if self._hash is not None:
            kw["hash_block_size"] = self.workload.hash_block_size
        offsets, values = self._hashing.engine_block_hashes_csr(
            self._shared_prompt[start:end], self.block_size, unique_keys=np.arange(start, end, dtype=np.int64), **kw)
        self._start = start
        self._offsets = offsets.tolist()
        self._values = values  # numpy: Python ints only for the requests that arrive

    def scalar(self, i: int) -> list[int]:
        """Row ``i`` from the scalar reference (:meth:`traces.schema.Workload.block_hashes`) for the
        shared prefix, and the unique ids after it."""
        s, n = self.num_shared[i], self.num_full[i]
        base = unique_hash_base(i)
        return self.workload.block_hashes(i, self.block_size)[:s] + list(range(base - s, base - n, -1))
