"""Admission control on hand-built cluster states: queue depth, priority shedding, tenant buckets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from policies import ClusterView, ReplicaState, RoutingRequest
from policies.admission import AdmissionController, make_admission
from sim.errors import ConfigError


@dataclass
class FakeView:
    replica_id: int
    num_waiting: int = 0
    state: ReplicaState = ReplicaState.SERVING
    num_running: int = 0
    kv_usage: float = 0.0
    inflight_requests: int = 0


def cluster(*waiting: int, gateway: int = 0) -> ClusterView:
    return ClusterView(now=0.0, replicas=[FakeView(i, w) for i, w in enumerate(waiting)], arrivals_total=0,
                       cluster_waiting=gateway)


def req(tenant=None, prompt=100, output=50, priority=0) -> RoutingRequest:
    return RoutingRequest(request_id=0, arrival_s=0.0, prompt_tokens=prompt, output_tokens=output,
                          tenant=tenant, priority=priority)


def test_no_limits_admits_everything_and_empty_config_is_none():
    assert make_admission() is None
    assert isinstance(make_admission(max_queue_depth=3), AdmissionController)
    a = AdmissionController()
    assert a.admit(req(), 0.0, cluster(1000)) == (True, None)


def test_max_queue_depth_counts_replica_and_gateway_queues():
    a = AdmissionController(max_queue_depth=10)
    assert a.admit(req(), 0.0, cluster(4, 5)) == (True, None)  # 9 waiting
    assert a.admit(req(), 0.0, cluster(4, 5, gateway=1)) == (False, "queue_full")
    assert a.admit(req(), 0.0, cluster(10)) == (False, "queue_full")
    assert a.rejections["queue_full"] == 2


def test_priority_shedding_lower_value_is_more_important():
    a = AdmissionController(max_queue_depth=100, priority_queue_depth={1: 50, 2: 20})
    busy = cluster(30)
    assert a.admit(req(priority=0), 0.0, busy) == (True, None)
    assert a.admit(req(priority=1), 0.0, busy) == (True, None)  # 30 < 50
    assert a.admit(req(priority=2), 0.0, busy) == (False, "shed:priority-2")  # 30 >= 20
    assert a.admit(req(priority=5), 0.0, busy) == (False, "shed:priority-5")  # inherits priority 2's depth
    assert a.admit(req(priority=1), 0.0, cluster(50)) == (False, "shed:priority-1")
    assert a.admit(req(priority=0), 0.0, cluster(99)) == (True, None)
    assert a.admit(req(priority=0), 0.0, cluster(100)) == (False, "queue_full")
    assert a.priority_depth(0) is None and a.priority_depth(3) == 20


def test_requests_per_minute_bucket_refills():
    a = AdmissionController(tenants={"tenant-a": {"requests_per_min": 60}})  # 1 per second, burst 60
    now = 0.0
    results = [a.admit(req("tenant-a"), now, cluster(0)) for _ in range(61)]
    assert all(ok for ok, _ in results[:60])
    assert results[60] == (False, "rate_limited:tenant-a")
    assert a.admit(req("tenant-a"), 0.5, cluster(0))[0] is False  # half a token refilled
    assert a.admit(req("tenant-a"), 1.0, cluster(0)) == (True, None)  # a whole one
    assert a.admit(req("tenant-b"), 1.0, cluster(0)) == (True, None)  # unlisted tenant: unlimited


def test_tokens_per_minute_bucket_admits_until_exhausted_then_debt_must_refill():
    a = AdmissionController(tenants={"t": {"tokens_per_min": 6000, "burst_s": 10}})  # 100/s, capacity 1000
    assert a.admit(req("t", prompt=600), 0.0, cluster(0)) == (True, None)  # 1000 -> 400
    assert a.admit(req("t", prompt=600), 0.0, cluster(0)) == (True, None)  # 400 > 0: admitted -> -200
    assert a.admit(req("t", prompt=1), 0.0, cluster(0)) == (False, "rate_limited:t")
    assert a.admit(req("t", prompt=1), 2.0, cluster(0)) == (False, "rate_limited:t")  # back to exactly 0
    assert a.admit(req("t", prompt=1), 2.5, cluster(0)) == (True, None)  # 50 > 0
    assert a._tenants["t"].tokens.level == pytest.approx(49)


def test_tokens_bucket_exact_levels_and_output_charge():
    a = AdmissionController(tenants={"t": {"tokens_per_min": 6000, "burst_s": 10}})
    r = req("t", prompt=600, output=500)
    a.admit(r, 0.0, cluster(0))
    b = a._tenants["t"].tokens
    assert b.level == pytest.approx(400)
    a.on_finished(r, 1.0, output_tokens=450)  # 400 + 100 refill - 450
    assert b.level == pytest.approx(50)
    a.on_finished(r, 1.0)  # the request's own output_tokens when not told
    assert b.level == pytest.approx(-450)
    assert a.admit(req("t", prompt=1), 4.0, cluster(0)) == (False, "rate_limited:t")  # -450 + 300 = -150
    assert a.admit(req("t", prompt=1), 6.0, cluster(0)) == (True, None)  # +50
    assert b.level == pytest.approx(49)
    no_out = AdmissionController(tenants={"t": {"tokens_per_min": 6000}}, charge_output_tokens=False)
    no_out.admit(r, 0.0, cluster(0))
    no_out.on_finished(r, 0.0)
    assert no_out._tenants["t"].tokens.level == pytest.approx(6000 - 600)


def test_default_tenant_limits_apply_per_tenant_and_requests_without_tenant():
    a = AdmissionController(default_tenant={"requests_per_min": 1, "burst_s": 60})
    assert a.admit(req("x"), 0.0, cluster(0))[0] and a.admit(req("y"), 0.0, cluster(0))[0]
    assert a.admit(req("x"), 0.0, cluster(0)) == (False, "rate_limited:x")
    assert a.admit(req(None), 0.0, cluster(0)) == (True, None)
    assert a.admit(req(None), 0.0, cluster(0)) == (False, "rate_limited:default")


def test_rejected_requests_are_not_charged():
    a = AdmissionController(max_queue_depth=5, tenants={"t": {"requests_per_min": 1}})
    for _ in range(10):
        assert a.admit(req("t"), 0.0, cluster(5)) == (False, "queue_full")
    assert a.admit(req("t"), 0.0, cluster(0)) == (True, None)  # its one request was never spent
    a2 = AdmissionController(tenants={"t": {"requests_per_min": 60, "tokens_per_min": 60}})
    a2.admit(req("t", prompt=100), 0.0, cluster(0))  # tokens 60 -> -40
    for _ in range(5):
        assert a2.admit(req("t"), 0.0, cluster(0)) == (False, "rate_limited:t")
    assert a2._tenants["t"].requests.level == pytest.approx(59)  # only the admitted one was charged
    assert a2.rejections == {"rate_limited:t": 5}


@pytest.mark.parametrize(
    "params,fragment",
    [
        ({"max_queue_depth": -1}, "max_queue_depth"),
        ({"tenants": {"a": {}}}, "requests_per_min and/or tokens_per_min"),
        ({"tenants": {"a": {"requests_per_min": 0}}}, "tenants.a.requests_per_min"),
        ({"tenants": {"a": {"rpm": 5}}}, "tenants.a.rpm: unknown parameter"),
        ({"priority_queue_depth": {"high": 3}}, "priority_queue_depth"),
        ({"priority_queue_depth": {1: -3}}, "priority_queue_depth"),
        ({"max_depth": 3}, "max_depth: unknown parameter"),
    ],
)
def test_bad_parameters(params, fragment):
    with pytest.raises(ConfigError) as e:
        AdmissionController(**params)
    assert fragment in str(e.value) and "\n" not in str(e.value)
