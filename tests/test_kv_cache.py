"""Block pool and KV cache manager: vLLM's allocation, prefix-hit and eviction semantics."""

from hypothesis import given, settings
from hypothesis import strategies as st

from sim.engine import EngineRequest
from sim.kv_cache import BlockPool, FreeBlockQueue, KVCacheManager
from traces.schema import engine_block_hashes


def _req(idx, prompt, out=4, hash_ids=None, hbs=16):
    hashes = engine_block_hashes(prompt, 16, hash_ids=hash_ids, hash_block_size=hbs, unique_key=idx)
    return EngineRequest(idx, 0.0, prompt, out, hashes)


def test_free_queue_order_ops():
    q = FreeBlockQueue(6, range(6))
    assert q.popleft() == 0
    q.remove(3)
    q.appendleft(3)
    q.append(0)
    assert q.to_list() == [3, 1, 2, 4, 5, 0]
    assert len(q) == 6


def test_null_block_reserved_and_usage():
    pool = BlockPool(11)
    assert pool.num_free_blocks == 10  # block 0 is the null block
    assert pool.usage() == 0.0
    blocks = pool.get_new_blocks(5)
    assert 0 not in blocks
    assert pool.usage() == 0.5


def test_prefix_hit_capped_to_recompute_last_token():
    kv = KVCacheManager(64, 16)
    a = _req(0, 64, hash_ids=[1, 2, 3, 4])
    assert kv.allocate_slots(a, 64)
    # Identical 64-token prompt: 4 full blocks cached, but the hit is capped at 63 tokens -> 3 blocks.
    b = _req(1, 64, hash_ids=[1, 2, 3, 4])
    blocks, n = kv.get_computed_blocks(b)
    assert n == 48 and blocks == a.blocks[:3]


def test_no_hits_with_caching_off():
    kv = KVCacheManager(64, 16, enable_caching=False)
    a = _req(0, 100, hash_ids=[1, 2, 3, 4, 5, 6, 7])
    assert kv.allocate_slots(a, 100)
    kv.free(a)
    b = _req(1, 100, hash_ids=[1, 2, 3, 4, 5, 6, 7])
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.pool.cached == {}


def test_freed_blocks_stay_cached_and_hit_takes_them_off_free_list():
    kv = KVCacheManager(32, 16)
    a = _req(0, 80, hash_ids=[7, 8, 9, 10, 11])
    assert kv.allocate_slots(a, 80)
    held = list(a.blocks)
    kv.free(a)
    assert kv.num_free_blocks == 31  # cached blocks count as free
    b = _req(1, 80, hash_ids=[7, 8, 9, 10, 11])
    hit, n = kv.get_computed_blocks(b)
    assert n == 64 and hit == held[:4]
    assert kv.allocate_slots(b, 16, hit)
    # 4 touched cached blocks + 1 new block left the free queue.
    assert kv.num_free_blocks == 31 - 5
    kv.pool.check_invariants()


def test_eviction_is_lru_tail_first():
    # 1 null + 6 usable blocks; request A fills 3 blocks, B fills 3 blocks, both freed (A first).
    kv = KVCacheManager(7, 16)
    a = _req(0, 48, hash_ids=[1, 2, 3])
    b = _req(1, 48, hash_ids=[4, 5, 6])
    assert kv.allocate_slots(a, 48) and kv.allocate_slots(b, 48)
    ablocks, bblocks = list(a.blocks), list(b.blocks)
    kv.free(a)
    kv.free(b)
    # Free queue: A's blocks tail first, then B's tail first.
    assert kv.pool.free_queue.to_list() == ablocks[::-1] + bblocks[::-1]
    # Allocating 1 block evicts A's deepest block first: A's prefix [1, 2] still hits.
    c = _req(2, 16, hash_ids=[99])
    assert kv.allocate_slots(c, 16)
    a2 = _req(3, 48, hash_ids=[1, 2, 3])
    _, n = kv.get_computed_blocks(a2)
    assert n == 32
    assert kv.pool.evictions == 1


def test_uncached_partial_blocks_are_reused_first():
    kv = KVCacheManager(10, 16)
    a = _req(0, 20, hash_ids=[1, 2])  # 1 full block (cached) + 1 partial (no hash)
    assert kv.allocate_slots(a, 20)
    full, partial = a.blocks
    kv.free(a)
    q = kv.pool.free_queue.to_list()
    assert q[0] == partial and q[-1] == full


def test_allocation_fails_without_side_effects():
    kv = KVCacheManager(5, 16)  # 4 usable blocks
    a = _req(0, 64)
    assert kv.allocate_slots(a, 64)
    b = _req(1, 16)
    assert not kv.allocate_slots(b, 16)
    assert b.blocks == [] and kv.num_free_blocks == 0


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 200), st.integers(0, 3), st.booleans()), min_size=1, max_size=40),
    st.integers(8, 60),
)
def test_random_alloc_free_never_overallocates(ops, num_blocks):
    """Property: under any alloc/free sequence, block accounting stays exact."""
    kv = KVCacheManager(num_blocks, 16)
    live = []
    for k, (prompt, family, free_one) in enumerate(ops):
        if free_one and live:
            kv.free(live.pop(0))
        r = _req(k, prompt, hash_ids=[family * 100 + j for j in range(prompt // 16 + 1)])
        hit, n = kv.get_computed_blocks(r)
        before = kv.num_free_blocks
        if kv.allocate_slots(r, prompt - n, hit):
            r.num_computed_tokens = n + (prompt - n)
            live.append(r)
            assert len(r.blocks) == -(-prompt // 16)
        else:
            assert kv.num_free_blocks == before
        kv.pool.check_invariants()
        held = sum(len(x.blocks) for x in live)
        assert held >= num_blocks - 1 - kv.num_free_blocks  # shared blocks counted once in the pool
        assert kv.num_free_blocks >= 0
    for r in live:
        kv.free(r)
    kv.pool.check_invariants()
    assert kv.num_free_blocks == num_blocks - 1
