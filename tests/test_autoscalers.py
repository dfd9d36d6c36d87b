"""Autoscalers' decision rules (and the cold-start distribution) on hand-built cluster states."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from tests.fakes import FakeView  # noqa: E402

from policies import ClusterView, ReplicaState, make_autoscaler
from policies.cold_start import PRESETS, ColdStartDistribution
from sim.errors import ConfigError

S, ST, DR = ReplicaState.SERVING, ReplicaState.STARTING, ReplicaState.DRAINING




def cluster(now=0.0, serving=0, starting=0, draining=0, arrivals=0, waiting=0, **gauges) -> ClusterView:
    """``serving`` replicas with the same gauges (``gauges`` may give per-replica lists)."""
    vs = []
    for i in range(serving):
        kw = {k: (v[i] if isinstance(v, (list, tuple)) else v) for k, v in gauges.items()}
        vs.append(FakeView(i, S, **kw))
    vs += [FakeView(100 + i, ST) for i in range(starting)]
    vs += [FakeView(200 + i, DR, inflight_requests=7) for i in range(draining)]
    return ClusterView(now=now, replicas=vs, arrivals_total=arrivals, cluster_waiting=waiting)


# -- none -----------------------------------------------------------------------------------------

def test_none_keeps_size_and_clamps():
    a = make_autoscaler("none")
    assert a.desired(0, cluster(serving=3, starting=1)) == 4
    assert make_autoscaler("none", max_replicas=2).desired(0, cluster(serving=3)) == 2


# -- HPA ------------------------------------------------------------------------------------------

def test_hpa_holds_within_tolerance():
    a = make_autoscaler("hpa", metric="kv", target=0.7, max_replicas=20)
    assert a.desired(0, cluster(serving=4, kv_usage=0.76)) == 4  # ratio 1.086
    assert a.desired(15, cluster(serving=4, kv_usage=0.64)) == 4  # ratio 0.914
    assert a.desired(30, cluster(serving=4, kv_usage=0.78)) == 5  # ratio 1.114: ceil(4.457)


def test_hpa_scales_by_ceil_ratio_times_ready():
    a = make_autoscaler("hpa", metric="running", target=10, max_replicas=50)
    assert a.desired(0, cluster(serving=3, num_running=[20, 15, 16])) == math.ceil(51 / 30 * 3)  # 6
    b = make_autoscaler("hpa", metric="concurrency", target=10, max_replicas=50)
    assert b.desired(0, cluster(serving=3, num_running=10, num_waiting=6)) == 5  # ratio 1.6 -> ceil(4.8)
    c = make_autoscaler("hpa", metric="waiting", target=4, max_replicas=50)
    assert c.desired(0, cluster(serving=3, num_waiting=[4, 4, 5])) == 3  # 13/12 = 1.083: hold


def test_hpa_scale_up_rate_limit_max_of_4_pods_and_100_percent():
    a = make_autoscaler("hpa", metric="waiting", target=1, max_replicas=100)
    assert a.desired(0, cluster(serving=2, num_waiting=50)) == 6  # +4 beats +100%
    assert a.desired(5, cluster(serving=6, num_waiting=50)) == 6  # same 15 s period: started at 2, limit 6
    assert a.desired(15, cluster(serving=6, num_waiting=50)) == 12  # new period: +100% beats +4
    b = make_autoscaler("hpa", metric="waiting", target=1, max_replicas=9)
    assert b.desired(0, cluster(serving=8, num_waiting=50)) == 9  # and max_replicas


def test_hpa_scale_down_waits_for_the_300s_window_max():
    a = make_autoscaler("hpa", metric="running", target=10, max_replicas=20)
    assert a.desired(0, cluster(serving=8, num_running=10)) == 8  # recommendation 8 at t=0
    out = {t: a.desired(t, cluster(serving=8, num_running=2)) for t in range(15, 301, 15)}  # raw 2
    assert all(out[t] == 8 for t in range(15, 300, 15))  # max over the last 300 s still includes 8
    assert out[300] == 2  # the t=0 recommendation left the window (cutoff is exclusive)


def test_hpa_scale_down_window_tracks_intermediate_recommendations():
    a = make_autoscaler("hpa", metric="running", target=10, max_replicas=20)
    a.desired(0, cluster(serving=8, num_running=10))
    a.desired(100, cluster(serving=8, num_running=5))  # raw 4, held at 8
    assert a.desired(301, cluster(serving=8, num_running=1)) == 4  # max over (1, 301] = 4
    assert a.desired(401, cluster(serving=4, num_running=1)) == 1


def test_hpa_warm_start_seeds_the_window_with_the_initial_size():
    warm = make_autoscaler("hpa", metric="running", target=10, max_replicas=20)
    cold = make_autoscaler("hpa", metric="running", target=10, max_replicas=20, warm_start=False)
    idle = cluster(serving=6, num_running=0)
    assert cold.desired(0, idle) == 1  # a brand-new HPA has no history: straight to min
    assert [warm.desired(t, idle) for t in (0, 150, 285)] == [6, 6, 6]
    assert warm.desired(300, idle) == 1


def test_hpa_scale_down_rate_policy():
    a = make_autoscaler("hpa", metric="running", target=10, max_replicas=20,
                        scale_down={"stabilization_window_s": 0, "policies": [{"type": "pods", "value": 2, "period_s": 60}]})
    assert a.desired(0, cluster(serving=10, num_running=0)) == 8
    assert a.desired(15, cluster(serving=8, num_running=0)) == 8  # 2 already removed this minute
    assert a.desired(61, cluster(serving=8, num_running=0)) == 6


def test_hpa_starting_replicas_are_conservative():
    a = make_autoscaler("hpa", metric="running", target=10, max_replicas=20)
    # scale-up: 2 ready at 2x target, 2 starting count as 0 -> ratio 1.0: hold
    assert a.desired(0, cluster(serving=2, starting=2, num_running=20)) == 4
    # ... at 3x target: (30+30+0+0)/4/10 = 1.5 -> ceil(1.5 * 4) = 6
    assert a.desired(15, cluster(serving=2, starting=2, num_running=30)) == 6
    b = make_autoscaler("hpa", metric="running", target=10, max_replicas=20, warm_start=False)
    # scale-down: 2 ready at half target, 2 starting count as at target -> 0.75 * 4 = 3
    assert b.desired(0, cluster(serving=2, starting=2, num_running=5)) == 3
    # draining replicas are ignored entirely
    c = make_autoscaler("hpa", metric="running", target=10, max_replicas=20)
    assert c.desired(0, cluster(serving=2, draining=3, num_running=10)) == 2


def test_hpa_custom_metric_and_bounds():
    a = make_autoscaler("hpa", metric=lambda v: v.inflight_requests, target=5, min_replicas=2, max_replicas=4)
    assert a.desired(0, cluster(serving=2, inflight_requests=50)) == 4  # ratio 10 -> clamped
    assert make_autoscaler("hpa", metric="os.path:getsize").metric_fn.__name__ == "getsize"
    assert make_autoscaler("hpa", min_replicas=3, max_replicas=5).desired(0, cluster(serving=1)) == 3
    assert make_autoscaler("hpa", max_replicas=5).desired(0, cluster(serving=7, kv_usage=0.7)) == 5


# -- KPA ------------------------------------------------------------------------------------------

def run_kpa(a, concurrency_at, ready_at=lambda t: 2, until=200):
    """Observe every 1 s, decide every 2 s; returns {t: (desired, in_panic)}."""
    out = {}
    for t in range(until + 1):
        view = cluster(now=t, serving=ready_at(t), inflight_requests=0, waiting=concurrency_at(t))
        a.observe(t, view)
        if t % 2 == 0:
            out[t] = (a.desired(t, view), a.in_panic)
    return out


def test_kpa_enters_panic_at_2x_and_never_decreases_while_panicking():
    a = make_autoscaler("kpa", target=10, target_utilization=1.0, max_replicas=100)
    conc = lambda t: 20 if t <= 60 else (60 if t <= 70 else 20)  # noqa: E731
    out = run_kpa(a, conc)
    assert out[60] == (2, False)  # steady 20 over 2 ready at target 10
    # t=62: panic window (56, 62] = four 20s and two 60s -> avg 33.3 -> dppc 4 -> 4/2 >= 2: panic
    assert out[62][1] is True
    assert out[62][0] == 4  # max(stable ceil(21.33/10)=3, panic 4)
    peak = max(d for t, (d, _) in out.items() if 62 <= t <= 80)
    assert peak == 6  # panic avg reaches 60 -> 6 pods
    panicking = [t for t, (_, p) in out.items() if p]
    ds = [out[t][0] for t in panicking]
    assert ds == sorted(ds)  # never decreases in panic


def test_kpa_leaves_panic_after_a_full_stable_window_without_trigger():
    a = make_autoscaler("kpa", target=10, target_utilization=1.0, max_replicas=100)
    conc = lambda t: 60 if 61 <= t <= 70 else 20  # noqa: E731
    out = run_kpa(a, conc)
    # Over the threshold while the 6 s panic window (t-6, t] holds >= two 60s: avg >= 33.3 -> dppc 4
    # -> 4/2 >= 2. The last such tick is t=74 (samples 69..74).
    last_trigger = 74
    assert out[74][1] and out[76][0] >= out[74][0]
    assert all(out[t][1] for t in range(62, last_trigger + 61, 2) if t in out)  # still panicking
    first_after = min(t for t in out if t > last_trigger + 60)
    assert out[first_after][1] is False
    assert out[first_after][0] == 2  # back to the stable count (60 s of 20)


def test_kpa_scale_down_rate_and_no_data():
    a = make_autoscaler("kpa", target=10, target_utilization=1.0, max_replicas=100)
    assert a.desired(0, ClusterView(0, [], 0)) == 1  # empty: 0 concurrency -> 0 pods, clamped to min 1
    b = make_autoscaler("kpa", target=10, target_utilization=1.0, max_replicas=100, min_replicas=0)
    out = run_kpa(b, lambda t: 0, ready_at=lambda t: 8, until=10)
    assert out[10][0] == 4  # wants 0, but at most halves: floor(8 / 2)


def test_kpa_default_target_is_70_per_replica():
    a = make_autoscaler("kpa", max_replicas=100)
    out = run_kpa(a, lambda t: 280, ready_at=lambda t: 4, until=60)
    assert out[60][0] == 4  # 280 / 70 = 4


def test_kpa_rps_metric():
    a = make_autoscaler("kpa", metric="rps", target=5, target_utilization=1.0, max_replicas=100)
    for t in range(0, 61):
        v = cluster(now=t, serving=2, arrivals=20 * t)  # 20 requests/s
        a.observe(t, v)
    assert a.desired(60, v) == 4


def test_kpa_scale_down_delay_holds_the_window_max():
    a = make_autoscaler("kpa", target=10, target_utilization=1.0, max_replicas=100, scale_down_delay_s=30,
                        stable_window_s=6)
    out = run_kpa(a, lambda t: 40 if t < 20 else 10, ready_at=lambda t: 4, until=80)
    assert out[18][0] == 4
    assert out[40][0] == 4  # raw drops to 2 by t=26, held by the 30 s max window
    assert out[60][0] < 4


# -- Ray Serve ------------------------------------------------------------------------------------

def test_ray_serve_upscale_delay_counts_consecutive_ticks():
    a = make_autoscaler("ray-serve", sync_period_s=1.0, upscale_delay_s=30, max_replicas=20,
                        look_back_period_s=5, metric_period_s=1.0)
    busy = cluster(serving=2, inflight_requests=10)  # 20 ongoing / target 2 = 10 replicas
    out = [a.desired(float(t), busy) for t in range(31)]
    assert out[:30] == [2] * 30 and out[30] == 10  # applied on the 31st consecutive tick


def test_ray_serve_downscale_delay_and_counter_reset():
    a = make_autoscaler("ray-serve", sync_period_s=1.0, downscale_delay_s=10, max_replicas=20,
                        look_back_period_s=1, metric_period_s=1.0)
    idle = cluster(serving=4, inflight_requests=1)  # 4 ongoing -> 2 replicas
    out = [a.desired(float(t), idle) for t in range(8)]
    busy = cluster(serving=4, inflight_requests=4)  # 16 -> 8: opposite direction resets
    out.append(a.desired(8.0, busy))
    out += [a.desired(float(t), idle) for t in range(9, 21)]
    assert out[:9] == [4] * 9
    assert out[9:19] == [4] * 10 and out[19] == 2  # 11 fresh consecutive downscale ticks


def test_ray_serve_smoothing_and_stuck_downscale():
    a = make_autoscaler("ray-serve", smoothing_factor=0.5, max_replicas=100)
    assert a.apply_scaling_factors(10, 2) == 6  # ceil(2 + 0.5 * 8)
    b = make_autoscaler("ray-serve", downscaling_factor=0.1, max_replicas=100)
    assert b.apply_scaling_factors(1.5, 3) == 2  # ceil(2.85) = 3 is stuck: forced -1
    assert b.apply_scaling_factors(2.5, 3) == 3  # ceil(2.5) is not below 3: no forced step
    assert b.apply_scaling_factors(10, 3) == 10  # upscaling uses smoothing_factor 1.0


def test_ray_serve_look_back_mean_and_cold_start_from_zero():
    a = make_autoscaler("ray-serve", look_back_period_s=10, metric_period_s=1.0, max_replicas=10)
    for t in range(10):
        a.observe(float(t), cluster(serving=1, inflight_requests=0 if t < 5 else 10))
    assert a.total_ongoing() == pytest.approx(5.0)
    c = make_autoscaler("ray-serve", min_replicas=0, max_replicas=5)
    assert c.desired(0.0, ClusterView(0.0, [], 0, cluster_waiting=3)) == 1  # no delay from zero
    assert c.desired(0.1, ClusterView(0.1, [], 0, cluster_waiting=0)) == 0


# -- saturation (llm-d WVA) -----------------------------------------------------------------------

def test_saturation_scale_up_triggers():
    a = make_autoscaler("saturation", max_replicas=10)
    assert a.desired(0, cluster(serving=2, kv_usage=[0.75, 0.72])) == 3  # avg spare kv 0.065 < 0.10
    b = make_autoscaler("saturation", max_replicas=10)
    assert b.desired(0, cluster(serving=2, kv_usage=0.2, num_waiting=[3, 2])) == 3  # spare queue 2.5 < 3
    c = make_autoscaler("saturation", max_replicas=10)
    assert c.desired(0, cluster(serving=2, kv_usage=[0.9, 0.85])) == 3  # all saturated
    d = make_autoscaler("saturation", max_replicas=10)
    # one saturated replica is excluded from the spare average: (0.8-0.3)=0.5, queue 5 -> hold
    assert d.desired(0, cluster(serving=2, kv_usage=[0.95, 0.3])) == 2


def test_saturation_no_scale_up_while_pending():
    a = make_autoscaler("saturation", max_replicas=10)
    assert a.desired(0, cluster(serving=2, starting=1, kv_usage=0.79)) == 3  # holds current (2 + 1 starting)
    assert "blocked" in a.last_reason


def test_saturation_scale_down_only_if_n_minus_1_keeps_spare():
    a = make_autoscaler("saturation", max_replicas=10)
    assert a.desired(0, cluster(serving=2, kv_usage=[0.5, 0.6])) == 2  # 1.1 on one replica: unsafe
    b = make_autoscaler("saturation", max_replicas=10)
    assert b.desired(0, cluster(serving=2, kv_usage=[0.1, 0.2])) == 1  # 0.3 on one: spare 0.5, queue 5
    c = make_autoscaler("saturation", max_replicas=10)
    assert c.desired(0, cluster(serving=3, kv_usage=0.1, num_waiting=[1, 1, 1])) == 2  # 3/2 = 1.5 -> spare 3.5
    d = make_autoscaler("saturation", max_replicas=10)
    assert d.desired(0, cluster(serving=3, kv_usage=0.1, num_waiting=[2, 1, 2])) == 3  # 5/2 = 2.5 -> spare 2.5 < 3
    e = make_autoscaler("saturation", min_replicas=2, max_replicas=10)
    assert e.desired(0, cluster(serving=2, kv_usage=0.0)) == 2  # min clamps


def test_saturation_uses_one_minute_peaks():
    a = make_autoscaler("saturation", max_replicas=10)
    a.observe(0, cluster(now=0, serving=2, kv_usage=0.78))
    calm = cluster(now=30, serving=2, kv_usage=0.1)
    a.observe(30, calm)
    assert a.desired(30, calm) == 3  # the 0.78 peak is within the last 60 s
    b = make_autoscaler("saturation", max_replicas=10)
    b.observe(0, cluster(now=0, serving=2, kv_usage=0.78))
    for t in (15, 30, 45, 60):
        b.observe(t, cluster(now=t, serving=2, kv_usage=0.1))
    assert b.desired(60, cluster(now=60, serving=2, kv_usage=0.1)) == 1  # peak aged out: scale down


# -- every autoscaler -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["none", "hpa", "kpa", "ray-serve", "saturation"])
def test_every_autoscaler_clamps_to_bounds(name):
    a = make_autoscaler(name, min_replicas=2, max_replicas=3)
    g = np.random.default_rng(0)
    for k in range(200):
        t = k * a.sync_period_s
        n = int(g.integers(0, 6))
        view = cluster(now=t, serving=n, starting=int(g.integers(0, 2)), inflight_requests=int(g.integers(0, 400)),
                       kv_usage=float(g.random()), num_waiting=int(g.integers(0, 20)), num_running=int(g.integers(0, 50)),
                       waiting=int(g.integers(0, 5)), arrivals=k * 10)
        a.observe(t, view)
        assert 2 <= a.desired(t, view) <= 3


@pytest.mark.parametrize(
    "name,params,fragment",
    [
        ("hpa", {"metric": "gpu"}, "metric"),
        ("hpa", {"metric": "nosuchmodule_xyz:f"}, "cannot import"),
        ("hpa", {"target": 0}, "target"),
        ("hpa", {"tolerance": 1.5}, "tolerance"),
        ("hpa", {"scale_up": {"stabilization_window_s": 0, "policies": [{"type": "pods", "value": 0, "period_s": 15}]}},
         "scale_up.policies.0.value"),
        ("hpa", {"min_replicas": 4, "max_replicas": 2}, "max_replicas"),
        ("kpa", {"panic_threshold_percentage": 50}, "panic_threshold_percentage"),
        ("kpa", {"metric": "qps"}, "metric"),
        ("ray-serve", {"target_ongoing_requests": 0}, "target_ongoing_requests"),
        ("ray-serve", {"aggregation_function": "p99"}, "aggregation_function"),
        ("saturation", {"kv_cache_threshold": 1.5}, "kv_cache_threshold"),
        ("none", {"target": 3}, "target: unknown parameter"),
        ("kpa", {"min_replicas": -1}, "min_replicas"),
        ("nope", {}, "unknown autoscaler"),
    ],
)
def test_bad_parameters_raise_one_line_config_errors(name, params, fragment):
    with pytest.raises(ConfigError) as e:
        make_autoscaler(name, **params)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# -- cold start -----------------------------------------------------------------------------------

def test_cold_start_sampling_is_seeded_and_sums_parts():
    spec = ColdStartDistribution.from_config("reference")
    a = spec.sample_parts(np.random.default_rng(5))
    b = spec.sample_parts(np.random.default_rng(5))
    assert a == b
    assert a.total_s == pytest.approx(a.provision_s + a.weights_s + a.compile_s + a.base_s)
    assert spec.sample(np.random.default_rng(5)) == a.total_s
    g = np.random.default_rng(1)
    xs = [spec.sample_parts(g) for _ in range(4000)]
    prov = np.array([x.provision_s for x in xs])
    assert 0.45 < (prov == 0).mean() < 0.55  # p = 0.5
    assert prov[prov > 0].min() >= 60 and prov.max() <= 300
    assert np.mean([x.total_s for x in xs]) == pytest.approx(spec.mean_s(), rel=0.03)


def test_cold_start_forms():
    assert ColdStartDistribution.from_config(90).sample(np.random.default_rng(0)) == 90.0
    blis = ColdStartDistribution.from_config("blis")
    g = np.random.default_rng(2)
    xs = np.array([blis.sample(g) for _ in range(3000)])
    assert abs(xs.mean() - 240) < 3 and abs(xs.std() - 30) < 3
    spec = ColdStartDistribution.from_config({"weights_s": [10, 20], "compile_s": {"dist": "lognormal", "median": 30, "sigma": 0.2}})
    s = spec.sample_parts(np.random.default_rng(0))
    assert 10 <= s.weights_s <= 20 and s.compile_s > 0 and s.provision_s == 0
    # the scenario's ColdStartSpec.model_dump() shape: numbers and {dist: fixed|...} mappings
    lead = ColdStartDistribution.from_spec({"provision_s": 0.0, "weights_s": {"dist": "fixed", "value": 12},
                                            "compile_s": {"dist": "uniform", "low": 20, "high": 40}})
    assert 32 <= lead.sample(np.random.default_rng(0)) <= 52
    assert set(PRESETS) >= {"reference", "warm", "new-node", "blis"}


@pytest.mark.parametrize(
    "x,fragment",
    [(-5, "must be >= 0"), ("lukewarm", "unknown preset"), ({"weights_s": {"dist": "uniform", "low": 5}}, "needs low, high"),
     ({"weights_s": [20, 10]}, "low <= high"), ({"network": 3}, "network"), (True, "expected seconds")],
)
def test_cold_start_bad_config(x, fragment):
    with pytest.raises(ConfigError) as e:
        ColdStartDistribution.from_config(x)
    assert fragment in str(e.value) and "\n" not in str(e.value)
