"""Cluster scenarios: physics (zero-load latency, saturation, Little's law), conservation,
determinism, lifecycle (cold start, failures)."""

import numpy as np
import pandas as pd
import pytest

from policies import make_router
from sim.cluster import Cluster, ClusterConfig, FailureConfig
from sim.engine import EngineConfig
from sim.step_time import BatchShape, LinearStepTime
from tests.fakes import ScriptedAutoscaler
from traces.schema import Workload

LIN = LinearStepTime({"const": 0.004, "prefill_tokens": 6e-5, "prefill_attn": 1e-9, "decode_seqs": 2e-4,
                      "decode_context": 5e-8})


def _poisson(rate, n, prompt=500, output=50, seed=1, prompt_sd=0):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    p = np.full(n, prompt) if not prompt_sd else np.maximum(1, rng.normal(prompt, prompt_sd, n)).astype(int)
    return Workload(pd.DataFrame({"arrival_s": t - t[0], "prompt_tokens": p, "output_tokens": np.full(n, output)}))


def _run(workload, replicas=1, router="round-robin", blocks=20000, budget=2048, seqs=128, **kw):
    cfg = ClusterConfig(workload=workload, engine=EngineConfig(num_gpu_blocks=blocks, max_num_batched_tokens=budget,
                                                              max_num_seqs=seqs),
                        make_step_model=lambda: LIN, router=make_router(router), replicas=replicas,
                        usd_per_gpu_hour=2.0, **kw)
    return Cluster(cfg).run()


def test_zero_load_latency_equals_step_time_model():
    w = Workload(pd.DataFrame({"arrival_s": [0.0], "prompt_tokens": [1000], "output_tokens": [20]}))
    out = _run(w)
    r = out.requests.iloc[0]
    prefill = LIN.step_time(BatchShape(prefill_seqs=1, prefill_tokens=1000, prefill_attn=1000 * 1000))
    assert r.ttft_s == pytest.approx(prefill, rel=1e-12)
    decodes = [LIN.step_time(BatchShape(decode_seqs=1, decode_context=1001 + k)) for k in range(19)]
    assert r.tpot_s == pytest.approx(np.mean(decodes), rel=1e-12)
    assert r.e2e_s == pytest.approx(prefill + sum(decodes), rel=1e-12)
    assert r.queue_s == 0.0


def test_chunked_prefill_ttft_is_sum_of_chunk_steps():
    w = Workload(pd.DataFrame({"arrival_s": [0.0], "prompt_tokens": [5000], "output_tokens": [2]}))
    out = _run(w, budget=2048)
    chunks = [(2048, 0), (2048, 2048), (904, 4096)]
    expect = sum(LIN.step_time(BatchShape(prefill_seqs=1, prefill_tokens=n, prefill_attn=n * (c + n)))
                 for n, c in chunks)
    assert out.requests.ttft_s.iloc[0] == pytest.approx(expect, rel=1e-12)


def test_throughput_saturates_and_queueing_grows():
    res = []
    for rate in (2, 8, 30, 60, 120):
        out = _run(_poisson(rate, 600), seqs=32)
        s = out.summary
        res.append((rate, s["throughput_req_s"], s["queue_mean_s"]))
    thr = [r[1] for r in res]
    q = [r[2] for r in res]
    # Light load: throughput tracks the offered rate.
    assert thr[0] == pytest.approx(2, rel=0.25)
    # Beyond capacity throughput stops growing (within 20%) while queueing explodes.
    assert thr[4] < thr[3] * 1.2 and thr[3] < 60 * 0.9
    assert q[4] > q[3] > 5 * q[0]


def test_littles_law_holds_on_time_series():
    w = _poisson(6, 3000, prompt_sd=200, seed=3)
    out = _run(w, replicas=2)
    ts = out.timeseries
    cl = ts[ts.replica == -1]
    # Steady-state window away from the warm-up and the drain.
    t0, t1 = 50.0, float(w.df.arrival_s.iloc[-1]) - 50.0
    win = cl[(cl.time_s >= t0) & (cl.time_s < t1)]
    L = win["in_flight"].mean()
    req = out.requests
    inwin = req[(req.arrival_s >= t0) & (req.arrival_s < t1)]
    lam = len(inwin) / (t1 - t0)
    W = inwin.e2e_s.mean()
    assert L == pytest.approx(lam * W, rel=0.1)


def test_conservation_and_determinism_with_random_router():
    w = _poisson(20, 800, prompt_sd=300, seed=5)
    a = _run(w, replicas=3, router="random")
    b = _run(w, replicas=3, router="random")
    assert a.summary["requests_completed"] == 800
    assert (a.requests.status == "completed").all()
    pd.testing.assert_frame_equal(a.requests, b.requests)
    c = Cluster(ClusterConfig(workload=w, engine=EngineConfig(num_gpu_blocks=20000), make_step_model=lambda: LIN,
                              router=make_router("random"), replicas=3, seed=99)).run()
    assert not np.array_equal(c.requests.replica.to_numpy(), a.requests.replica.to_numpy())


def test_tiny_kv_preempts_and_everything_completes():
    w = _poisson(50, 200, prompt=300, output=200, seed=7)
    out = _run(w, blocks=64, budget=512)  # 63 usable blocks ~ 1000 tokens
    s = out.summary
    assert s["preemptions"] > 0
    assert s["requests_completed"] == 200
    assert (out.requests.output_tokens == 200).all()


def test_too_long_requests_rejected_with_reason():
    w = Workload(pd.DataFrame({"arrival_s": [0.0, 1.0], "prompt_tokens": [100, 5000], "output_tokens": [10, 10]}))
    cfg = ClusterConfig(workload=w, engine=EngineConfig(num_gpu_blocks=1000, max_model_len=4096),
                        make_step_model=lambda: LIN, router=make_router("round-robin"))
    out = Cluster(cfg).run()
    assert list(out.requests.status) == ["completed", "rejected"]
    assert out.requests.reason.iloc[1] == "exceeds_max_model_len"


def test_cold_start_delays_first_requests():
    w = Workload(pd.DataFrame({"arrival_s": [0.0, 100.0], "prompt_tokens": [100, 100], "output_tokens": [5, 5]}))
    out = _run(w, cold_start=lambda rng: 30.0, initial_cold_start=True)
    ttft = out.requests.ttft_s.to_numpy()
    assert ttft[0] > 30.0 and ttft[1] < 1.0
    # GPU-hours count from provisioning, not from readiness.
    assert out.summary["gpu_hours"] >= (100.0 / 3600.0)


@pytest.mark.parametrize("on_failure", ["retry", "fail"])
def test_replica_failure_retries_or_fails_every_inflight_request(on_failure):
    w = _poisson(10, 300, prompt=400, output=300, seed=11)
    out = _run(w, replicas=2, failures=FailureConfig(inject=[(0, 10.0)], on_failure=on_failure, replace=True))
    req = out.requests
    s = out.summary
    assert s["replica_failures"] == 1 and s["replicas_started"] == 3
    assert len(req) == 300 and req.status.isin(["completed", "failed"]).all()
    if on_failure == "retry":
        assert s["requests_completed"] == 300 and s["retries"] > 0
    else:
        failed = req[req.status == "failed"]
        assert len(failed) > 0 and (failed.reason == "replica_failed").all()
        assert s["requests_completed"] + s["requests_failed"] == 300


def test_staleness_view_lags_between_scrapes():
    w = _poisson(30, 300, seed=13)
    fresh = _run(w, replicas=3, router="least-requests")
    stale = _run(w, replicas=3, router="least-requests", staleness_s=5.0)
    # least-requests uses router-tracked in-flight counts, which are exact either way.
    pd.testing.assert_series_equal(fresh.requests.replica, stale.requests.replica)


def test_scale_out_cold_start_and_scale_in_drains():
    w = _poisson(8, 800, prompt=300, output=100, seed=17)  # ~100 s of traffic
    out = _run(w, replicas=1, autoscaler=ScriptedAutoscaler([(20.0, 3), (60.0, 1)]), min_replicas=1, max_replicas=4,
               cold_start=lambda rng: 10.0, sample_interval_s=1.0)
    s = out.summary
    assert s["requests_completed"] == 800 and s["replicas_max"] == 3 and s["replicas_started"] == 3
    ts = out.timeseries
    # New replicas serve only after their 10 s cold start (sync at 20 s -> serving from 30 s).
    served = out.requests.groupby("replica").arrival_s.min()
    assert served.loc[1] >= 30.0 and served.loc[2] >= 30.0
    # After scale-in at 60 s two replicas drain: they take no new requests but finish in-flight ones.
    drained = [rid for rid in (0, 1, 2) if (out.requests[out.requests.replica == rid].arrival_s > 61).sum() == 0]
    assert len(drained) == 2
    states = ts[(ts.replica >= 0) & (ts.time_s > 60) & (ts.time_s < 62)].state.tolist()
    assert "draining" in states or len(set(ts[ts.time_s > 70].replica) - {-1}) == 1
    # Cost counts each replica from provisioning to stop.
    assert s["gpu_hours"] < 3 * (out.requests.finish_s.max() / 3600)


def _session_scenario(closed_loop, rate=0.5):
    return {"seed": 3, "workload": {"closed_loop": closed_loop, "synthetic": {
        "arrival": "poisson", "rate_per_s": rate, "num_requests": 60, "prompt_tokens": 400, "output_tokens": 80,
        "sessions": {"turns": 4, "think_time_s": {"dist": "fixed", "value": 2.0}, "user_tokens": 50}}},
        "cluster": {"replicas": 1, "gpu": "L4", "engine": {"max_model_len": 8192}}}


def test_closed_loop_sessions_release_next_turn_after_previous_finishes():
    import sim

    r = sim.run(_session_scenario(True))
    req = r.requests
    assert (req.status == "completed").all()
    wl = r.scenario  # noqa: F841
    from traces.config import build_workload

    w = build_workload(r.scenario.workload, seed=r.scenario.seed)
    parent = w.df["parent_request_id"].astype("string")
    ids = w.df["request_id"].astype("string").tolist()
    pos = {rid: k for k, rid in enumerate(ids)}
    checked = 0
    for k, par in enumerate(parent.tolist()):
        if par is pd.NA:
            continue
        j = pos[par]
        # Released exactly think time (2 s) after the parent's last token.
        assert req.arrival_s.iloc[k] == pytest.approx(req.finish_s.iloc[j] + 2.0)
        checked += 1
    assert checked > 10


def test_closed_loop_self_throttles_under_overload():
    import sim

    heavy = {"prompt_tokens": 3000, "output_tokens": 300, "num_requests": 120}
    sc_open, sc_closed = _session_scenario(False, rate=5), _session_scenario(True, rate=5)
    for sc in (sc_open, sc_closed):
        sc["workload"]["synthetic"].update(heavy)
    open_, closed = sim.run(sc_open), sim.run(sc_closed)
    # Open-loop turns pile up on an overloaded replica; closed-loop users wait for answers.
    assert closed.summary["ttft_p99_s"] < open_.summary["ttft_p99_s"]


def test_closed_loop_aborts_rest_of_session_when_a_turn_fails():
    import sim

    sc = _session_scenario(True)
    sc["cluster"]["engine"] = {"max_model_len": 560}  # later turns outgrow the context window
    r = sim.run(sc)
    req = r.requests
    assert set(req.reason.dropna()) <= {"exceeds_max_model_len", "session_aborted"}
    assert (req.reason == "session_aborted").sum() > 0
    assert len(req) == 60 and req.status.isin(["completed", "rejected"]).all()


@pytest.mark.parametrize("too_long", [0, 1, 3])
def test_result_columns_are_what_pandas_infers_from_python_values(too_long):
    """The result tables are built from arrays and label codes; every column must still be exactly
    what pandas infers for the same Python values (strings, None/NaN for missing, numbers)."""
    n = 6
    prompts = [100] * (n - too_long) + [5000] * too_long
    df = pd.DataFrame({"arrival_s": np.arange(n) * 0.5, "prompt_tokens": prompts, "output_tokens": [5] * n,
                       "request_id": [f"r{k}" for k in range(n)],
                       "session_id": ["s0", "s0", None, "s1", "s1", None], "tenant": ["a", "b"] * 3})
    w = Workload(df)
    cfg = ClusterConfig(workload=w, engine=EngineConfig(num_gpu_blocks=1000, max_model_len=4096),
                        make_step_model=lambda: LIN, router=make_router("round-robin"), replicas=2)
    out = Cluster(cfg).run()
    for table in (out.requests, out.timeseries):
        rebuilt = pd.DataFrame({c: table[c].tolist() for c in table.columns})
        for c in table.columns:
            if table[c].dtype.kind in "iuf":  # numeric widths (e.g. int32 replica ids) are chosen, not inferred
                continue
            pd.testing.assert_series_equal(table[c], rebuilt[c], check_exact=True)
    assert list(out.requests.status) == ["completed"] * (n - too_long) + ["rejected"] * too_long
    reasons = out.requests.reason.tolist()
    assert reasons[n - too_long:] == ["exceeds_max_model_len"] * too_long
    assert all(r is None or r != r for r in reasons[: n - too_long])  # None, or NaN in a string column
    assert out.requests.request_id.tolist() == [f"r{k}" for k in range(n)]
    assert set(out.timeseries.state) == {"serving", "replicas=2"}


def test_event_loop_restores_the_garbage_collector_settings():
    import gc

    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    out = _run(_poisson(5, 50), replicas=1)
    assert out.summary["requests_completed"] == 50
    assert gc.get_threshold() == before and gc.get_freeze_count() == frozen
