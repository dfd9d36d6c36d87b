"""Routers' decision rules on hand-built replica states (no simulator)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.fakes import FakeView  # noqa: E402
from hypothesis import given, settings
from hypothesis import strategies as st

from policies import ReplicaState, RoutingRequest, make_router
from policies.routers.dynamo import softmax_sample
from policies.routers.prefix_index import BlockLRU
from policies.routers.sticky import stable_hash64
from sim.errors import ConfigError




def chain(prefix: int, n: int, start: int = 0) -> list[int]:
    """Block hashes of a prompt: ``n`` blocks of "document" ``prefix`` (equal prefixes share hashes)."""
    return [prefix * 1_000_000 + i for i in range(start, start + n)]


_rid = iter(range(10**9))


def req(hashes=(), session=None, prompt_tokens=None, **kw) -> RoutingRequest:
    hashes = list(hashes)
    pt = prompt_tokens if prompt_tokens is not None else max(1, 16 * len(hashes))
    return RoutingRequest(request_id=next(_rid), arrival_s=0.0, prompt_tokens=pt, output_tokens=10,
                          block_hashes=hashes, session_id=session, **kw)


def views(n, **kw) -> list[FakeView]:
    return [FakeView(i, **kw) for i in range(n)]


def rng(seed=0):
    return np.random.default_rng(seed)


# -- simple routers -------------------------------------------------------------------------------

def test_round_robin_cycles_in_id_order():
    r = make_router("round-robin")
    vs = views(3)
    assert [r.route(req(), vs, 0) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_random_is_seeded():
    vs = views(5)
    r1, r2 = make_router("random", rng=rng(3)), make_router("random", rng=rng(3))
    picks = [r1.route(req(), vs, 0) for _ in range(50)]
    assert picks == [r2.route(req(), vs, 0) for _ in range(50)]
    assert set(picks) == {0, 1, 2, 3, 4}


def test_least_kv_prefers_lowest_usage_then_fewest_inflight():
    r = make_router("least-kv", rng=rng())
    vs = [FakeView(0, kv_usage=0.5), FakeView(1, kv_usage=0.2, inflight_requests=9), FakeView(2, kv_usage=0.2, inflight_requests=3)]
    assert r.route(req(), vs, 0) == 2
    vs[2].kv_usage = 0.9
    assert r.route(req(), vs, 0) == 1


def test_least_kv_exact_ties_are_random():
    r = make_router("least-kv", rng=rng())
    vs = views(3)
    assert set(r.route(req(), vs, 0) for _ in range(200)) == {0, 1, 2}


def test_power_of_two_never_picks_the_most_loaded_of_distinct_loads():
    r = make_router("power-of-two", rng=rng(1))
    vs = [FakeView(i, inflight_requests=load) for i, load in enumerate([5, 1, 9, 3])]
    picks = Counter(r.route(req(), vs, 0) for _ in range(2000))
    assert picks[2] == 0  # any pair containing replica 2 has a less loaded partner
    assert picks[1] > picks[3] > picks[0] > 0  # P(least) = 1/2, next 1/3, next 1/6
    assert abs(picks[1] / 2000 - 0.5) < 0.05


def test_power_of_two_load_metric_and_single_replica():
    r = make_router("power-of-two", rng=rng(), load="waiting")
    vs = [FakeView(0, num_waiting=5, inflight_requests=0), FakeView(1, num_waiting=0, inflight_requests=50)]
    assert all(r.route(req(), vs, 0) == 1 for _ in range(20))
    assert r.route(req(), [FakeView(7)], 0) == 7


# -- sticky (consistent hashing with bounded loads) -----------------------------------------------

def test_sticky_same_session_same_replica_while_under_capacity():
    r = make_router("sticky", rng=rng())
    vs = views(4)
    first = r.route(req(session="alice"), vs, 0)
    for _ in range(20):  # lightly loaded cluster: never reaches capacity
        assert r.route(req(session="alice"), vs, 0) == first
    others = {r.route(req(session=f"s{i}"), vs, 0) for i in range(200)}
    assert others == {0, 1, 2, 3}  # 160 vnodes spread sessions over all replicas


def test_sticky_capacity_formula_and_spill():
    r = make_router("sticky", rng=rng(), eps=0.25)
    vs = views(4)
    home = r.route(req(session="bob"), vs, 0)
    # m = 12 in flight + 1 new = 13 -> C = ceil(1.25 * 13 / 4) = ceil(4.0625) = 5
    for v in vs:
        v.inflight_requests = 3
    vs[home].inflight_requests = 3
    assert r.capacity(vs) == 5
    assert r.route(req(session="bob"), vs, 0) == home  # 3 < 5
    vs[home].inflight_requests = 5
    # m = 15 -> C = ceil(1.25 * 15 / 4) = ceil(4.6875) = 5: home is full, walk clockwise
    assert r.capacity(vs) == 5
    spill = r.route(req(session="bob"), vs, 0)
    assert spill != home
    expected = next(rid for rid in r.ring.walk(stable_hash64("bob")) if vs[rid].inflight_requests < 5)
    assert spill == expected
    vs[home].inflight_requests = 0  # load went away: the session comes home
    assert r.route(req(session="bob"), vs, 0) == home


def test_sticky_without_session_goes_least_loaded():
    r = make_router("sticky", rng=rng())
    vs = [FakeView(0, inflight_requests=4), FakeView(1, inflight_requests=1), FakeView(2, inflight_requests=2)]
    assert all(r.route(req(), vs, 0) == 1 for _ in range(10))


def test_sticky_ring_is_consistent_when_a_replica_leaves():
    r = make_router("sticky", rng=rng())
    vs = views(5)
    before = {f"s{i}": r.route(req(session=f"s{i}"), vs, 0) for i in range(300)}
    gone = 3
    rest = [v for v in vs if v.replica_id != gone]
    after = {s: r.route(req(session=s), rest, 0) for s in before}
    moved = [s for s in before if before[s] != after[s]]
    assert all(before[s] == gone for s in moved)  # only the departed replica's sessions move
    assert len(moved) == sum(1 for s in before if before[s] == gone)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 6),
    eps=st.sampled_from([0.05, 0.25, 1.0]),
    ops=st.lists(st.tuples(st.integers(0, 7), st.booleans()), min_size=1, max_size=150),
)
def test_sticky_bounded_load_never_exceeds_capacity(n, eps, ops):
    """Property: whatever the arrival/finish sequence and session skew, a request is only ever placed
    on a replica whose load stays <= C = ceil((1+eps) m / n) after placing it."""
    r = make_router("sticky", rng=rng(), eps=eps)
    vs = views(n)
    inflight: list[int] = []  # replica of each in-flight request
    for session, finish in ops:
        if finish and inflight:
            rid = inflight.pop(0)
            vs[rid].inflight_requests -= 1
            continue
        m = sum(v.inflight_requests for v in vs) + 1
        cap = math.ceil((1 + eps) * m / n - 1e-9)
        rid = r.route(req(session=f"user-{session % 3 if session < 6 else session}"), vs, 0)
        vs[rid].inflight_requests += 1
        inflight.append(rid)
        assert vs[rid].inflight_requests <= cap
        assert r.last_capacity == cap


# -- prefix index -------------------------------------------------------------------------------

def test_block_lru_evicts_least_recent_and_tail_first():
    lru = BlockLRU(capacity=6)
    a, b = chain(1, 4), chain(2, 4)
    lru.insert(a)
    lru.insert(b)  # 8 blocks > 6: the two least recent go, i.e. a's tail
    assert lru.leading_match(a) == 2 and lru.leading_match(b) == 4
    lru.insert(a[:2])  # touch a's head: now b's tail is the oldest
    lru.insert(chain(3, 2))
    assert lru.leading_match(b) == 2 and lru.leading_match(a) == 2 and lru.leading_match(chain(3, 2)) == 2
    assert len(lru) == 6


@settings(max_examples=80, deadline=None)
@given(
    cap=st.integers(1, 40),
    prompts=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 12)), min_size=1, max_size=40),
)
def test_block_lru_binary_search_equals_scan(cap, prompts):
    """Chains inserted tail-first keep held blocks a leading run, so binary search is exact."""
    lru = BlockLRU(cap)
    for doc, n in prompts:
        lru.insert(chain(doc, n))
        for d in range(5):
            q = chain(d, 14)
            assert lru.leading_match(q) == lru.leading_match_scan(q)


# -- prefix-aware -------------------------------------------------------------------------------

def test_prefix_aware_approximate_follows_routing_history():
    r = make_router("prefix-aware", rng=rng())
    vs = views(4)
    doc = chain(7, 10)
    first = r.route(req(doc), vs, 0)
    assert r.last_decision == "fallback"
    r.on_routed(req(doc), first, 0)
    for _ in range(5):
        assert r.route(req(doc[:6] + chain(99, 3)), vs, 0) == first
        assert r.last_decision == "prefix"


def test_prefix_aware_approximate_lru_sized_like_the_cache_evicts():
    r = make_router("prefix-aware", rng=rng())
    vs = views(2, num_total_blocks=8)
    a, b = chain(1, 8), chain(2, 8)
    r.route(req(a), vs, 0)
    r.on_routed(req(a), 0, 0)
    r.route(req(b), vs, 0)
    r.on_routed(req(b), 0, 0)  # replica 0's 8-block LRU now holds only b
    assert r._rule.matcher.index.match(0, a) == 0
    vs[0].inflight_requests = 0
    vs[1].inflight_requests = 1
    assert r.route(req(a), vs, 0) == 0 and r.last_decision == "fallback"  # least loaded, not "cached"
    assert r.route(req(b), vs, 0) == 0 and r.last_decision == "prefix"


def test_prefix_aware_cache_blocks_override():
    r = make_router("prefix-aware", rng=rng(), cache_blocks=3)
    vs = views(2)
    r.route(req(chain(1, 5)), vs, 0)
    r.on_routed(req(chain(1, 5)), 1, 0)
    assert r._rule.matcher.index.match(1, chain(1, 5)) == 3


def test_prefix_aware_precise_reads_true_cache_and_breaks_ties_by_load():
    r = make_router("prefix-aware", rng=rng(), mode="precise")
    doc = chain(5, 10)
    vs = [FakeView(0, cached=set(doc[:3])), FakeView(1, cached=set(doc[:8]), inflight_requests=4),
          FakeView(2, cached=set(doc[:8]), inflight_requests=2)]
    assert r.route(req(doc), vs, 0) == 2
    r.on_routed(req(doc), 2, 0)  # precise mode keeps no history
    vs[2].cached = set()
    assert r.route(req(doc), vs, 0) == 1


def test_prefix_aware_load_guard_and_min_match_ratio():
    doc = chain(5, 10)
    vs = [FakeView(0, cached=set(doc), inflight_requests=20), FakeView(1, inflight_requests=11), FakeView(2, inflight_requests=12)]
    r = make_router("prefix-aware", rng=rng(), mode="precise")  # max_imbalance 8
    assert r.route(req(doc), vs, 0) == 1 and r.last_decision == "fallback"  # 20 > 11 + 8
    vs[0].inflight_requests = 19
    assert r.route(req(doc), vs, 0) == 0 and r.last_decision == "prefix"
    vs[0].inflight_requests = 100
    r_off = make_router("prefix-aware", rng=rng(), mode="precise", max_imbalance=None)
    assert r_off.route(req(doc), vs, 0) == 0
    vs[0].cached = set(doc[:2])  # 2/10 = 0.2 < 0.5
    r_ratio = make_router("prefix-aware", rng=rng(), mode="precise", max_imbalance=None, min_match_ratio=0.5)
    assert r_ratio.route(req(doc), vs, 0) == 1 and r_ratio.last_decision == "fallback"


def test_prefix_aware_new_replica_starts_cold_and_removed_state_is_dropped():
    r = make_router("prefix-aware", rng=rng())
    vs = views(2)
    doc = chain(3, 6)
    r.route(req(doc), vs, 0)
    r.on_routed(req(doc), 1, 0)
    r.on_replica_removed(1)
    assert r._rule.matcher.index.match(1, doc) == 0


# -- hybrid: seed -------------------------------------------------------------------------------

def test_seed_sticky_fast_path_then_prefix_when_cold_or_unhealthy():
    r = make_router("hybrid", rng=rng(), style="seed", mode="precise", hit_threshold=0.5)
    doc = chain(1, 10)
    vs = [FakeView(0, cached=set(doc[:9])), FakeView(1, cached=set(doc[:6])), FakeView(2)]
    # First turn: no sticky replica yet -> prefix match picks the best cache.
    assert r.route(req(doc, session="s"), vs, 0) == 0 and r.last_decision == "prefix"
    r.on_routed(req(doc, session="s"), 1, 0)  # pretend it went to replica 1 (e.g. chosen elsewhere)
    # Sticky replica 1 has 6/10 >= 0.5: fast path, although replica 0 has more.
    assert r.route(req(doc, session="s"), vs, 0) == 1 and r.last_decision == "sticky"
    vs[1].cached = set(doc[:4])  # 0.4 < 0.5: not worth sticking, prefix match instead
    assert r.route(req(doc, session="s"), vs, 0) == 0 and r.last_decision == "prefix"
    vs[1].cached = set(doc)
    vs[1].inflight_requests = 20  # overloaded (20 > 0 + 8): unhealthy
    assert r.route(req(doc, session="s"), vs, 0) == 0
    vs[1].inflight_requests = 0
    assert r.route(req(doc, session="s"), [vs[0], vs[2]], 0) == 0  # sticky replica not serving


def test_seed_approximate_session_turns_stick():
    r = make_router("hybrid", rng=rng(), style="seed")
    vs = views(3)
    turn = chain(4, 5)
    rid = r.route(req(turn, session="u"), vs, 0)
    r.on_routed(req(turn, session="u"), rid, 0)
    for k in range(3):
        turn = turn + chain(40 + k, 3)  # the next turn extends the conversation
        vs[rid].inflight_requests = 0
        assert r.route(req(turn, session="u"), vs, 0) == rid
        assert r.last_decision == "sticky"
        r.on_routed(req(turn, session="u"), rid, 0)


# -- hybrid: llm-d ------------------------------------------------------------------------------

def test_llmd_score_arithmetic_matches_hand_computation():
    r = make_router("hybrid", rng=rng(), style="llm-d", prefix_mode="precise")
    doc = chain(9, 10)
    vs = [
        FakeView(0, num_waiting=4, kv_usage=0.50, cached=set(doc[:10])),
        FakeView(1, num_waiting=0, kv_usage=0.20, cached=set(doc[:2])),
        FakeView(2, num_waiting=2, kv_usage=0.90, cached=set()),
    ]
    # queue: (4-q)/(4-0) -> 0, 1, 0.5 ; kv: 0.5, 0.8, 0.1 ; prefix: 1.0, 0.2, 0
    expected = {0: 2 * 0 + 2 * 0.5 + 3 * 1.0, 1: 2 * 1 + 2 * 0.8 + 3 * 0.2, 2: 2 * 0.5 + 2 * 0.1 + 0}
    choice = r.route(req(doc), vs, 0)
    assert r.last_scores == pytest.approx(expected)
    assert expected == pytest.approx({0: 4.0, 1: 4.2, 2: 1.2})
    assert choice == 1  # the idle, emptier replica beats the full prefix hit at these weights
    r_prefix_heavy = make_router("hybrid", rng=rng(), style="llm-d", prefix_mode="precise",
                                 weights={"queue": 2, "kv": 2, "prefix": 5})
    assert r_prefix_heavy.route(req(doc), vs, 0) == 0  # 6.0 vs 4.6


def test_llmd_picks_max_and_shuffles_ties():
    r = make_router("hybrid", rng=rng(), style="llm-d", prefix_mode="precise")
    doc = chain(9, 10)
    vs = [FakeView(0, num_waiting=4, kv_usage=0.50, cached=set(doc)),
          FakeView(1, num_waiting=0, kv_usage=0.20, cached=set(doc[:2]))]
    assert r.route(req(doc), vs, 0) == max(r.last_scores, key=r.last_scores.get)
    same = views(3)
    assert set(r.route(req(doc), same, 0) for _ in range(100)) == {0, 1, 2}  # all queue=1, kv=1, prefix=0


def test_llmd_queue_scorer_all_equal_is_one_and_custom_weights():
    r = make_router("hybrid", rng=rng(), style="llm-d", weights={"queue": 1.0, "token-load": 1.0})
    vs = [FakeView(0, num_waiting=3, inflight_tokens=2_097_152), FakeView(1, num_waiting=3)]
    r.route(req(), vs, 0)
    assert r.last_scores == pytest.approx({0: 1.0 + 0.5, 1: 2.0})


# -- hybrid: sglang -----------------------------------------------------------------------------

def test_sglang_imbalance_switch():
    r = make_router("hybrid", rng=rng(), style="sglang", prefix_mode="precise")
    doc = chain(2, 10)
    vs = [FakeView(0, inflight_requests=100, cached=set(doc)), FakeView(1, inflight_requests=10)]
    assert r.is_imbalanced(vs)  # 90 > 64 and 100 > 15
    assert r.route(req(doc), vs, 0) == 1 and r.last_decision == "imbalanced"
    vs[0].inflight_requests = 70  # 60 <= 64: balanced, cache wins
    assert not r.is_imbalanced(vs)
    assert r.route(req(doc), vs, 0) == 0 and r.last_decision == "cache"
    vs[0].inflight_requests, vs[1].inflight_requests = 300, 210  # 90 > 64 but 300 <= 315
    assert not r.is_imbalanced(vs)
    assert r.route(req(doc), vs, 0) == 0


def test_sglang_cache_threshold_is_strict_and_smallest_tenant_fallback():
    r = make_router("hybrid", rng=rng(), style="sglang")
    vs = views(3)
    big, small = chain(1, 20), chain(2, 3)
    for h, rid in ((big, 0), (small, 1)):
        r.route(req(h), vs, 0)
        r.on_routed(req(h), rid, 0)
    q = big[:3] + chain(50, 7)  # 3/10 = 0.3, not > 0.3
    assert r.route(req(q), vs, 0) == 2 and r.last_decision == "smallest-tenant"  # replica 2 holds 0 blocks
    r.on_routed(req(q), 2, 0)  # replica 2 now holds 10 blocks, replica 1 holds 3
    q2 = big[:4] + chain(51, 6)  # 0.4 > 0.3 -> cache
    assert r.route(req(q2), vs, 0) == 0 and r.last_decision == "cache"
    assert r.route(req(chain(77, 5)), vs, 0) == 1  # fewest blocks in the tree


# -- hybrid: dynamo -----------------------------------------------------------------------------

def test_dynamo_logits_and_argmin():
    r = make_router("hybrid", rng=rng(), style="dynamo", overlap_score_weight=1.0)
    doc = chain(3, 10)
    vs = [FakeView(0, cached=set(doc[:8])), FakeView(1, cached=set(doc[:2]))]
    other = req(chain(8, 5), prompt_tokens=80)
    r.route(other, vs, 0)
    r.on_routed(other, 0, 0)  # replica 0 has 5 active blocks
    rq = req(doc, prompt_tokens=168)  # 10 full blocks + a partial one
    # r0: prefill (168 - 128)/16 = 2.5 ; decode 5 + 10 + 1 = 16 -> 18.5
    # r1: prefill (168 - 32)/16 = 8.5  ; decode 0 + 10 + 1 = 11 -> 19.5
    assert r.route(rq, vs, 0) == 0
    assert r.last_logits == pytest.approx({0: 18.5, 1: 19.5})
    r2 = make_router("hybrid", rng=rng(), style="dynamo", overlap_score_weight=2.0)
    r2.route(other, vs, 0)
    r2.on_routed(other, 0, 0)
    r2.route(rq, vs, 0)
    assert r2.last_logits == pytest.approx({0: 21.0, 1: 28.0})
    r.on_finished(other, 0, 1.0)  # active blocks are freed on completion
    r.route(rq, vs, 0)
    assert r.last_logits[0] == pytest.approx(13.5)


def test_dynamo_shared_active_prefix_counted_once():
    r = make_router("hybrid", rng=rng(), style="dynamo")
    vs = views(1)
    doc = chain(4, 6)
    a, b = req(doc, prompt_tokens=96), req(doc, prompt_tokens=96)
    r.route(a, vs, 0)
    r.on_routed(a, 0, 0)
    r.route(b, vs, 0)
    assert r.last_logits[0] == pytest.approx(6 + 6)  # no cache overlap (precise, empty); decode 6 shared + 0 new
    r.on_routed(b, 0, 0)
    r.on_finished(a, 0, 0)
    assert r._active[0].count() == 6
    r.on_finished(b, 0, 0)
    assert r._active[0].count() == 0


def test_dynamo_ties_go_to_smallest_index_then_random():
    r = make_router("hybrid", rng=rng(), style="dynamo", prefix_mode="approximate")
    vs = views(3)
    warm = req(chain(1, 4), prompt_tokens=64)
    r.route(warm, vs, 0)
    r.on_routed(warm, 0, 0)
    r.on_finished(warm, 0, 0)  # replica 0's index holds 4 blocks; no active blocks anywhere
    picks = {r.route(req(chain(9, 4), prompt_tokens=64), vs, 0) for _ in range(100)}
    assert picks == {1, 2}


def test_dynamo_temperature_sampling_distribution():
    logits = [10.0, 12.0, 20.0]
    temp = 0.5
    z = np.exp(-(np.array(logits) - 10.0) / (10.0 * temp))
    p = z / z.sum()
    g = rng(42)
    n = 20000
    counts = np.bincount([softmax_sample(logits, temp, g) for _ in range(n)], minlength=3) / n
    assert np.allclose(counts, p, atol=0.015)
    assert {softmax_sample([3.0, 3.0], 1.0, g) for _ in range(100)} == {0, 1}  # equal logits: uniform


def test_dynamo_temperature_through_router():
    r = make_router("hybrid", rng=rng(7), style="dynamo", temperature=1.0)
    vs = [FakeView(0, cached=set(chain(1, 10))), FakeView(1)]
    picks = Counter(r.route(req(chain(1, 10), prompt_tokens=160), vs, 0) for _ in range(3000))
    # logits: r0 = 0 + 10 = 10, r1 = 10 + 10 = 20 -> p0 = 1/(1+e^-1)
    assert abs(picks[0] / 3000 - 1 / (1 + math.exp(-1))) < 0.03


# -- every router -------------------------------------------------------------------------------

ALL = [
    ("round-robin", {}), ("random", {}), ("least-requests", {}), ("least-loaded", {}), ("least-kv", {}),
    ("power-of-two", {}), ("sticky", {}), ("prefix-aware", {}), ("prefix-aware", {"mode": "precise"}),
    ("hybrid", {"style": "seed"}), ("hybrid", {"style": "llm-d"}), ("hybrid", {"style": "sglang"}),
    ("hybrid", {"style": "dynamo"}), ("hybrid", {"style": "dynamo", "temperature": 0.3}),
]


@pytest.mark.parametrize("name,params", ALL)
def test_every_router_returns_a_serving_replica_and_is_deterministic(name, params):
    def run(seed):
        g = np.random.default_rng(123)
        r = make_router(name, rng=rng(seed), **params)
        out = []
        vs = [FakeView(i) for i in (2, 5, 9)]
        live = []
        for k in range(300):
            for v in vs:
                v.num_waiting = int(g.integers(0, 6))
                v.kv_usage = float(g.random())
            rq = req(chain(int(g.integers(0, 5)), int(g.integers(0, 12))), session=f"s{int(g.integers(0, 7))}")
            rid = r.route(rq, vs, float(k))
            assert rid in {v.replica_id for v in vs}
            r.on_routed(rq, rid, float(k))
            next(v for v in vs if v.replica_id == rid).inflight_requests += 1
            live.append((rq, rid))
            if len(live) > 10:
                done, drid = live.pop(0)
                next(v for v in vs if v.replica_id == drid).inflight_requests -= 1
                r.on_finished(done, drid, float(k))
            if k == 150:
                r.on_replica_removed(5)
                vs = [v for v in vs if v.replica_id != 5] + [FakeView(11)]
                live = [(q, x) for q, x in live if x != 5]
            out.append(rid)
        return out

    assert run(0) == run(0)


@pytest.mark.parametrize(
    "name,params,fragment",
    [
        ("sticky", {"eps": 0}, "eps"),
        ("sticky", {"vnodes": 0}, "vnodes"),
        ("sticky", {"session": 1}, "session: unknown parameter"),
        ("prefix-aware", {"mode": "exact"}, "mode"),
        ("prefix-aware", {"max_imbalance": -1}, "max_imbalance"),
        ("power-of-two", {"load": "gpu"}, "load"),
        ("least-kv", {"x": 1}, "unknown parameter"),
        ("hybrid", {"style": "nginx"}, "style"),
        ("hybrid", {"style": "seed", "hit_threshold": 1.5}, "hit_threshold"),
        ("hybrid", {"style": "llm-d", "weights": {"queue": -2}}, "weights.queue"),
        ("hybrid", {"style": "llm-d", "weights": {"latency": 1}}, "weights"),
        ("hybrid", {"style": "sglang", "balance_rel_threshold": 0.5}, "balance_rel_threshold"),
        ("hybrid", {"style": "sglang", "cache_threshold": 2}, "cache_threshold"),
        ("hybrid", {"style": "dynamo", "temperature": -1}, "temperature"),
        ("hybrid", {"style": "dynamo", "eps": 0.1}, "eps: unknown parameter"),
        ("no-such-router", {}, "unknown router"),
    ],
)
def test_bad_parameters_raise_one_line_config_errors(name, params, fragment):
    with pytest.raises(ConfigError) as e:
        make_router(name, **params)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


# -- user-written routers -------------------------------------------------------------------------

def fewest_waiting(request, views, now):
    """The docs' function-router example."""
    return min(views, key=lambda v: (v.num_waiting, v.replica_id)).replica_id


def test_user_function_router_by_import_path_and_registration():
    from policies import register_router

    vs = [FakeView(0, num_waiting=3), FakeView(1, num_waiting=1), FakeView(2, num_waiting=1)]
    r = make_router(f"{__name__}:fewest_waiting")
    assert r.route(req(), vs, 0) == 1
    with pytest.raises(ConfigError, match="unknown parameter"):
        make_router(f"{__name__}:fewest_waiting", depth=3)

    @register_router("test-random-of-idle")
    def random_idle(request, views, now, rng):
        idle = [v for v in views if v.num_waiting == 0] or list(views)
        return idle[int(rng.integers(len(idle)))].replica_id

    r2 = make_router("test-random-of-idle", rng=rng(0))
    assert {r2.route(req(), [FakeView(0, num_waiting=2), FakeView(4), FakeView(5)], 0) for _ in range(50)} == {4, 5}
    with pytest.raises(ConfigError, match="cannot import"):
        make_router("no_such_module_xyz:router")


def test_user_router_class_with_state_by_import_path():
    r = make_router(f"{__name__}:CacheAffinityDocExample", rng=rng())
    vs = views(3)
    a = req(chain(1, 4))
    first = r.route(a, vs, 0)
    r.on_routed(a, first, 0)
    assert r.route(req(chain(1, 4)), vs, 0) == first


from policies import Router  # noqa: E402


class CacheAffinityDocExample(Router):
    """The docs' stateful router example: remember where each first block went."""

    def __init__(self, rng=None, **params):
        super().__init__(rng, **params)
        self.home: dict[int, int] = {}

    def route(self, request, views, now):
        ids = {v.replica_id for v in views}
        if request.block_hashes and self.home.get(request.block_hashes[0]) in ids:
            return self.home[request.block_hashes[0]]
        return min(views, key=lambda v: (v.inflight_requests, v.replica_id)).replica_id

    def on_routed(self, request, replica_id, now):
        if request.block_hashes:
            self.home[request.block_hashes[0]] = replica_id

    def on_replica_removed(self, replica_id):
        self.home = {h: r for h, r in self.home.items() if r != replica_id}
