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
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterable, Literal, Sequence

from policies.base import ReplicaView

LLMD_DEFAULT_LRU_BLOCKS = 31_250  # llm-d's per-pod LRU capacity when the pod reports no CacheNumBlocks

PrefixMode = Literal["approximate", "precise"]


class BlockLRU:
    """An LRU set of block hashes with a capacity in blocks.

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


class ApproxPrefixIndex:
    """Per-replica :class:`BlockLRU` of the hashes routed there (llm-d approximate prefix producer).

    Capacity per replica is ``capacity_blocks`` if given, else the replica's ``num_total_blocks``
    (its KV cache size, seen in the views at routing time), else llm-d's default 31 250.
    """

    def __init__(self, capacity_blocks: int | None = None):
        self.capacity_blocks = capacity_blocks
        self._lru: dict[int, BlockLRU] = {}
        self._seen_capacity: dict[int, int] = {}

    def _capacity_for(self, replica_id: int) -> int:
        if self.capacity_blocks is not None:
            return self.capacity_blocks
        return self._seen_capacity.get(replica_id, LLMD_DEFAULT_LRU_BLOCKS)

    def observe(self, views: Iterable[ReplicaView]) -> None:
        """Auto-tune capacities from the views (llm-d reads ``CacheNumBlocks`` from pod metrics)."""
        if self.capacity_blocks is not None:
            return
        for v in views:
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
        if not block_hashes:
            return
        lru = self._lru.get(replica_id)
        if lru is None:
            lru = self._lru[replica_id] = BlockLRU(self._capacity_for(replica_id))
        lru.insert(block_hashes)

    def size(self, replica_id: int) -> int:
        """Blocks the router believes ``replica_id`` holds (SGLang's tenant size, Dynamo's tree size)."""
        lru = self._lru.get(replica_id)
        return 0 if lru is None else len(lru)

    def remove(self, replica_id: int) -> None:
        self._lru.pop(replica_id, None)
        self._seen_capacity.pop(replica_id, None)


class PrefixMatcher:
    """Longest cached prefix (in blocks) of a request on each replica, from either source."""

    def __init__(self, mode: PrefixMode, capacity_blocks: int | None = None):
        self.mode = mode
        self.index = ApproxPrefixIndex(capacity_blocks) if mode == "approximate" else None

    def matches(self, block_hashes: Sequence[int], views: Sequence[ReplicaView]) -> list[int]:
        if not block_hashes:
            return [0] * len(views)
        if self.index is None:
            return [int(v.cached_prefix_blocks(block_hashes)) for v in views]
        self.index.observe(views)
        return [self.index.match(v.replica_id, block_hashes) for v in views]

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
