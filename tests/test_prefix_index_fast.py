"""The router's run-based prefix index and the prefix-aware fast path change nothing but the cost.

References kept here or in the module: :class:`BlockLRU` (one entry per block), the original
per-replica index built on it, and the original ``prefix-aware`` decision (``load_guard`` then
``argmin_random`` with ``rng.integers``). The fast versions must give the same LRU state block for
block, the same matches and sizes, and the same routing decisions and random draws.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import RoutingRequest, make_router
from policies.routers import selection
from policies.routers.prefix_aware import PrefixAware, load_guard
from policies.routers.prefix_index import LLMD_DEFAULT_LRU_BLOCKS, ApproxPrefixIndex, BlockLRU, ChainLRU, PrefixMatcher
from tests.fakes import FakeView

# -- prompts with genuinely chained hashes ------------------------------------------------------


class Chains:
    """Block hashes as the engine makes them: hash ``i`` names the whole prefix through block ``i``
    (a trie of block contents; every distinct prefix gets its own integer)."""

    def __init__(self):
        self._ids: dict[tuple, int] = {}

    def hashes(self, contents) -> list[int]:
        out, parent = [], -1
        for c in contents:
            parent = self._ids.setdefault((parent, c), 1_000_003 * (len(self._ids) + 1))
            out.append(parent)
        return out


SYSTEM = [("sys", i) for i in range(3)]  # a system prompt every document starts with


def prompt(doc: int, shared: int, tail: int, uid: int) -> list:
    """``shared`` leading blocks of document ``doc`` (which starts with the system prompt), then
    ``tail`` blocks unique to request ``uid``."""
    return (SYSTEM + [("doc", doc, i) for i in range(14)])[:shared] + [("own", uid, t) for t in range(tail)]


requests_st = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 17), st.integers(0, 6)), min_size=1, max_size=10)


def build(reqs) -> tuple[list[list[int]], list[list[int]]]:
    """Hash lists of the requests, and queries: every request, every document, a few truncations."""
    ch = Chains()
    hs = [ch.hashes(prompt(d, s, t, uid)) for uid, (d, s, t) in enumerate(reqs)]
    docs = [ch.hashes(prompt(d, 17, 0, -1)) for d in range(3)]
    queries = hs + docs + [h[: len(h) // 2] for h in hs] + [ch.hashes(prompt(0, 17, 3, 999))]
    return hs, queries


def lru_order(lru: ChainLRU) -> list[int]:
    """The blocks of a ChainLRU, least recently used first (white box)."""
    out = []
    for hashes, a, b in lru._order:
        out.extend(hashes[i] for i in range(b - 1, a - 1, -1))
    return out


def assert_same_state(fast: ChainLRU, ref: BlockLRU, queries) -> None:
    assert lru_order(fast) == list(ref._d)  # the same blocks in the same LRU order
    assert len(fast) == len(ref)
    assert fast.runs() == sum(1 for _, a, b in fast._order if a < b)
    assert sorted(fast._starts) == sorted(h[a] for h, a, b in fast._order if a < b)
    assert fast._firsts == Counter(h[0] for h, a, b in fast._order if a == 0 < b)
    for q in queries:
        m = fast.leading_match(q)
        assert m == ref.leading_match(q) == ref.leading_match_scan(q)


# -- ChainLRU == BlockLRU -----------------------------------------------------------------------

op_st = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 9), st.booleans()),  # a request; same list object or a copy
    st.tuples(st.just("head"), st.integers(0, 9), st.integers(0, 20)),  # a leading part of a request
    st.tuples(st.just("resize"), st.integers(0, 40)),
    st.tuples(st.just("empty"), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(reqs=requests_st, cap=st.integers(0, 40), ops=st.lists(op_st, max_size=50))
def test_chain_lru_is_block_lru_block_for_block(reqs, cap, ops):
    """Shared prefixes, unique tails, re-inserts of the same request, tiny capacities (partial
    evictions of runs), resizes: the same LRU order, sizes and matches after every operation."""
    hs, queries = build(reqs)
    fast, ref = ChainLRU(cap), BlockLRU(cap)
    for op in ops:
        if op[0] == "insert":
            h = hs[op[1] % len(hs)]
            h = h if op[2] else list(h)
            fast.insert(h)
            ref.insert(h)
        elif op[0] == "head":
            h = hs[op[1] % len(hs)][: op[2]]
            fast.insert(h)
            ref.insert(h)
        elif op[0] == "resize":
            fast.resize(op[1])
            ref.resize(op[1])
        else:
            fast.insert([])
            ref.insert([])
        assert_same_state(fast, ref, queries)


def test_chain_lru_cuts_older_runs_at_the_head_and_evicts_tails():
    ch = Chains()
    a = ch.hashes(prompt(0, 10, 0, 0))  # 10 blocks of document 0
    b = ch.hashes(prompt(0, 6, 4, 1))  # its first 6 blocks, then 4 of its own
    lru = ChainLRU(14)
    lru.insert(a)
    lru.insert(b)  # a keeps only its blocks 6..9, b holds 10
    assert lru.runs() == 2 and len(lru) == 14
    assert lru.leading_match(a) == 10 and lru.leading_match(b) == 10
    lru.insert(ch.hashes(prompt(1, 5, 0, 2)))  # 5 blocks (the 3 system ones shared): 2 new
    # 16 > 14: a's remaining run is the oldest, it loses its last 2 blocks (a[8], a[9])
    assert lru.leading_match(a) == 8 and len(lru) == 14
    lru.resize(3)  # only the newest 3 blocks stay: the system prompt
    assert lru.leading_match(a) == 3 and lru.leading_match(b) == 3 and len(lru) == 3


def test_chain_lru_compacts_dead_runs():
    """Re-touching the same prompt forever must not grow the LRU's bookkeeping."""
    ch = Chains()
    h = ch.hashes(prompt(0, 8, 2, 0))
    lru = ChainLRU(100)
    for _ in range(1000):
        lru.insert(list(h))
    assert lru.runs() == 1 and len(lru._order) <= 130 and len(lru) == 10


# -- the per-replica index ------------------------------------------------------------------------


class RefIndex:
    """The original ApproxPrefixIndex: a BlockLRU per replica."""

    def __init__(self, capacity_blocks=None):
        self.capacity_blocks = capacity_blocks
        self._lru: dict[int, BlockLRU] = {}
        self._seen: dict[int, int] = {}

    def observe(self, views):
        if self.capacity_blocks is not None:
            return
        for v in views:
            cap = int(getattr(v, "num_total_blocks", 0) or 0)
            if cap > 0 and self._seen.get(v.replica_id) != cap:
                self._seen[v.replica_id] = cap
                if v.replica_id in self._lru:
                    self._lru[v.replica_id].resize(cap)

    def match(self, rid, hashes):
        lru = self._lru.get(rid)
        return 0 if lru is None else lru.leading_match(hashes)

    def matches(self, hashes, views):
        if not hashes:
            return [0] * len(views)
        self.observe(views)
        return [self.match(v.replica_id, hashes) for v in views]

    def insert(self, rid, hashes):
        if not hashes:
            return
        if rid not in self._lru:
            cap = self.capacity_blocks
            self._lru[rid] = BlockLRU(cap if cap is not None else self._seen.get(rid, LLMD_DEFAULT_LRU_BLOCKS))
        self._lru[rid].insert(hashes)

    def size(self, rid):
        lru = self._lru.get(rid)
        return 0 if lru is None else len(lru)

    def remove(self, rid):
        self._lru.pop(rid, None)
        self._seen.pop(rid, None)


index_op_st = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 3), st.integers(0, 9)),
    st.tuples(st.just("match"), st.lists(st.integers(0, 3), min_size=1, max_size=4), st.integers(0, 9)),
    st.tuples(st.just("capacity"), st.integers(0, 3), st.integers(0, 30)),  # a view reports a new cache size
    st.tuples(st.just("remove"), st.integers(0, 3), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(reqs=requests_st, fixed=st.sampled_from([None, 5, 25]), ops=st.lists(index_op_st, max_size=50))
def test_index_matches_per_block_reference(reqs, fixed, ops):
    hs, queries = build(reqs)
    fast, ref = PrefixMatcher("approximate", fixed), RefIndex(fixed)
    vs = {r: FakeView(r, num_total_blocks=12) for r in range(4)}
    for op in ops:
        if op[0] == "insert":
            fast.on_routed(hs[op[2] % len(hs)], op[1])
            ref.insert(op[1], hs[op[2] % len(hs)])
        elif op[0] == "match":
            q = queries[op[2] % len(queries)]
            sel = [vs[r] for r in op[1]]
            want = ref.matches(q, sel)
            assert fast.matches(q, sel) == want
            if q:
                held = fast.held_matches(q, sel)
                assert (held is None and not any(want)) or held == want
        elif op[0] == "capacity":
            vs[op[1]].num_total_blocks = op[2]
        else:
            fast.on_replica_removed(op[1])
            ref.remove(op[1])
        for r in range(4):
            assert fast.size(vs[r]) == ref.size(r)
    # the shared first-block counts agree with what the replicas hold
    holders = {h: sum(1 for lru in ref._lru.values() if h in lru) for h in {q[0] for q in queries if q}}
    assert fast.index._firsts == {h: c for h, c in holders.items() if c}


def test_index_remove_forgets_first_blocks():
    ch = Chains()
    h = ch.hashes(prompt(0, 4, 2, 0))
    idx = ApproxPrefixIndex(100)
    idx.insert(0, h)
    idx.insert(1, h)
    assert idx._firsts == {h[0]: 2}
    idx.remove(0)
    assert idx._firsts == {h[0]: 1} and idx.match(1, h) == 6 and idx.match(0, h) == 0
    idx.remove(1)
    assert idx._firsts == {}


# -- the prefix-aware decision ------------------------------------------------------------------


class RefPrefixAware:
    """The original prefix-aware rule on the per-block index, drawing with ``rng.integers``."""

    def __init__(self, rng, mode="approximate", cache_blocks=None, max_imbalance=8, min_match_ratio=0.1):
        self.rng, self.mode = rng, mode
        self.max_imbalance, self.min_match_ratio = max_imbalance, min_match_ratio
        self.index = RefIndex(cache_blocks) if mode == "approximate" else None
        self.last_decision = ""

    def _argmin(self, items):
        keys = [v.inflight_requests for v in items]
        tied = [v for v, k in zip(items, keys) if k == min(keys)]
        return tied[0] if len(tied) == 1 else tied[int(self.rng.integers(len(tied)))]

    def route(self, request, views):
        cands = load_guard(views, self.max_imbalance)
        total = len(request.block_hashes)
        if total:
            if self.index is None:
                matched = [v.cached_prefix_blocks(request.block_hashes) for v in cands]
            else:
                matched = self.index.matches(request.block_hashes, cands)
            best = max(matched)
            if best > 0 and best / total >= self.min_match_ratio:
                self.last_decision = "prefix"
                return self._argmin([v for v, m in zip(cands, matched) if m == best]).replica_id
        self.last_decision = "fallback"
        return self._argmin(cands).replica_id

    def on_routed(self, request, rid):
        if self.index is not None:
            self.index.insert(rid, request.block_hashes)


route_op_st = st.one_of(
    st.tuples(st.just("route"), st.integers(0, 9), st.lists(st.integers(0, 12), min_size=6, max_size=6)),
    st.tuples(st.just("remove"), st.integers(0, 5), st.just(())),
    st.tuples(st.just("capacity"), st.integers(0, 5), st.just(())),
)


@settings(max_examples=150, deadline=None)
@given(reqs=requests_st, ops=st.lists(route_op_st, min_size=8, max_size=60),
       params=st.fixed_dictionaries({
           "max_imbalance": st.sampled_from([None, 0, 2, 8]),
           "min_match_ratio": st.sampled_from([0.0, 0.1, 0.5]),
           "cache_blocks": st.sampled_from([None, 4, 30]),
       }), total_blocks=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_prefix_aware_decisions_equal_reference(reqs, ops, params, total_blocks, seed):
    hs, _ = build(reqs)
    fast = make_router("prefix-aware", rng=np.random.default_rng(seed), **params)
    ref = RefPrefixAware(np.random.default_rng(seed), **params)
    vs = [FakeView(r, num_total_blocks=total_blocks) for r in range(6)]
    next_id = 6
    for op in ops:
        if op[0] == "route":
            for v, x in zip(vs, op[2]):
                v.inflight_requests = x
            h = hs[op[1] % len(hs)]
            rq = RoutingRequest(request_id=0, arrival_s=0.0, prompt_tokens=16 * len(h) + 3, output_tokens=1,
                                block_hashes=list(h))
            got = fast.route(rq, vs, 0.0)
            assert got == ref.route(rq, vs) and fast.last_decision == ref.last_decision
            fast.on_routed(rq, got, 0.0)
            ref.on_routed(rq, got)
        elif op[0] == "remove" and len(vs) > 1:
            gone = vs.pop(op[1] % len(vs))
            fast.on_replica_removed(gone.replica_id)
            ref.index.remove(gone.replica_id)
            vs.append(FakeView(next_id, num_total_blocks=total_blocks))  # a replacement, cold
            next_id += 1
        elif op[0] == "capacity":
            vs[op[1] % len(vs)].num_total_blocks = max(1, total_blocks // 2)
    assert fast.rng.bit_generator.state == ref.rng.bit_generator.state  # the same draws


@settings(max_examples=60, deadline=None)
@given(cached=st.lists(st.integers(0, 8), min_size=5, max_size=5),
       inflight=st.lists(st.integers(0, 12), min_size=5, max_size=5),
       max_imbalance=st.sampled_from([None, 0, 3]), seed=st.integers(0, 100))
def test_prefix_aware_precise_equals_reference(cached, inflight, max_imbalance, seed):
    doc = list(range(100, 108))
    vs = [FakeView(i, cached=set(doc[:c]), inflight_requests=x) for i, (c, x) in enumerate(zip(cached, inflight))]
    fast = make_router("prefix-aware", rng=np.random.default_rng(seed), mode="precise", max_imbalance=max_imbalance)
    ref = RefPrefixAware(np.random.default_rng(seed), mode="precise", max_imbalance=max_imbalance)
    rq = RoutingRequest(request_id=0, arrival_s=0.0, prompt_tokens=128, output_tokens=1, block_hashes=doc)
    for _ in range(5):
        assert fast.route(rq, vs, 0.0) == ref.route(rq, vs) and fast.last_decision == ref.last_decision


# -- exact cheaper random draws -------------------------------------------------------------------


def test_randbelow_draws_exactly_what_numpy_draws():
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    pick = np.random.default_rng(1)
    for i in range(5000):
        n = int(pick.choice([1, 2, 3, 16, 17, 1000, 2**31 + 11, 2**32 - 1, 2**32, 2**40]))
        assert selection.randbelow(b, n) == int(a.integers(n))
        if i % 11 == 0:  # other numpy draws in between (the 32-bit half-word buffer) stay in step
            assert a.random() == b.random()
    assert a.bit_generator.state == b.bit_generator.state


def test_randbelow_falls_back_to_numpy(monkeypatch):
    monkeypatch.setattr(selection, "_fast", False)
    monkeypatch.setattr(selection, "_last", (None, None))
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    assert [selection.randbelow(b, 5) for _ in range(50)] == [int(a.integers(5)) for _ in range(50)]

    class Other(np.random.Generator):  # overrides integers(): randbelow must call it
        def integers(self, n, *args, **kwargs):
            return n - 1

    monkeypatch.setattr(selection, "_fast", True)
    o = Other(np.random.PCG64(3))
    assert [selection.randbelow(o, 5) for _ in range(3)] == [4, 4, 4]
    assert selection._last[0] is not o


# -- whole runs ----------------------------------------------------------------------------------


def _reference_prefix_aware(monkeypatch):
    """Make the registered ``prefix-aware`` router run the reference rule (per-block index)."""

    def route(self, request, views, now):
        if not hasattr(self, "_ref"):
            c = self._rule.cfg
            self._ref = RefPrefixAware(self.rng, c.mode, c.cache_blocks, c.max_imbalance, c.min_match_ratio)
        self._ref.rng = self.rng
        out = self._ref.route(request, views)
        self._rule.last_decision = self._ref.last_decision
        return out

    def on_routed(self, request, rid, now):
        self._ref.on_routed(request, rid)

    def on_replica_removed(self, rid):
        if hasattr(self, "_ref") and self._ref.index is not None:
            self._ref.index.remove(rid)

    monkeypatch.setattr(PrefixAware, "route", route)
    monkeypatch.setattr(PrefixAware, "on_routed", on_routed)
    monkeypatch.setattr(PrefixAware, "on_replica_removed", on_replica_removed)


def _run_scenario(router_params: dict, failures: bool):
    sc = {"seed": 5, "workload": {"synthetic": {
        "arrival": "poisson", "rate_per_s": 8.0, "num_requests": 300, "prompt_tokens": 300, "output_tokens": 40,
        "sessions": {"turns": 3, "think_time_s": {"dist": "fixed", "value": 1.0}, "user_tokens": 60},
        "shared_prefix": {"tenants": 2, "prompts_per_tenant": 3, "system_prompt_tokens": 500}}},
        "cluster": {"replicas": 3, "gpu": "L4", "engine": {"enable_prefix_caching": True, "max_model_len": 8192}},
        "router": {"policy": "prefix-aware", **router_params}}
    if failures:
        sc["cluster"]["failures"] = {"mtbf_s": 20.0, "on_failure": "retry", "max_retries": 3}
    import sim

    return sim.run(sc).requests


@pytest.mark.parametrize("router_params,failures", [
    ({}, False),
    ({"cache_blocks": 40}, True),  # a tiny router LRU: partial evictions all the time; retries re-route
    ({"max_imbalance": None, "min_match_ratio": 0.0}, True),
])
def test_whole_run_equals_reference_router(monkeypatch, router_params, failures):
    fast = _run_scenario(router_params, failures)
    with monkeypatch.context() as m:
        _reference_prefix_aware(m)
        ref = _run_scenario(router_params, failures)
    assert fast.replica.nunique() > 1
    import pandas as pd

    pd.testing.assert_frame_equal(fast, ref, check_exact=True)
