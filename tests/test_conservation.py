"""Property: whatever the workload, fleet and failures, every request ends exactly once."""

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from policies import make_router
from sim.cluster import Cluster, ClusterConfig, FailureConfig
from sim.engine import EngineConfig
from sim.step_time import LinearStepTime
from traces.schema import Workload

LIN = LinearStepTime({"const": 0.003, "prefill_tokens": 5e-5, "decode_seqs": 1e-4, "decode_context": 1e-8})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 120),
    rate=st.floats(0.5, 200),
    prompt_max=st.integers(1, 3000),
    out_max=st.integers(1, 300),
    replicas=st.integers(1, 4),
    blocks=st.integers(40, 400),
    budget=st.integers(64, 4096),
    router=st.sampled_from(["round-robin", "random", "least-requests"]),
    fail_at=st.lists(st.tuples(st.integers(0, 5), st.floats(0, 30)), max_size=3),
    on_failure=st.sampled_from(["retry", "fail"]),
    policy=st.sampled_from(["fcfs", "priority"]),
    seed=st.integers(0, 2**16),
)
@example(n=28, rate=15.0, prompt_max=1, out_max=263, replicas=2, blocks=41, budget=64, router="round-robin",
         fail_at=[], on_failure="retry", policy="priority", seed=0)  # empty step after self-preemption
def test_every_request_ends_exactly_once(n, rate, prompt_max, out_max, replicas, blocks, budget, router,
                                         fail_at, on_failure, policy, seed):
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1 / rate, n))
    df = pd.DataFrame({"arrival_s": t - t[0], "prompt_tokens": rng.integers(1, prompt_max + 1, n),
                       "output_tokens": rng.integers(1, out_max + 1, n),
                       "priority": rng.integers(0, 3, n),
                       "hash_ids": [list(rng.integers(0, 4, size=4)) for _ in range(n)]})
    w = Workload(df, hash_block_size=64)
    cfg = ClusterConfig(workload=w, engine=EngineConfig(num_gpu_blocks=blocks, max_num_batched_tokens=budget,
                                                       max_model_len=(blocks - 1) * 16, scheduling_policy=policy),
                        make_step_model=lambda: LIN, router=make_router(router), replicas=replicas, seed=seed,
                        failures=FailureConfig(inject=fail_at, on_failure=on_failure, max_retries=1))
    out = Cluster(cfg).run()
    req = out.requests
    assert len(req) == n
    assert req.status.isin(["completed", "rejected", "failed"]).all()
    assert req.loc[req.status != "completed", "reason"].notna().all()
    ok = req[req.status == "completed"]
    assert (ok.output_tokens == w.df.output_tokens[ok.index]).all()
    assert (ok.ttft_s > 0).all() and (ok.e2e_s >= ok.ttft_s).all()
    too_long = (w.df.prompt_tokens + w.df.output_tokens) > (blocks - 1) * 16
    assert (req.status[too_long] == "rejected").all()
    s = out.summary
    assert s["requests_completed"] + s["requests_rejected"] + s["requests_failed"] == n
