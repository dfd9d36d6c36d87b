"""What a router knows about which replica holds which prefix blocks.

Two sources, chosen by ``mode``:

- ``approximate`` (:class:`ApproxPrefixIndex`): the router remembers the block hashes it *sent*
  to each replica, in a per-replica LRU sized like that replica's KV cache (llm-d's approximate
  prefix-cache scorer, ``PreRequest`` inserts every hash for the chosen pod; capacity auto-tuned from
  the pod's ``CacheNumBlocks``, 31 250 when unknown). It is built from routing history only, so it
  can believe a block is cached after the engine evicted it, and vice versa.
- ``precise``: asks the replica (``ReplicaView.cached_prefix_blocks``), like routers fed by vLLM's
  KV events (llm-d precise-prefix-cache-scorer, Dynamo's ``KvIndexer``).

Block hashes are vLLM-style *chained* hashes over full blocks (``RoutingRequest.block_hashes``), so
hash ``i`` identifies the whole prefix up to block ``i`` and "blocks in common" is always a leading run.

Two LRUs with the same semantics: :class:`BlockLRU`, one dictionary entry per block (the readable
reference, also used by the real-cluster client), and :class:`ChainLRU`, one entry per *run* of
consecutive blocks of one chain, whose cost is per run rather than per block (what the routers use;
``tests/test_prefix_index_fast.py`` checks that both hold the same blocks in the same order).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Iterable, Literal, Sequence

from policies.base import ReplicaView

LLMD_DEFAULT_LRU_BLOCKS = 31_250  # llm-d's per-pod LRU capacity when the pod reports no CacheNumBlocks

PrefixMode = Literal["approximate", "precise"]


class BlockLRU:
    """An LRU set of block hashes with a capacity in blocks (one entry per block: the reference).

    ``insert`` touches a request's blocks *tail first*, so within a chain the head is always the most
    recently used: eviction then removes the tail of a prefix before its head, as vLLM's free-block
    queue does (freed blocks are queued in reverse order). A consequence the index relies on: for any
    chain, the set of held blocks is a *leading run* (every request that touches block ``j+1`` of a
    chain also touches block ``j``, later), so the longest cached prefix can be found by binary search.
    """

    __slots__ = ("capacity", "_d")

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = int(capacity)
        self._d: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, h: int) -> bool:
        return h in self._d

    def insert(self, block_hashes: Sequence[int]) -> None:
        d = self._d
        for h in reversed(block_hashes):
            if h in d:
                d.move_to_end(h)
            else:
                d[h] = None
        self._evict()

    def resize(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._evict()

    def _evict(self) -> None:
        d = self._d
        while len(d) > self.capacity:
            d.popitem(last=False)

    def leading_match(self, block_hashes: Sequence[int]) -> int:
        """Number of leading ``block_hashes`` held (binary search; see the class docstring)."""
        d = self._d
        lo, hi = 0, len(block_hashes)  # invariant: the first lo are held; the first hi+1 are not all held
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if block_hashes[mid - 1] in d:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def leading_match_scan(self, block_hashes: Sequence[int]) -> int:
        """Reference linear scan (used by tests to check :meth:`leading_match`)."""
        n = 0
        for h in block_hashes:
            if h not in self._d:
                break
            n += 1
        return n


def _common_end(hashes: Sequence[int], b: int, query: Sequence[int], j: int, n: int) -> int:
    """End of the run of positions ``j <= i < min(b, n)`` where ``hashes[i] == query[i]``, given
    ``hashes[j] == query[j]``. Chained hashes agree on a leading run only, so binary search is exact."""
    k = b if b < n else n
    if hashes is query or hashes[k - 1] == query[k - 1]:
        return k
    lo, hi = j + 1, k - 1  # hashes and query agree below lo and differ at hi
    while lo < hi:
        mid = (lo + hi + 1) >> 1
        if hashes[mid - 1] == query[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class ChainLRU:
    """:class:`BlockLRU` with one entry per run of blocks instead of one per block.

    Why: a prompt has tens to thousands of blocks, and the per-block LRU touches every one of them
    at each routing decision (plus as many evictions): ~80 us per request on the Azure conversation
    trace, ~400 us on Mooncake's. Here the cost is per *run* touched, not per block: one run for a
    prompt nobody holds yet (an unshared prompt), a few for one that extends cached history.

    The LRU order is a sequence of runs ``[hashes, a, b]``: blocks ``hashes[a:b]`` of one inserted
    chain, consecutive in LRU order, ``hashes[b-1]`` the least recently used of them and
    ``hashes[a]`` the most. A run is found through the hash of its most recent block (``_starts``).
    This is the same state as :class:`BlockLRU`'s, block for block:

    - ``insert(h)`` touches ``h`` tail first, i.e. appends the run ``h[0:n]`` at the recent end and
      takes out of the older runs the blocks of ``h`` they hold. Those are the held leading run of
      ``h`` (see :class:`BlockLRU`), so an older run loses only its *most recent* part, where its
      chain still agrees with ``h``: runs are cut at the head (``a`` grows), never split.
    - Eviction drops the least recent blocks: the oldest run's tail (``b`` shrinks).
    - ``leading_match(h)`` follows the runs that cover ``h``'s held leading run: a block is held by
      exactly one run, so when ``h``'s next block is held, a run starts there.

    A run emptied by a cut stays in the order as a dead entry (``a == b``) until eviction reaches
    it or dead entries outnumber live ones (then the order is compacted), so that a cut costs O(1).

    Requires chained hashes: ``h[i] == g[i]`` implies ``h[:i] == g[:i]`` (the engine's block hashes,
    up to 64-bit collisions). Keeps a reference to every inserted sequence and reads its first
    ``len`` entries later: callers must not change them (appending is harmless).

    ``firsts`` (optional, shared by the LRUs of all replicas of a router): hash -> number of LRUs
    holding it as the *first* block of a chain, so that one lookup tells that no replica holds any
    block of a prompt.
    """

    __slots__ = ("capacity", "_order", "_starts", "_size", "_dead", "_firsts")

    def __init__(self, capacity: int, firsts: dict[int, int] | None = None):
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = int(capacity)
        self._order: deque[list] = deque()  # runs, least recently used first
        self._starts: dict[int, list] = {}  # hash of each live run's most recent block -> run
        self._size = 0  # blocks held
        self._dead = 0  # emptied runs still in _order
        self._firsts = firsts if firsts is not None else {}

    def __len__(self) -> int:
        return self._size

    def leading_match(self, block_hashes: Sequence[int]) -> int:
        """Number of leading ``block_hashes`` held."""
        n = len(block_hashes)
        starts = self._starts
        j = 0
        while j < n:
            run = starts.get(block_hashes[j])
            if run is None:
                break
            j = _common_end(run[0], run[2], block_hashes, j, n)
        return j

    def insert(self, block_hashes: Sequence[int]) -> None:
        n = len(block_hashes)
        if not n:
            if self._size > self.capacity:
                self._evict()
            return
        starts = self._starts
        firsts = self._firsts
        h = block_hashes[0]
        run = starts.pop(h, None)
        if run is None:  # no block of the chain held: a new first block
            firsts[h] = firsts.get(h, 0) + 1
        else:  # the first block is held, by a run that starts the chain too: firsts unchanged
            self._cut(run, block_hashes, n)
        run = [block_hashes, 0, n]
        self._order.append(run)
        starts[h] = run
        self._size += n
        if self._size > self.capacity:
            self._evict()

    def _cut(self, run: list, block_hashes: Sequence[int], n: int) -> None:
        """Take the held leading run of ``block_hashes`` out of the runs holding it, ``run`` (already
        out of ``_starts``, the one holding the first block) first. ``firsts`` is unchanged: the
        first block moves from ``run`` to the caller's new run."""
        starts = self._starts
        j = 0
        while True:
            e = _common_end(run[0], run[2], block_hashes, j, n)
            self._size -= e - j
            if e < run[2]:
                run[1] = e
                starts[run[0][e]] = run
            else:
                run[1] = run[2]
                self._dead += 1
            j = e
            if j >= n:
                break
            run = starts.pop(block_hashes[j], None)
            if run is None:
                break
        if self._dead > 64 and self._dead * 2 > len(self._order):
            self._order = deque(r for r in self._order if r[1] < r[2])
            self._dead = 0

    def resize(self, capacity: int) -> None:
        self.capacity = int(capacity)
        if self._size > self.capacity:
            self._evict()

    def clear(self) -> None:
        """Forget everything (and the first blocks counted in ``firsts``)."""
        firsts = self._firsts
        for run in self._order:
            if run[1] == 0 and run[2] > 0:
                h = run[0][0]
                c = firsts[h] - 1
                if c:
                    firsts[h] = c
                else:
                    del firsts[h]
        self._order.clear()
        self._starts.clear()
        self._size = 0
        self._dead = 0

    def _evict(self) -> None:
        excess = self._size - self.capacity
        order = self._order
        while excess > 0:
            run = order[0]
            a = run[1]
            k = run[2] - a
            if k > excess:
                run[2] -= excess
                self._size -= excess
                return
            order.popleft()
            if k:
                h = run[0][a]
                del self._starts[h]
                if not a:
                    firsts = self._firsts
                    c = firsts[h] - 1
                    if c:
                        firsts[h] = c
                    else:
                        del firsts[h]
                self._size -= k
                excess -= k
            else:
                self._dead -= 1

    def runs(self) -> int:
        """Number of runs (entries) the LRU keeps (for tests and cost estimates)."""
        return len(self._order) - self._dead


class ApproxPrefixIndex:
    """Per-replica :class:`ChainLRU` of the hashes routed there (llm-d approximate prefix producer).

    Capacity per replica is ``capacity_blocks`` if given, else the replica's ``num_total_blocks``
    (its KV cache size, seen in the views at routing time), else llm-d's default 31 250.
    """

    def __init__(self, capacity_blocks: int | None = None):
        self.capacity_blocks = capacity_blocks
        self._lru: dict[int, ChainLRU] = {}
        self._seen_capacity: dict[int, int] = {}
        # first-block hash -> number of replicas holding it: "nobody holds this prompt" in one lookup
        self._firsts: dict[int, int] = {}
        self._observed: object = None  # the views last observed

    def _capacity_for(self, replica_id: int) -> int:
        if self.capacity_blocks is not None:
            return self.capacity_blocks
        return self._seen_capacity.get(replica_id, LLMD_DEFAULT_LRU_BLOCKS)

    def observe(self, views: Iterable[ReplicaView]) -> None:
        """Auto-tune capacities from the views (llm-d reads ``CacheNumBlocks`` from pod metrics).

        A replica's KV cache size is fixed for its life, so the same tuple of views as last time
        (the cluster hands routers one tuple until its fleet changes) has nothing new to tell.
        """
        if self.capacity_blocks is not None or (views is self._observed and type(views) is tuple):
            return
        self._observed = views
        seen = self._seen_capacity.get
        try:  # fast path: nothing changed (a capacity equal to the one seen needs no work)
            for v in views:
                if v.num_total_blocks != seen(v.replica_id):
                    self._observe_one(v)
        except AttributeError:  # a view without num_total_blocks: no capacity to learn from it
            for v in views:
                self._observe_one(v)

    def _observe_one(self, v: ReplicaView) -> None:
        cap = int(getattr(v, "num_total_blocks", 0) or 0)
        if cap > 0 and self._seen_capacity.get(v.replica_id) != cap:
            self._seen_capacity[v.replica_id] = cap
            lru = self._lru.get(v.replica_id)
            if lru is not None:
                lru.resize(cap)

    def match(self, replica_id: int, block_hashes: Sequence[int]) -> int:
        lru = self._lru.get(replica_id)
        return 0 if lru is None else lru.leading_match(block_hashes)

    def insert(self, replica_id: int, block_hashes: Sequence[int]) -> None:
        if not len(block_hashes):
            return
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = ChainLRU(self._capacity_for(replica_id), self._firsts)
        lru.insert(block_hashes)

    def size(self, replica_id: int) -> int:
        """Blocks the router believes ``replica_id`` holds (SGLang's tenant size, Dynamo's tree size)."""
        lru = self._lru.get(replica_id)
        return 0 if lru is None else len(lru)

    def remove(self, replica_id: int) -> None:
        lru = self._lru.pop(replica_id, None)
        if lru is not None:
            lru.clear()
        self._seen_capacity.pop(replica_id, None)


class PrefixMatcher:
    """Longest cached prefix (in blocks) of a request on each replica, from either source."""

    def __init__(self, mode: PrefixMode, capacity_blocks: int | None = None):
        self.mode = mode
        self.index = ApproxPrefixIndex(capacity_blocks) if mode == "approximate" else None

    def matches(self, block_hashes: Sequence[int], views: Sequence[ReplicaView]) -> list[int]:
        if not len(block_hashes):
            return [0] * len(views)
        out = self.held_matches(block_hashes, views)
        return [0] * len(views) if out is None else out

    def held_matches(self, block_hashes: Sequence[int], views: Sequence[ReplicaView]) -> list[int] | None:
        """:meth:`matches` for a non-empty prompt, or None when no replica holds its first block
        (every match 0; approximate mode knows it in one lookup, without a list)."""
        index = self.index
        if index is None:
            return [int(v.cached_prefix_blocks(block_hashes)) for v in views]
        index.observe(views)
        if block_hashes[0] not in index._firsts:
            return None
        lrus = index._lru
        out = []
        for v in views:
            lru = lrus.get(v.replica_id)
            out.append(0 if lru is None else lru.leading_match(block_hashes))
        return out

    def match_one(self, block_hashes: Sequence[int], view: ReplicaView) -> int:
        return self.matches(block_hashes, [view])[0]

    def size(self, view: ReplicaView) -> int:
        """Blocks believed cached on ``view`` (approximate: router LRU; precise: optional
        ``view.cached_block_count``, else 0)."""
        if self.index is not None:
            return self.index.size(view.replica_id)
        return int(getattr(view, "cached_block_count", 0) or 0)

    def on_routed(self, block_hashes: Sequence[int], replica_id: int) -> None:
        if self.index is not None:
            self.index.insert(replica_id, block_hashes)

    def on_replica_removed(self, replica_id: int) -> None:
        if self.index is not None:
            self.index.remove(replica_id)
