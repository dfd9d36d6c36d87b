"""Synthetic generators: the core contract form, arrival processes, lengths, sessions, shared
prefixes, seeding."""

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import sim  # noqa: F401  (import order: see traces/__init__.py)
from traces.config import WorkloadSpec, build_workload
from traces.synthetic import SyntheticSpec, generate
from traces.synthetic.arrivals import load_servegen
from traces.stats import trace_stats

SIMPLE = {"arrival": "poisson", "rate_per_s": 5, "num_requests": 200, "prompt_tokens": 1000, "output_tokens": 100}


def gen(seed=0, **kw):
    return generate(SyntheticSpec(**kw), seed=seed)


def cv(t):
    g = np.diff(t)
    return g.std() / g.mean()


def test_core_contract_simple_form():
    w = build_workload(WorkloadSpec(synthetic=SIMPLE), seed=0)
    df = w.df
    assert len(df) == 200
    assert (df["prompt_tokens"] == 1000).all() and (df["output_tokens"] == 100).all()
    t = df["arrival_s"].to_numpy()
    assert t[0] == 0 and np.all(np.diff(t) >= 0)
    assert 200 / t[-1] == pytest.approx(5, rel=0.3)
    # default spec still gives the documented defaults
    assert len(build_workload(WorkloadSpec(synthetic={}), seed=1)) == 200


def test_seeded_and_reproducible():
    a = build_workload(WorkloadSpec(synthetic=SIMPLE), seed=7).df
    b = build_workload(WorkloadSpec(synthetic=SIMPLE), seed=7).df
    c = build_workload(WorkloadSpec(synthetic=SIMPLE), seed=8).df
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["arrival_s"], c["arrival_s"])


def test_one_stream_per_purpose():
    base = gen(3, num_requests=500, prompt_tokens=100)
    other = gen(3, num_requests=500, prompt_tokens={"dist": "lognormal", "mean": 300, "cv": 2},
                output_tokens={"dist": "uniform", "min": 5, "max": 50})
    np.testing.assert_array_equal(base.df["arrival_s"], other.df["arrival_s"])  # lengths changed, arrivals not


def test_poisson_rate_and_cv():
    t = gen(1, rate_per_s=20, num_requests=20_000).df["arrival_s"].to_numpy()
    assert len(t) / t[-1] == pytest.approx(20, rel=0.03)
    assert cv(t) == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("target", [0.5, 3.0])
def test_gamma_cv(target):
    t = gen(2, arrival="gamma", cv=target, rate_per_s=10, num_requests=20_000).df["arrival_s"].to_numpy()
    assert cv(t) == pytest.approx(target, rel=0.1)
    assert len(t) / t[-1] == pytest.approx(10, rel=0.1)


def test_on_off_bursts_leave_off_periods_empty():
    w = gen(4, arrival="onoff", rate_per_s=5, duration_s=2000, burst={"on_s": 10, "off_s": 30})
    t = w.df["arrival_s"].to_numpy()
    assert len(t) / 2000 == pytest.approx(5, rel=0.1)  # long-run mean kept
    phase = np.sort(t % 40.0)
    circular_gaps = np.diff(np.concatenate([phase, [phase[0] + 40.0]]))
    assert circular_gaps.max() >= 29.0  # all arrivals fall inside one 10 s window of each 40 s period
    assert (np.diff(t) > 25).sum() >= 45  # one long silence per period (~50 periods)


def test_random_bursts_are_bursty_and_reproducible():
    kw = dict(rate_per_s=5, num_requests=5000, burst={"on_s": 5, "off_s": 20, "random": True, "off_rate_fraction": 0.05})
    a, b = gen(5, **kw).df["arrival_s"], gen(5, **kw).df["arrival_s"]
    np.testing.assert_array_equal(a, b)
    assert cv(a.to_numpy()) > 2


def test_diurnal_rate_curve():
    spec = dict(rate_per_s=10, duration_s=86400 * 2, rate_curve={"diurnal": {"period_s": 86400, "amplitude": 0.8, "peak_s": 43200}})
    t = gen(6, **spec).df["arrival_s"].to_numpy()
    hours = np.bincount(((t % 86400) // 3600).astype(int), minlength=24) / 2
    assert hours[11:13].mean() / hours[[0, 23]].mean() == pytest.approx(9, rel=0.25)  # (1+a)/(1-a)


def test_servegen_curve_shape_and_absolute_rates():
    _, r = load_servegen("m-large")
    spec = dict(rate_per_s=20, duration_s=2016 * 600 / 600, rate_curve={"servegen": "m-large", "speedup": 600})
    t = gen(7, **spec).df["arrival_s"].to_numpy()
    counts = np.bincount((t // 1.0).astype(int), minlength=2016)[:2016]  # one curve window per simulated second
    assert np.corrcoef(counts, r)[0, 1] > 0.6
    assert len(t) / 2016 == pytest.approx(20, rel=0.05)
    w = gen(7, num_requests=2000, rate_curve={"servegen": "m-large", "absolute": True})
    assert len(w) / w.df["arrival_s"].iloc[-1] == pytest.approx(r[:3].mean(), rel=0.2)


def test_length_distributions():
    n = 20_000
    w = gen(8, num_requests=n, prompt_tokens={"dist": "lognormal", "mean": 2000, "cv": 1.5},
            output_tokens={"dist": "uniform", "min": 10, "max": 20})
    p, o = w.df["prompt_tokens"], w.df["output_tokens"]
    assert p.mean() == pytest.approx(2000, rel=0.05) and p.std() / p.mean() == pytest.approx(1.5, rel=0.15)
    assert o.min() == 10 and o.max() == 20
    w = gen(8, num_requests=100, prompt_tokens={"dist": "lognormal", "mean": 2000, "cv": 3, "max": 4096})
    assert w.df["prompt_tokens"].max() <= 4096 and w.df["prompt_tokens"].min() >= 1


def test_lengths_resampled_from_a_trace_keep_pairs():
    from traces.config import load_trace

    conv = load_trace("azure2023-conv").df
    pairs = set(zip(conv["prompt_tokens"], conv["output_tokens"]))
    spec = {"num_requests": 500, "prompt_tokens": {"dist": "trace", "trace": "azure2023-conv"},
            "output_tokens": {"dist": "trace", "trace": "azure2023-conv"}}
    w = build_workload(WorkloadSpec(synthetic=spec), seed=9)
    assert set(zip(w.df["prompt_tokens"], w.df["output_tokens"])) <= pairs
    spec["output_tokens"] = 64
    w = build_workload(WorkloadSpec(synthetic=spec), seed=9)
    assert set(w.df["prompt_tokens"]) <= set(conv["prompt_tokens"]) and (w.df["output_tokens"] == 64).all()
    spec = {"num_requests": 20_000, "prompt_tokens": {"dist": "trace", "trace": "azure2023-conv", "fit": "lognormal"}}
    p = build_workload(WorkloadSpec(synthetic=spec), seed=9).df["prompt_tokens"]
    target = conv["prompt_tokens"]
    assert p.mean() == pytest.approx(target.mean(), rel=0.05) and p.std() == pytest.approx(target.std(), rel=0.15)
    assert not set(p) <= set(target)  # fitted, not resampled


def test_sessions_grow_prompts_and_share_prefixes():
    spec = dict(rate_per_s=1, num_requests=400, prompt_tokens=500, output_tokens=80,
                sessions={"turns": 4, "think_time_s": 5.0, "user_tokens": 50,
                          "service_estimate": {"prefill_tokens_per_s": 1000, "s_per_output_token": 0.01}})
    w = gen(10, **spec)
    assert len(w) == 400 and w.hash_block_size == 16
    assert any("open-loop" in n for n in w.notes)
    for _, g in w.df.groupby("session_id"):
        g = g.sort_values("turn")
        p, o, t = g["prompt_tokens"].to_numpy(), g["output_tokens"].to_numpy(), g["arrival_s"].to_numpy()
        assert np.array_equal(p[1:], p[:-1] + o[:-1] + 50)
        np.testing.assert_allclose(np.diff(t), p[:-1] / 1000 + o[:-1] * 0.01 + 5.0)
        ids = g["hash_ids"].tolist()
        for a, b in zip(ids, ids[1:]):
            assert b[: len(a)] == a
        # what a closed-loop replay needs: the previous turn and the think time after it
        assert g["parent_request_id"].iloc[1:].tolist() == g["request_id"].iloc[:-1].tolist()
        assert g["parent_request_id"].isna().iloc[0] and np.isnan(g["think_time_s"].iloc[0])
        assert (g["think_time_s"].iloc[1:] == 5.0).all()
    s = trace_stats(w)
    assert s["sessions"]["mean_turns"] == pytest.approx(4, abs=0.1)
    assert s["prefix_reuse"]["ratio"] > 0.5


def test_shared_system_prompts_form_a_prefix_tree():
    spec = dict(num_requests=300, prompt_tokens=100,
                shared_prefix={"tenants": 3, "prompts_per_tenant": 2, "tenant_prefix_tokens": 200, "system_prompt_tokens": 1000})
    w = gen(11, **spec)
    df = w.df
    assert set(df["tenant"]) == {"tenant0", "tenant1", "tenant2"}
    assert (df["prompt_tokens"] == 1300).all()
    ids = df["hash_ids"].tolist()
    by_tenant = df.groupby("tenant").indices
    for tenant, rows in by_tenant.items():
        heads = {tuple(ids[i][:12]) for i in rows}  # 200-token tenant prefix = 12 full blocks
        assert len(heads) == 1
        systems = {tuple(ids[i][:1200 // 16]) for i in rows}
        assert len(systems) == 2  # two system prompts per tenant
    assert len({tuple(ids[by_tenant[t][0]][:12]) for t in by_tenant}) == 3  # tenants differ
    tails = [ids[i][-1] for i in range(len(ids))]
    assert len(set(tails)) == len(tails)  # user suffixes are unique


def test_zipf_popularity_skews_tenants():
    spec = dict(num_requests=3000, shared_prefix={"tenants": 5, "tenant_popularity": "zipf", "zipf_s": 1.5})
    counts = gen(12, **spec).df["tenant"].value_counts()
    assert counts["tenant0"] > 2 * counts["tenant1"] > 0


def test_duration_bound():
    w = gen(13, rate_per_s=3, duration_s=100)
    assert w.df["arrival_s"].max() < 100 and 200 < len(w) < 400


@pytest.mark.parametrize(
    "bad",
    [
        {"arrival": "gamma"},
        {"arrival": "poisson", "cv": 2},
        {"arrival": "onoff"},
        {"rate_per_s": 0},
        {"prompt_tokens": 0},
        {"prompt_tokens": {"dist": "uniform", "min": 10, "max": 5}},
        {"prompt_tokens": {"dist": "weird"}},
        {"unknown_key": 1},
        {"rate_curve": {"diurnal": {}, "servegen": "m-large"}},
    ],
)
def test_invalid_specs_are_rejected(bad):
    with pytest.raises(ValidationError):
        SyntheticSpec(**bad)


@settings(max_examples=25, deadline=None)
@given(
    rate=st.floats(0.1, 100),
    n=st.integers(1, 300),
    c=st.one_of(st.none(), st.floats(0.2, 5)),
    seed=st.integers(0, 2**32 - 1),
)
def test_arrivals_are_sorted_and_complete(rate, n, c, seed):
    kw = dict(rate_per_s=rate, num_requests=n, prompt_tokens={"dist": "exponential", "mean": 50})
    if c is not None:
        kw.update(arrival="gamma", cv=c)
    df = gen(seed, **kw).df
    t = df["arrival_s"].to_numpy()
    assert len(df) == n and t[0] == 0 and np.all(np.diff(t) >= 0) and np.all(np.isfinite(t))
    assert df["prompt_tokens"].min() >= 1
