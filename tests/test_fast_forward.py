"""Exact fast-forward of decode runs: the fast path must give the same results as one event per step.

The reference is the naive path (``ClusterConfig.engine_fast_forward=False``, or FLEETSIM_NAIVE=1):
one ``schedule``/``update`` pair and one SimPy event per engine step. The fast path plans steady
decode runs at once (sim.engine.DecodeRun) and materialises their state lazily. Compared here, on
randomized workloads: every per-request column, the engine step count, the sampled time series
(which reads replica state *during* runs), the ITL histogram, and the KV state of engines.

Two fast paths are covered: closed-form run ends (``AffineDecodeRun``, models with
``decode_run_affine``: the default) and chunked vectorised durations (``DecodeRun``, other models;
forced here by the ``small_chunks`` fixture, which also makes the chunks tiny). Times are compared to
round-off: the naive clock is a running sum ``now + dt`` that drifts by ~an ulp per step, the closed
form does not (absolute tolerance 1e-9 s on runs of a few hundred simulated seconds).
"""

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import make_router
from sim.cluster import Cluster, ClusterConfig, FailureConfig
from sim.engine import DecodeRun, Engine, EngineConfig, EngineRequest
from sim.replica import NAIVE_ENV, fast_forward_default
from sim.step_time import BatchShape, LinearStepTime

ROUND_OFF = dict(check_exact=False, rtol=1e-9, atol=1e-9)
from traces.schema import LIST_DTYPE, Workload, engine_block_hashes

LIN = LinearStepTime({"const": 0.004, "prefill_tokens": 6e-5, "prefill_attn": 1e-9, "decode_seqs": 2e-4,
                      "decode_context": 5e-8})
COLS = ["replica", "cached_tokens", "output_tokens", "queue_s", "ttft_s", "tpot_s", "e2e_s", "finish_s",
        "preemptions", "retries", "status", "reason"]


# -- step-time models: the vectorised run durations are the per-step ones, bit for bit ---------------
@settings(max_examples=60, deadline=None)
@given(coef=st.lists(st.floats(0, 1e-2, allow_subnormal=False), min_size=6, max_size=6),
       num_seqs=st.integers(1, 1024), ctx=st.integers(1, 10**8), k=st.integers(1, 300))
def test_linear_decode_run_times_bit_identical(coef, num_seqs, ctx, k):
    names = ("const", "prefill_tokens", "prefill_attn", "decode_seqs", "decode_context", "num_seqs")
    model = LinearStepTime({n: c for n, c in zip(names, coef)} | {"const": coef[0] + 1e-4})
    fast = model.decode_run_times(num_seqs, ctx, k).tolist()
    slow = [model.step_time(BatchShape(decode_seqs=num_seqs, decode_context=ctx + j * num_seqs)) for j in range(k)]
    assert fast == slow


def test_roofline_decode_run_times_match_to_an_ulp():
    roofline = pytest.importorskip("sim.roofline")
    from sim.catalog import load_catalog

    cat = load_catalog([])
    rng = np.random.default_rng(0)
    checked = 0
    for gpu, model, tp in [("H100-80GB", "llama-3.1-8b", 1), ("A100-80GB", "llama-3.1-70b", 4),
                           ("L4", "mistral-7b", 1), ("H200", "qwen3-30b-a3b", 2)]:
        try:
            m = roofline.RooflineStepTime(cat.model(model), cat.gpu(gpu), tensor_parallel=tp)
        except Exception:  # a combination the catalog does not have: the others still count
            continue
        for _ in range(20):
            b, ctx, k = int(rng.integers(1, 512)), int(rng.integers(1, 10**7)), int(rng.integers(1, 200))
            fast = m.decode_run_times(b, ctx, k)
            slow = np.array([m.step_time(BatchShape(decode_seqs=b, decode_context=ctx + j * b)) for j in range(k)])
            assert np.all(np.abs(fast - slow) <= 2 * np.spacing(slow))  # np.hypot vs math.hypot
            checked += 1
    assert checked >= 40


# -- whole clusters: naive vs fast on random workloads ---------------------------------------------------
def _workload(seed: int, n: int, rate: float, families: int, max_prompt: int, max_out: int) -> Workload:
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    t -= t[0]
    prompt = rng.integers(1, max_prompt, n)
    out = rng.integers(1, max_out, n)
    fam = rng.integers(0, families, n)
    # Prefix identity over 16-token source blocks covering a random leading part of the prompt: shared
    # within a family, so prefix hits happen, and a unique tail after it.
    cover = [int(rng.integers(0, p // 16 + 2)) for p in prompt]
    hash_ids = [list(range(f * 10_000, f * 10_000 + c)) for f, c in zip(fam, cover)]
    df = pd.DataFrame({"arrival_s": t, "prompt_tokens": prompt, "output_tokens": out,
                       "priority": rng.integers(0, 3, n)})
    df["hash_ids"] = pd.Series(pa.array(hash_ids, type=pa.list_(pa.int64())), dtype=LIST_DTYPE)
    return Workload(df, hash_block_size=16)


def _run(w: Workload, fast: bool, *, eng: dict, router: str = "round-robin", **kw):
    cfg = ClusterConfig(workload=w, engine=EngineConfig(**eng), make_step_model=lambda: LIN,
                        router=make_router(router), engine_fast_forward=fast, **kw)
    c = Cluster(cfg)
    out = c.run()
    return c, out


def _assert_same(a, b):
    (ca, oa), (cb, ob) = a, b
    pd.testing.assert_frame_equal(oa.requests[COLS], ob.requests[COLS], **ROUND_OFF)
    assert oa.summary["engine_steps"] == ob.summary["engine_steps"]
    assert oa.summary["preemptions"] == ob.summary["preemptions"]
    assert oa.summary["prefix_hit_rate"] == ob.summary["prefix_hit_rate"]
    # The sampler reads replicas while runs are in flight: gauges must be the naive ones.
    pd.testing.assert_frame_equal(oa.timeseries, ob.timeseries, **ROUND_OFF)
    assert np.array_equal(ca.itl.counts, cb.itl.counts)
    assert math.isclose(ca.itl.sum, cb.itl.sum, rel_tol=1e-9)
    assert [r.busy_s for r in ca.replicas] == pytest.approx([r.busy_s for r in cb.replicas], rel=1e-9)


def _chunked_runs(m, tiny: bool = True) -> None:
    """Force the chunked-durations fast path (no closed form), with tiny chunks so that runs are
    extended many times (the replica's wake-ups at chunk ends drive that)."""
    if tiny:
        m.setattr(DecodeRun, "FIRST_CHUNK", 2)
    m.setattr(LinearStepTime, "decode_run_affine", lambda self, num_seqs: None)


@pytest.fixture
def small_chunks(monkeypatch):
    _chunked_runs(monkeypatch)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 10**6),
    n=st.integers(5, 120),
    rate=st.floats(0.5, 60),
    blocks=st.sampled_from([24, 40, 80, 400, 5000]),
    budget=st.sampled_from([32, 256, 2048]),
    seqs=st.sampled_from([1, 3, 16, 128]),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
    chunked=st.booleans(),
    watermark=st.sampled_from([0.0, 0.05]),
    replicas=st.integers(1, 3),
    router=st.sampled_from(["round-robin", "least-requests", "least-kv", "prefix-aware"]),
    families=st.integers(1, 4),
    chunks=st.booleans(),
)
def test_fast_forward_matches_naive(seed, n, rate, blocks, budget, seqs, policy, caching, chunked, watermark,
                                    replicas, router, families, chunks, monkeypatch):
    max_len = (blocks - 1) * 16
    if not chunked:
        budget = max(budget, max_len)  # vLLM refuses prompts that can never fit without chunking
    eng = dict(num_gpu_blocks=blocks, max_num_batched_tokens=budget, max_num_seqs=seqs, scheduling_policy=policy,
               enable_prefix_caching=caching, enable_chunked_prefill=chunked, watermark=watermark,
               max_model_len=max_len)
    w = _workload(seed, n, rate, families, max_prompt=min(600, max_len // 2), max_out=min(150, max_len // 2))
    with monkeypatch.context() as m:
        if chunks:
            _chunked_runs(m)
        _assert_same(_run(w, False, eng=eng, router=router, replicas=replicas),
                     _run(w, True, eng=eng, router=router, replicas=replicas))


@pytest.mark.parametrize("router", ["prefix-aware", "least-kv"])
def test_precise_prefix_and_stale_views_see_exact_state(router, small_chunks):
    """Routers that read the true cache and KV usage mid-run (and through stale scrapes)."""
    w = _workload(7, 300, 25.0, 3, 900, 200)
    eng = dict(num_gpu_blocks=300, max_num_batched_tokens=512, max_num_seqs=32)
    params = {"mode": "precise"} if router == "prefix-aware" else {}
    for staleness in (0.0, 0.3):
        runs = []
        for fast in (False, True):
            cfg = ClusterConfig(workload=w, engine=EngineConfig(**eng), make_step_model=lambda: LIN,
                                router=make_router(router, **params),
                                replicas=3, staleness_s=staleness, engine_fast_forward=fast, sample_interval_s=0.05)
            c = Cluster(cfg)
            runs.append((c, c.run()))
        _assert_same(*runs)


def test_failures_mid_run_match(small_chunks):
    w = _workload(11, 250, 12.0, 2, 500, 300)
    eng = dict(num_gpu_blocks=400, max_num_batched_tokens=1024, max_num_seqs=16)
    for on_failure in ("retry", "fail"):
        f = dict(failures=FailureConfig(inject=[(0, 5.123), (1, 9.87)], on_failure=on_failure, replace=True))
        a = _run(w, False, eng=eng, replicas=2, **f)
        b = _run(w, True, eng=eng, replicas=2, **f)
        _assert_same(a, b)
        assert b[1].summary["replica_failures"] == 2


def test_tiny_kv_preemption_heavy_matches():
    w = _workload(3, 150, 40.0, 2, 300, 250)
    eng = dict(num_gpu_blocks=40, max_num_batched_tokens=256, max_num_seqs=8, max_model_len=39 * 16)
    a, b = _run(w, False, eng=eng), _run(w, True, eng=eng)
    assert b[1].summary["preemptions"] > 50
    _assert_same(a, b)


def test_roofline_model_matches_to_round_off():
    """With the roofline model the run durations may differ from step_time by an ulp."""
    roofline = pytest.importorskip("sim.roofline")
    from sim.catalog import load_catalog

    cat = load_catalog([])
    model = roofline.RooflineStepTime(cat.model("llama-3.1-8b"), cat.gpu("H100-80GB"))
    w = _workload(13, 200, 8.0, 3, 2000, 300)
    runs = []
    for fast in (False, True):
        cfg = ClusterConfig(workload=w, engine=EngineConfig(num_gpu_blocks=600, max_num_batched_tokens=2048),
                            make_step_model=lambda: model, router=make_router("round-robin"), replicas=2,
                            engine_fast_forward=fast)
        runs.append(Cluster(cfg).run())
    a, b = runs
    pd.testing.assert_frame_equal(a.requests[COLS], b.requests[COLS], check_exact=False, rtol=1e-9, atol=1e-12)
    assert a.summary["engine_steps"] == b.summary["engine_steps"]


def test_fast_path_really_skips_events():
    """The point of it all: far fewer events than steps on a light decode-heavy load."""
    w = _workload(5, 60, 1.0, 1, 200, 400)
    eng = dict(num_gpu_blocks=2000)
    naive, fast = _run(w, False, eng=eng), _run(w, True, eng=eng)
    _assert_same(naive, fast)
    steps = fast[1].summary["engine_steps"]
    assert steps > 5000
    assert next(fast[0].env._eid) < steps / 5  # SimPy events scheduled, all kinds


def test_switch_env_var(monkeypatch):
    monkeypatch.setenv(NAIVE_ENV, "1")
    assert fast_forward_default() is False
    w = _workload(1, 20, 2.0, 1, 100, 50)
    c, _ = _run(w, True, eng=dict(num_gpu_blocks=500))
    assert all(not r.fast_forward for r in c.replicas)
    monkeypatch.setenv(NAIVE_ENV, "0")
    assert fast_forward_default() is True


# -- the engine alone: a truncated run leaves exactly the naive state -------------------------------------
def _engine_pair(cfg: EngineConfig, reqs):
    t = {"now": 0.0}
    engines = [Engine(cfg, clock=lambda: t["now"]) for _ in range(2)]
    for e in engines:
        for idx, prompt, out in reqs:
            h = engine_block_hashes(prompt, cfg.block_size, hash_ids=list(range(prompt // 16)), hash_block_size=16,
                                    unique_key=idx)
            e.add_request(EngineRequest(idx, 0.0, prompt, out, h, num_shared_blocks=len(h) // 2), 0.0)
    return t, engines


def _state(e: Engine):
    reqs = sorted(e.running + e.waiting_requests(), key=lambda r: r.idx)
    return ([(r.idx, r.num_computed_tokens, r.num_tokens, r.num_output_tokens, list(r.blocks), r.num_cached_blocks,
              r.last_token_s) for r in reqs],
            e.kv.pool.free_queue.to_list(), e.kv.num_free_blocks, e.steps, e.tokens_generated)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("cut", [1, 2, 7, 16, 17, 40])
def test_engine_run_truncated_matches_naive_steps(cut, affine, monkeypatch):
    if not affine:
        _chunked_runs(monkeypatch, tiny=False)  # no replica here to extend the chunks
    cfg = EngineConfig(num_gpu_blocks=200, max_num_batched_tokens=4096, max_num_seqs=8)
    t, (naive, fast) = _engine_pair(cfg, [(0, 100, 90), (1, 37, 70), (2, 250, 80)])
    # Prefill both identically, naive steps.
    for e in (naive, fast):
        now = 0.0
        while any(r.num_output_tokens == 0 for r in e.running + e.waiting_requests()):
            p = e.schedule(now)
            now += LIN.step_time(p.shape)
            e.update(p, now)
    t["now"] = now
    end = fast.plan_decode_run(now, LIN)
    assert end is not None and fast.in_run
    # Naive: `cut` decode steps, the last one in flight at the cut time.
    times = [now]
    for _ in range(cut):
        p = naive.schedule(times[-1])
        times.append(times[-1] + LIN.step_time(p.shape))
        naive.update(p, times[-1])
    t["now"] = (times[-2] + times[-1]) / 2  # an arrival in the middle of step `cut`
    g = fast.gauges()  # a scrape mid-run: the naive engine's gauges, run progress read once
    assert g == (fast.num_running, fast.num_waiting, fast.kv.num_free_blocks, fast.num_preemptions,
                 fast.tokens_generated)
    assert g[2] == naive.kv.num_free_blocks  # the step in flight has its blocks, as in the naive engine
    end = fast.truncate_run(t["now"])
    assert end == (pytest.approx(times[-1], rel=1e-15, abs=0) if affine else times[-1])
    fast.kv.pool.check_invariants()
    t["now"] = end
    assert fast.run_wake(end) is None
    fast.finish_run(end)
    sf, sn = _state(fast), _state(naive)
    if affine:  # token times to round-off; everything else identical
        assert [r[-1] for r in sf[0]] == pytest.approx([r[-1] for r in sn[0]], rel=1e-15)
        sf = ([r[:-1] for r in sf[0]], *sf[1:])
        sn = ([r[:-1] for r in sn[0]], *sn[1:])
    assert sf == sn
    fast.kv.pool.check_invariants()
    assert fast.kv.pool.cached == naive.kv.pool.cached


@pytest.mark.parametrize("cut", [None, 0, 1, 5, 17])
def test_engine_fused_head_step_matches_naive_steps(cut):
    """A run planned together with the prefill step before it (``plan_decode_run(head=...)``):
    observed while the head step is in flight it is the naive engine before that step's update;
    truncated then, it ends with the head step; cut later, it matches the naive steps."""
    cfg = EngineConfig(num_gpu_blocks=200, max_num_batched_tokens=4096, max_num_seqs=8)
    t, (naive, fast) = _engine_pair(cfg, [(0, 100, 90), (1, 37, 70), (2, 250, 80)])
    plans = [e.schedule(0.0) for e in (naive, fast)]
    dt = LIN.step_time(plans[0].shape)
    t1 = 0.0 + dt
    end = fast.plan_decode_run(t1, LIN, head=plans[1], head_dt=dt)
    assert end is not None and fast.in_run
    t["now"] = t1 / 2  # mid head step: nothing of it applied yet, its blocks allocated
    assert fast.gauges() == naive.gauges(t1 / 2)
    assert (fast.steps, fast.tokens_generated, fast.kv.num_free_blocks) == \
           (naive.steps, naive.tokens_generated, naive.kv.num_free_blocks)
    if cut == 0:  # an arrival during the head step: the run ends with it
        assert fast.truncate_run(t1 / 2) == t1
        t["now"] = t1
        assert fast.finish_run(t1) == []
        naive.update(plans[0], t1)
        assert _state(fast) == _state(naive) and fast.busy_s == dt
        return
    naive.update(plans[0], t1)
    naive.busy_s += dt
    times = [t1]
    for _ in range(cut or 3):
        p = naive.schedule(times[-1])
        times.append(times[-1] + LIN.step_time(p.shape))
        naive.update(p, times[-1])
    if cut is None:  # observed at the head's end exactly: the head step counts as done
        t["now"] = t1
        g = fast.gauges()
        assert g[4] == naive.tokens_generated - 3 * 3 and fast.steps == naive.steps - 3
        return
    t["now"] = (times[-2] + times[-1]) / 2
    fast.sync()  # e.g. a precise router reading the cache mid-run
    end = fast.truncate_run(t["now"])
    assert end == pytest.approx(times[-1], rel=1e-15, abs=0)
    t["now"] = end
    fast.finish_run(end)
    sf, sn = _state(fast), _state(naive)
    assert [r[-1] for r in sf[0]] == pytest.approx([r[-1] for r in sn[0]], rel=1e-15)
    assert ([r[:-1] for r in sf[0]], *sf[1:]) == ([r[:-1] for r in sn[0]], *sn[1:])
    assert fast.busy_s == pytest.approx(dt + (times[-1] - t1), rel=1e-12)
    fast.kv.pool.check_invariants()


def test_fused_head_step_not_planned_when_the_batch_does_not_decode_after_it():
    cfg = EngineConfig(num_gpu_blocks=200, max_num_batched_tokens=64, max_num_seqs=8)
    t, (_, fast) = _engine_pair(cfg, [(0, 100, 90)])
    plan = fast.schedule(0.0)  # a 64-token chunk of a 100-token prompt
    assert fast.plan_decode_run(1.0, LIN, head=plan, head_dt=1.0) is None and not fast.in_run
    cfg = EngineConfig(num_gpu_blocks=200, max_num_batched_tokens=4096, max_num_seqs=8)
    t, (_, fast) = _engine_pair(cfg, [(0, 100, 2)])
    plan = fast.schedule(0.0)  # finishes one step after the head: fewer than 2 steps to plan
    assert fast.plan_decode_run(1.0, LIN, head=plan, head_dt=1.0) is None


# -- closed-form runs: step ends, inversion, ITL progression ------------------------------------------
@settings(max_examples=80, deadline=None)
@given(t0=st.floats(0, 1e6), T=st.floats(1e-5, 1.0), g=st.floats(0, 1e-6), B=st.integers(1, 300),
       ctx=st.integers(1, 10**6), k=st.integers(1, 400), probes=st.lists(st.floats(0, 1), min_size=1, max_size=8))
def test_affine_run_completed_steps_is_the_count_of_ends_not_after_now(t0, T, g, B, ctx, k, probes):
    from sim.engine import AffineDecodeRun

    run = AffineDecodeRun([None] * B, [ctx // B] * B, [0] * B, [0] * B, k, lambda j: 0, t0, T, g)
    ends = [run.end_of(j) for j in range(1, k + 1)]
    assert all(b > a for a, b in zip(ends, ends[1:]))
    # Durations are the model's: T + g * context, the context sum growing by B per step.
    dc0 = sum(run.c0) + B
    assert ends[0] - t0 == pytest.approx(T + g * dc0, rel=1e-9, abs=1e-9)
    if k > 1:
        assert ends[-1] - ends[-2] == pytest.approx(T + g * (dc0 + (k - 1) * B), rel=1e-9, abs=1e-9)
    span = ends[-1] - t0
    for p in probes + [0.0]:
        for now in (t0 + p * span * 1.1, ends[min(int(p * k), k - 1)]):  # anywhere, and exactly on an end
            assert run.completed_steps(now) == sum(1 for e in ends if e <= now)


@settings(max_examples=80, deadline=None)
@given(runs=st.lists(st.tuples(st.floats(1e-6, 10.0), st.floats(0, 1e-4), st.integers(1, 3000), st.integers(1, 50)),
                     min_size=1, max_size=6),
       near=st.booleans())
def test_itl_progression_buckets_like_one_by_one(runs, near):
    from sim.metrics import LogHistogram
    from sim.replica import _bulk_itl

    bulk, ref = LogHistogram(), LogHistogram()
    prog = _bulk_itl(bulk).progression
    for r, (first, step, n, count) in enumerate(runs):
        if near and r:  # start next to the previous run (the bucket memo's case), maybe on an edge
            first = runs[0][0] * (1.0 + 1e-3 * r)
        prog(first, step, n, count)
        for i in range(n):
            ref.add(first + step * i, count)
    assert np.array_equal(bulk.counts, ref.counts)
    assert bulk.total == ref.total
    assert bulk.sum == pytest.approx(ref.sum, rel=1e-9)
