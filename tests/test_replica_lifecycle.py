"""Replica lifecycle details that change what a run bills: scale-in during a cold start."""

import numpy as np
import pytest
import pandas as pd

from policies import make_router
from sim.cluster import Cluster, ClusterConfig
from sim.engine import EngineConfig
from sim.step_time import LinearStepTime
from tests.fakes import ScriptedAutoscaler
from traces.schema import Workload

LIN = LinearStepTime({"const": 0.005, "prefill_tokens": 5e-5, "decode_seqs": 1e-4, "decode_context": 2e-8})


def _run(plan, cold_start_s):
    rng = np.random.default_rng(5)
    n = 300
    df = pd.DataFrame({"arrival_s": np.sort(rng.uniform(0, 80, n)), "prompt_tokens": np.full(n, 200),
                       "output_tokens": np.full(n, 40)})
    cfg = ClusterConfig(workload=Workload(df), engine=EngineConfig(num_gpu_blocks=5000), make_step_model=lambda: LIN,
                        router=make_router("round-robin"), replicas=1, autoscaler=ScriptedAutoscaler(plan), min_replicas=1,
                        max_replicas=4, cold_start=lambda rng: cold_start_s)
    return Cluster(cfg).run()


def test_replica_scaled_in_while_starting_ends_and_stops_billing_at_the_drain():
    # Scale out to 3 at 20 s (cold start 100 s), back to 1 at 40 s: both new replicas are cancelled
    # while still loading, so they end at 40 s and bill 20 s each, and never serve.
    out = _run([(20.0, 3), (40.0, 1)], cold_start_s=100.0)
    reps = out.replicas.set_index("replica")
    assert out.summary["requests_completed"] == 300
    for rid in (1, 2):
        assert reps.loc[rid, "final_state"] == "stopped"
        assert reps.loc[rid, "created_s"] == 20.0
        assert reps.loc[rid, "ended_s"] == 40.0
        assert pd.isna(reps.loc[rid, "serving_s"])
    assert (out.requests.replica == 0).all()
    # Billing: the cancelled replicas for 20 s each (not for their 100 s cold start), and the run's
    # total is the sum over replicas.
    assert reps.loc[[1, 2], "gpu_hours"].tolist() == pytest.approx([20.0 / 3600.0] * 2, rel=1e-12)
    assert out.summary["gpu_hours"] == pytest.approx(reps["gpu_hours"].sum(), rel=1e-12)


def test_replica_that_finished_its_cold_start_drains_normally():
    out = _run([(20.0, 2), (40.0, 1)], cold_start_s=5.0)
    reps = out.replicas.set_index("replica")
    assert reps.loc[1, "serving_s"] == 25.0
    # One of the two serving replicas (the least loaded) drains from 40 s and stops after it.
    stopped = reps[reps.final_state == "stopped"]
    assert len(stopped) == 1 and stopped.ended_s.iloc[0] >= 40.0
    assert out.summary["requests_completed"] == 300
