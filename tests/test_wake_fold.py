"""Folded wake-ups (Cluster._run_wakes): an idle replica sent a request by the arrival callback is
woken without a SimPy event when nothing sorts before the wake event; otherwise the event is queued
with the id it would have had. Either way the run must be exactly the one-event-per-wake run."""

import numpy as np
import pandas as pd
import pytest

from policies import make_router
from sim import replica as replica_mod
from sim.cluster import Cluster, ClusterConfig, FailureConfig
from sim.engine import EngineConfig
from sim.step_time import BatchShape, LinearStepTime
from tests.fakes import ScriptedAutoscaler
from traces.schema import Workload

LIN = LinearStepTime({"const": 0.005, "prefill_tokens": 5e-5, "decode_seqs": 1e-4, "decode_context": 2e-8})
# Binary-exact step times (multiples of 1/16 s): step ends tie exactly with arrivals and samples.
EXACT = LinearStepTime({"const": 0.0625, "decode_seqs": 0.0625, "prefill_tokens": 2.0 ** -12})


def _cluster(df, step=LIN, replicas=1, router="round-robin", fold=True, **kw):
    cfg = ClusterConfig(workload=Workload(df), engine=EngineConfig(num_gpu_blocks=400, max_num_batched_tokens=512,
                                                                   max_num_seqs=8),
                        make_step_model=lambda: step, router=make_router(router), replicas=replicas,
                        usd_per_gpu_hour=2.0, **kw)
    c = Cluster(cfg)
    if not fold:
        c._fold_wakes = False  # every wake-up through a SimPy event (the reference)
    return c


@pytest.fixture
def wake_events(monkeypatch):
    """Count the wake-ups that went through a SimPy event."""
    n = [0]
    orig = replica_mod.Replica._wake

    def counted(self, event):
        n[0] += 1
        return orig(self, event)

    monkeypatch.setattr(replica_mod.Replica, "_wake", counted)
    return n


@pytest.mark.parametrize("t", [5.3, 6.0])  # 6.0: a metrics sample is due at the same instant
def test_simultaneous_arrivals_on_an_idle_replica_are_admitted_in_one_step(t, wake_events):
    df = pd.DataFrame({"arrival_s": [0.0, t, t], "prompt_tokens": [100, 300, 200], "output_tokens": [2, 5, 5]})
    out = _cluster(df).run()
    req = out.requests
    assert (req.status == "completed").all()
    # Both requests of the burst are in the replica's queue before it plans: one prefill step for both.
    both = LIN.step_time(BatchShape(prefill_seqs=2, prefill_tokens=500, prefill_attn=300 * 300 + 200 * 200))
    assert req.ttft_s.iloc[1] == req.ttft_s.iloc[2] == pytest.approx(both, rel=1e-12)
    assert req.queue_s.iloc[1] == req.queue_s.iloc[2] == 0.0
    if t == 5.3:
        # Nothing else is due then: the wake at t ran without an event (the one at 0.0 waits for
        # the sampler's start, an URGENT event at 0, so it is queued).
        assert wake_events[0] == 1
    else:
        # The sample at 6.0 was scheduled (at 5.0) after the arrival event (at 0.0): it sorts before
        # the wake, sees the burst waiting, and the wake goes through its event.
        assert wake_events[0] == 2
        ts = out.timeseries
        row = ts[(ts.time_s == 6.0) & (ts.replica == 0)].iloc[0]
        assert row["vllm:num_requests_waiting"] == 2 and row["vllm:num_requests_running"] == 0


def _bursts(seed, n, q, gap=4.0):
    """Bursts of 1-4 requests at the same instant, on a grid of q seconds (ties with step ends)."""
    rng = np.random.default_rng(seed)
    g = rng.integers(1, 5, n)
    starts = np.floor(np.cumsum(rng.exponential(gap, n)) / q) * q
    t = np.repeat(starts, g)[:n]
    return pd.DataFrame({"arrival_s": t, "prompt_tokens": rng.integers(16, 600, n),
                         "output_tokens": rng.integers(1, 60, n)})


CASES = {
    "round-robin": dict(replicas=3),
    "least-loaded, samples every 1/8 s": dict(replicas=2, router="least-loaded", sample_interval_s=0.125),
    "one event per step": dict(replicas=3, router="least-loaded", engine_fast_forward=False),
    "failures and retries": dict(replicas=3, failures=FailureConfig(inject=[(0, 50.0), (2, 120.0), (3, 200.25)])),
    "autoscaling and drains": dict(replicas=2, router="least-loaded", min_replicas=1, max_replicas=6,
                                   cold_start=lambda rng: 2.0,
                                   autoscaler=ScriptedAutoscaler([(0.0, 2), (30.0, 5), (100.0, 1), (200.0, 4)])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_folded_wakes_give_the_run_of_one_event_per_wake(case, monkeypatch):
    df = _bursts(7, 600, 0.125)
    seen = {}
    orig = replica_mod.Replica._next_step

    def traced(self):  # every planning of every replica, with the clock and the queue it saw
        seen[self.cluster].append((self.env.now, self.replica_id, self.engine.num_waiting, self.engine.num_running))
        return orig(self)

    monkeypatch.setattr(replica_mod.Replica, "_next_step", traced)
    outs = []
    for fold in (True, False):
        c = _cluster(df, step=EXACT, fold=fold, **CASES[case])
        seen[c] = []
        outs.append((c.run(), seen[c]))
    (a, trace_a), (b, trace_b) = outs
    assert trace_a == trace_b
    assert a.requests.equals(b.requests)
    assert a.timeseries.equals(b.timeseries)
    assert a.replicas.equals(b.replicas)
    sa, sb = dict(a.summary), dict(b.summary)
    sa.pop("sim_wall_s"), sb.pop("sim_wall_s")
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k] == sb[k] or (sa[k] != sa[k] and sb[k] != sb[k]), k
