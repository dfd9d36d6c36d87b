"""Fast paths of the routing hot path give exactly the reference's choices and rng draws."""

from __future__ import annotations

import numpy as np

from policies.routers import selection
from policies.routers.prefix_aware import PrefixParams, PrefixRule, load_guard
from policies.routers.prefix_index import BlockLRU, ChainLRU


def test_drawer_draws_exactly_what_numpy_draws():
    a, b = np.random.default_rng(11), np.random.default_rng(11)
    draw = selection.drawer(b)
    pick = np.random.default_rng(2)
    for i in range(3000):
        n = int(pick.choice([1, 2, 3, 7, 16, 1000, 2**31 + 11, 2**32 - 1, 2**32, 2**40]))
        assert draw(n) == int(a.integers(n))
        if i % 13 == 0:  # numpy draws in between stay in step (the buffered half word)
            assert a.random() == b.random()
    assert a.bit_generator.state == b.bit_generator.state


def test_drawer_falls_back_to_numpy(monkeypatch):
    monkeypatch.setattr(selection, "_fast", False)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    draw = selection.drawer(b)
    assert [draw(5) for _ in range(50)] == [int(a.integers(5)) for _ in range(50)]


class _View:
    def __init__(self, rid: int, inflight: int):
        self.replica_id = rid
        self.inflight_requests = inflight
        self.num_total_blocks = 1000


def _reference_fallback(views, max_imbalance, rng):
    cands = load_guard(views, max_imbalance)
    return selection.argmin_random(cands, lambda v: v.inflight_requests, rng).replica_id


def test_fallback_pick_equals_argmin_random():
    gen = np.random.default_rng(5)
    for max_imbalance in (8, 0, None):
        rule = PrefixRule(PrefixParams(max_imbalance=max_imbalance), None)
        rule.rng = np.random.default_rng(9)
        ref_rng = np.random.default_rng(9)
        for _ in range(2000):
            n = int(gen.integers(1, 20))
            views = tuple(_View(i, int(x)) for i, x in enumerate(gen.integers(0, 12, size=n)))
            assert rule.route(_Req(()), views) == _reference_fallback(views, max_imbalance, ref_rng)
            assert rule.last_decision == "fallback"
        assert rule.rng.bit_generator.state == ref_rng.bit_generator.state


class _Req:
    def __init__(self, hashes):
        self.block_hashes = hashes


def test_chain_lru_insert_with_inline_eviction_matches_block_lru():
    gen = np.random.default_rng(4)
    for cap in (0, 1, 7, 40, 300):
        fast, ref = ChainLRU(cap), BlockLRU(cap)
        chains = [list(range(c * 1000, c * 1000 + 60)) for c in range(6)]
        for _ in range(400):
            c = chains[int(gen.integers(len(chains)))]
            h = c[: int(gen.integers(0, len(c) + 1))]
            fast.insert(h)
            ref.insert(h)
            assert len(fast) == len(ref)
            for q in chains:
                assert fast.leading_match(q) == ref.leading_match(q)
