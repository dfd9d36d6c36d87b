"""The fused registration in ``BlockPool.get_new_blocks`` equals popping first, registering after.

Why: ``get_new_blocks(n, num_unique, shared_hashes)`` evicts, pops and registers in one walk over
the blocks; vLLM pops (evicting) first and registers later. These tests drive two pools through
the same random allocate / register / free sequence, one fused and one in the reference order,
and require identical state after every operation: ref counts, block hashes, free-queue order,
evictions and the hash map with its iteration order (a multi-block entry's first block is the one
a prefix hit takes).
"""

import numpy as np
import pytest

from sim.kv_cache import UNIQUE, BlockPool


def _state(pool: BlockPool):
    return (list(pool.ref_cnt), list(pool.block_hash), pool.free_queue.to_list(), pool.evictions,
            [(h, v if isinstance(v, int) else list(v)) for h, v in pool.cached.items()],
            pool.num_cached_hashes())


def _reference(pool: BlockPool, n: int, num_unique: int, hashes: list[int]) -> list[int]:
    out = pool.get_new_blocks(n)
    pool.cache_blocks(out[:len(hashes)], hashes)
    pool.mark_unique(out[len(hashes):len(hashes) + num_unique])
    return out


@pytest.mark.parametrize("seed", range(12))
def test_fused_registration_matches_reference(seed):
    rng = np.random.default_rng(seed)
    fused, ref = BlockPool(64), BlockPool(64)
    held: list[list[int]] = []
    for _ in range(300):
        free = fused.num_free_blocks
        if held and (free < 8 or rng.random() < 0.4):
            blocks = held.pop(int(rng.integers(len(held))))
            for p in (fused, ref):
                p.free_blocks(blocks[::-1])
        else:
            hit = ref.get_cached_block(int(rng.integers(0, 40)))
            hits = [hit] if hit is not None and (free > 1 or ref.ref_cnt[hit]) else []
            for p in (fused, ref):
                p.touch(hits)  # a prefix hit now and then: dead entries in the free queue
            n = int(rng.integers(1, min(fused.num_free_blocks, 12) + 1))
            k = int(rng.integers(0, n + 1))
            nu = int(rng.integers(0, n - k + 1))
            # A small hash space: hashes already in the map (fallback path), duplicates across
            # allocations, and evictions of mapped blocks all happen.
            hashes = list(dict.fromkeys(int(h) for h in rng.integers(0, 40, size=k)))
            a = fused.get_new_blocks(n, nu, hashes)
            b = _reference(ref, n, nu, hashes)
            assert a == b
            held.append(hits + a)
        assert _state(fused) == _state(ref)
        fused.check_invariants()


def test_fused_registration_marks():
    pool = BlockPool(16)
    out = pool.get_new_blocks(6, 2, [101, 102, 103])
    bh = pool.block_hash
    assert [bh[b] for b in out] == [101, 102, 103, UNIQUE, UNIQUE, None]
    assert pool.cached == {101: out[0], 102: out[1], 103: out[2]}
    assert pool.num_cached_hashes() == 5
