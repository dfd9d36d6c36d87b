"""The policy study's expected effects, each checked on a small workload built to show it clearly.

- Prefix-aware and hybrid routers beat round-robin on prefix hit rate *and* TTFT when prompts share
  long prefixes and one replica's cache cannot hold them all.
- Sticky routing (consistent hashing with bounded loads) imbalances load when session sizes are
  skewed: bounded loads cap in-flight *counts*, and a chat session has one request in flight at a time.
- Stale scraped gauges (``router.staleness_s``) hurt the routers that read them (least-kv,
  power-of-two on ``waiting``, llm-d's queue/kv scorers), and cannot touch least-requests, whose
  in-flight counts are router-tracked and exact.

Plus the study scripts' plumbing: every scenario they build validates, and a tiny grid runs through
tables and plots.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import sim
from studies import autoscaling_study, routing_study
from studies.common import markdown_table, rows_frame, run_cases

MODEL = {"gpu": "H100-80GB", "model": "llama-3.1-8b"}


def _run(workload: dict, router: dict, *, replicas: int = 4, engine: dict | None = None, seed: int = 0) -> sim.Result:
    cluster = {"replicas": replicas, **MODEL, "engine": engine or {"max_model_len": 32768}}
    return sim.run({"seed": seed, "workload": workload, "cluster": cluster, "router": router})


# ------------------------------------------------------------------------------ shared prefixes
# 16 system prompts of 4000 tokens, each request one of them + a unique 200-token question.
# 1600 KV blocks x 16 tokens = 25.6k tokens per replica: room for about 6 of the 16 prompts. Round-
# robin sends every prompt to every replica, so each cache cycles through all 16 and mostly misses;
# a prefix-aware router gives each replica its own ~4 prompts, which stay cached.
SHARED_PREFIX = {"synthetic": {"arrival": "poisson", "rate_per_s": 8, "num_requests": 300, "prompt_tokens": 200,
                               "output_tokens": 50,
                               "shared_prefix": {"tenants": 1, "prompts_per_tenant": 16, "system_prompt_tokens": 4000}}}
SMALL_CACHE = {"num_gpu_blocks": 1600, "max_model_len": 16384}


@pytest.fixture(scope="module")
def round_robin_shared() -> dict:
    return _run(SHARED_PREFIX, {"policy": "round-robin"}, engine=SMALL_CACHE).summary


@pytest.mark.parametrize("router", [
    {"policy": "prefix-aware", "mode": "approximate"},
    {"policy": "prefix-aware", "mode": "precise"},
    {"policy": "hybrid", "style": "seed"},
    {"policy": "hybrid", "style": "llm-d"},
    {"policy": "hybrid", "style": "sglang"},
    {"policy": "hybrid", "style": "dynamo"},
], ids=lambda r: "-".join(str(v) for v in r.values()))
def test_prefix_aware_and_hybrid_beat_round_robin_on_hit_rate_and_ttft(router, round_robin_shared):
    rr = round_robin_shared
    s = _run(SHARED_PREFIX, router, engine=SMALL_CACHE).summary
    assert s["requests_completed"] == rr["requests_completed"] == 300
    assert rr["prefix_hit_rate"] < 0.5  # the premise: round-robin thrashes the small caches
    assert s["prefix_hit_rate"] >= rr["prefix_hit_rate"] + 0.2
    # A hit skips a 4000-token prefill: the median request's TTFT drops several-fold.
    assert s["ttft_p50_s"] <= 0.5 * rr["ttft_p50_s"]
    assert s["ttft_mean_s"] <= 0.8 * rr["ttft_mean_s"]


# ---------------------------------------------------------------------------- skewed sessions
def _zipf_sessions_csv(path, *, sessions: int = 12, total: int = 300, s: float = 1.2, gap_s: float = 2.0) -> pd.Series:
    """Sessions with Zipf-distributed sizes (session k has ~total * k^-s / H requests), one turn at a
    time: turn j arrives ``gap_s`` after turn j-1, well after it finished (a 2000-token prompt and
    50 output tokens take ~0.5 s). No prefix identity, so caching plays no part: only load does."""
    rng = np.random.default_rng(7)
    w = np.arange(1, sessions + 1, dtype=float) ** -s
    sizes = np.maximum(1, np.round(total * w / w.sum())).astype(int)
    rows = []
    for k, n in enumerate(sizes):
        start = rng.uniform(0, 10)
        rows += [(start + j * gap_s, 2000, 50, f"user{k}") for j in range(n)]
    df = pd.DataFrame(rows, columns=["arrival_s", "prompt_tokens", "output_tokens", "session_id"]).sort_values("arrival_s")
    df.to_csv(path, index=False)
    return pd.Series(sizes, index=[f"user{k}" for k in range(sessions)])


def test_sticky_routing_imbalances_load_on_skewed_sessions(tmp_path):
    path = tmp_path / "zipf_sessions.csv"
    sizes = _zipf_sessions_csv(path)
    hot = sizes.idxmax()
    assert sizes[hot] / sizes.sum() > 0.35  # the premise: one session carries over a third of the work
    sticky = _run({"trace": str(path)}, {"policy": "sticky"})
    rr = _run({"trace": str(path)}, {"policy": "round-robin"})
    # The hot session has one request in flight at a time, so bounded loads rarely move it: only
    # turns arriving while its home replica serves another session at a low total load spill
    # (with m <= 3 in flight on 4 replicas, C = ceil(1.25 m / 4) = 1).
    homes = sticky.requests.loc[sticky.requests["session_id"] == hot, "replica"].value_counts()
    assert homes.iloc[0] >= 0.9 * sizes[hot]
    assert rr.summary["load_imbalance"] < 1.1
    assert sticky.summary["load_imbalance"] > 1.4
    assert sticky.summary["load_imbalance"] > rr.summary["load_imbalance"] + 0.3


# ---------------------------------------------------------------------------------- staleness
# ~30 req/s of 2000-token prompts on 4 replicas: loaded enough that routing on fresh gauges matters.
# With gauges scraped every 5 s, every request between two scrapes sees the same numbers; routers
# that pick the least loaded by a gauge send a whole scrape period's arrivals to the same replica.
BUSY = {"synthetic": {"arrival": "poisson", "rate_per_s": 30, "num_requests": 400,
                      "prompt_tokens": {"dist": "lognormal", "mean": 2000, "cv": 1.0, "max": 16000},
                      "output_tokens": {"dist": "lognormal", "mean": 150, "cv": 1.0, "max": 1000}}}


# Power of two choices degrades gracefully: a stale gauge only misorders the two sampled replicas, it
# cannot send a whole scrape period to one replica (Mitzenmacher, "How useful is old information?").
@pytest.mark.parametrize("router,min_ratio", [
    ({"policy": "least-kv"}, 3.0),
    ({"policy": "power-of-two", "load": "waiting"}, 1.25),
    ({"policy": "hybrid", "style": "llm-d"}, 3.0),
], ids=["least-kv", "power-of-two-waiting", "hybrid-llm-d"])
def test_staleness_hurts_routers_that_read_scraped_gauges(router, min_ratio):
    fresh = _run(BUSY, {**router, "staleness_s": 0}).summary
    stale = _run(BUSY, {**router, "staleness_s": 5}).summary
    assert stale["requests_completed"] == fresh["requests_completed"] == 400
    assert stale["ttft_p99_s"] >= min_ratio * fresh["ttft_p99_s"]
    assert stale["ttft_mean_s"] >= min(min_ratio, 1.5) * fresh["ttft_mean_s"]


def test_staleness_cannot_touch_least_requests_whose_counts_are_exact():
    fresh = _run(BUSY, {"policy": "least-requests", "staleness_s": 0})
    stale = _run(BUSY, {"policy": "least-requests", "staleness_s": 5})
    pd.testing.assert_series_equal(fresh.requests["replica"], stale.requests["replica"])
    assert fresh.summary["ttft_p99_s"] == stale.summary["ttft_p99_s"]


# ------------------------------------------------------------------------------ study plumbing
@pytest.mark.parametrize("quick", [True, False], ids=["quick", "full"])
def test_every_study_scenario_validates(quick):
    cases = routing_study.build_cases(quick) + autoscaling_study.build_cases(quick, sizing=(2, 6))
    assert cases
    for c in cases:
        sim.load_scenario(c.scenario)  # raises ConfigError on any bad key or value
    labels = {tuple(c.labels.items()) for c in cases}
    assert len(labels) == len(cases)  # no two runs share a row label


def test_tiny_grid_runs_through_tables_and_plots(tmp_path):
    tiny = {"synthetic": {**SHARED_PREFIX["synthetic"], "num_requests": 40}}
    wl = routing_study.WorkloadCase(
        key="tiny", title="tiny", why="plumbing", workload=tiny, quick_workload=tiny,
        cluster={"replicas": 2, **MODEL, "engine": SMALL_CACHE}, loads=(1.0,), sticky={"key": "session"},
        routers=("round-robin", "prefix-aware precise"))
    df = rows_frame(run_cases(routing_study.build_cases(False, [wl]), post=routing_study.routing_columns,
                              log=lambda m: None))
    assert set(df["replicas_used"]) <= {1, 2} and (df["usd_per_1k_good"] > 0).all()
    assert list(df["router"]) == ["round-robin", "prefix-aware precise"]
    text = routing_study.report(df, [wl])
    assert text.count("\n| 1 |") == 2 and "prefix hit" in text
    (png,) = routing_study.plot(df, tmp_path, [wl])
    assert png.stat().st_size > 1000
    assert markdown_table(df.head(1), [("router", "r", "")]).splitlines()[2] == "| round-robin |"
