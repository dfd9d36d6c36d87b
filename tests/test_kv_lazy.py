"""A lazy block pool (no per-block state for request-exclusive blocks) is the reference pool, seen
from outside.

Why: ``BlockPool(lazy_exclusive=True)`` skips the ref-count and hash-mark writes for blocks at
positions past a request's shared prefix and keeps counters instead (the unhashed prefix of the
free queue, the free blocks in the hash map, the number of unique marks). These tests drive a lazy
and a fully tracked engine through the same random workloads -- shared prefixes of several
lengths, unique tails, preemptions (which put a request's unique blocks into the hash map),
prefix hits on free and held blocks, evictions -- and require after every step the same free queue
order, hash map (with its iteration order), evictions, cached-hash count, block tables and plans.
"""

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from sim.engine import Engine, EngineConfig, EngineRequest
from sim.kv_cache import BlockPool, unique_hash_base


def _request(idx: int, prompt: int, out: int, family: int, shared: int, priority: int) -> EngineRequest:
    """Leading ``shared`` blocks from ``family``'s chain (shared with its other requests), the rest
    unique ids, as sim.kv_cache.PromptBlockHashes builds them."""
    n_full = prompt // 16
    s = min(shared, n_full)
    base = unique_hash_base(idx)
    hashes = [family * 10_000 + j for j in range(s)] + list(range(base - s, base - n_full, -1))
    return EngineRequest(idx, 0.0, prompt, out, hashes, priority, s)


def _pool_state(engine: Engine):
    pool = engine.kv.pool
    return (pool.free_queue.to_list(), [(h, v if isinstance(v, int) else list(v)) for h, v in pool.cached.items()],
            pool.evictions, pool.num_cached_hashes(), pool.num_unhashed_free, pool.num_mapped_free,
            engine.kv.prefix_hits, engine.kv.prefix_queries)


def _lockstep(cfg: EngineConfig, pending: list[tuple]) -> tuple[int, int, int]:
    """Run a lazy and a fully tracked engine side by side; compare them after every schedule and
    update. Returns (preemptions, evictions, prefix-hit tokens) of the run."""
    lazy, ref = Engine(cfg, lazy_exclusive=True), Engine(cfg, lazy_exclusive=False)
    pending = sorted(pending)
    t, step, preemptions = 0.0, 0, 0
    while pending or lazy.has_work():
        while pending and (pending[0][0] <= step or not lazy.has_work()):
            _, i, prompt, out, fam, shared, prio = pending.pop(0)
            for e in (lazy, ref):
                e.add_request(_request(i, prompt, out, fam, shared, prio), t)
        pl, pr = lazy.schedule(t), ref.schedule(t)
        assert [(r.idx, n) for r, n in zip(pl.requests, pl.num_tokens)] == \
               [(r.idx, n) for r, n in zip(pr.requests, pr.num_tokens)]
        assert [r.idx for r in pl.preempted] == [r.idx for r in pr.preempted]
        preemptions += len(pl.preempted)
        assert _pool_state(lazy) == _pool_state(ref)
        assert [r.blocks for r in lazy.running] == [r.blocks for r in ref.running]
        t += 0.01
        fl, fr = lazy.update(pl, t), ref.update(pr, t)
        assert [r.idx for r in fl] == [r.idx for r in fr]
        assert _pool_state(lazy) == _pool_state(ref)
        lazy.kv.pool.check_invariants()
        ref.kv.pool.check_invariants()
        step += 1
        assert step < 50_000
    assert lazy.kv.num_free_blocks == cfg.num_gpu_blocks - 1
    return preemptions, lazy.kv.pool.evictions, lazy.kv.prefix_hits


@settings(max_examples=150, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 200), st.integers(1, 40), st.integers(0, 3), st.integers(0, 14),
                            st.integers(0, 2), st.integers(0, 6)), min_size=1, max_size=30),
    blocks=st.integers(17, 50),
    budget=st.integers(16, 256),
    max_seqs=st.integers(1, 12),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
)
def test_lazy_pool_matches_fully_tracked_pool(reqs, blocks, budget, max_seqs, policy, caching):
    cfg = EngineConfig(num_gpu_blocks=blocks, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                       scheduling_policy=policy, enable_prefix_caching=caching, max_model_len=(blocks - 1) * 16)
    pending = [(at, i, p, o, fam, sh, pr) for i, (p, o, fam, sh, pr, at) in enumerate(reqs) if p + o <= cfg.max_model_len]
    preemptions, evictions, _ = _lockstep(cfg, pending)
    event(f"preemptions: {'some' if preemptions else 'none'}; evictions: {'some' if evictions else 'none'}")


@pytest.mark.parametrize("seed", range(6))
def test_lazy_pool_matches_under_pressure(seed):
    """Larger seeded workloads that surely preempt, evict cached blocks and hit prefixes."""
    rng = np.random.default_rng(seed)
    cfg = EngineConfig(num_gpu_blocks=60, max_num_batched_tokens=128, max_num_seqs=8,
                       scheduling_policy="priority" if seed % 2 else "fcfs", max_model_len=59 * 16)
    pending = [(int(rng.integers(0, 400)), i, int(rng.integers(20, 300)), int(rng.integers(1, 60)),
                int(rng.integers(0, 4)), int(rng.integers(0, 16)), int(rng.integers(0, 3))) for i in range(120)]
    preemptions, evictions, hits = _lockstep(cfg, pending)
    assert preemptions > 0 and evictions > 0 and hits > 0  # the paths under test were taken


def test_lazy_pool_skips_exclusive_blocks_and_counts_them():
    """Exclusive blocks get no per-block writes, yet evictions and cached-hash counts are exact."""
    pool = BlockPool(10)
    out = pool.get_new_blocks(6, 4, [101], num_exclusive=5)  # 1 shared, 4 unique, 1 unhashed tail
    assert pool.block_hash[out[0]] == 101 and pool.ref_cnt[out[0]] == 1
    assert all(pool.block_hash[b] is None and pool.ref_cnt[b] == 0 for b in out[1:])  # untouched
    assert pool.num_cached_hashes() == 5
    pool.free_blocks(out[::-1], exclusive_from=1, num_hashed=5, untracked=True)
    # The unhashed tail went to the front, the four unique ones and the shared one to the back.
    assert pool.num_unhashed_free == 3 + 1 and pool.free_queue.to_list()[:4] == [out[5], 7, 8, 9]
    assert pool.num_mapped_free == 1  # out[0]
    pool.check_invariants()
    again = pool.get_new_blocks(9)  # everything: evicts 4 unique marks and the mapped block
    assert pool.evictions == 5 and pool.num_cached_hashes() == 0 and not pool.cached
    pool.check_invariants()
    assert len(again) == 9
