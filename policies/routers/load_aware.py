"""Load-aware routers that look at one replica gauge: least KV usage, power-of-two choices."""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict

from policies.base import ReplicaView, Router, RoutingRequest
from policies.registry import parse_params, register_router
from policies.routers.selection import argmin_random

LoadMetric = Literal["inflight", "waiting", "running", "kv"]


def load_of(v: ReplicaView, metric: LoadMetric) -> float:
    """One replica's load by the named metric.

    ``inflight`` is router-tracked (exact even when gauges are stale); the others are scraped gauges
    (``vllm:num_requests_waiting`` / ``_running`` / ``vllm:kv_cache_usage_perc``).
    """
    if metric == "inflight":
        return v.inflight_requests
    if metric == "waiting":
        return v.num_waiting
    if metric == "running":
        return v.num_running
    return v.kv_usage


@register_router("least-kv")
class LeastKV(Router):
    """Lowest ``kv_usage`` (AIBrix ``least-kv-cache``); ties to fewer in-flight requests, then random.

    KV usage is a scraped gauge, so under ``router.staleness_s > 0`` every request between two scrapes
    sees the same numbers and piles onto the same replica; that herd effect is real and worth measuring.
    """

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        return argmin_random(views, lambda v: (v.kv_usage, v.inflight_requests), self.rng).replica_id


class _P2CParams(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    load: LoadMetric = "inflight"


@register_router("power-of-two")
class PowerOfTwo(Router):
    """Power of two choices: sample two distinct replicas uniformly, send to the less loaded one.

    As Ray Serve's ``PowerOfTwoChoicesRequestRouter`` (probes queue length = ongoing requests) and
    SGLang's ``power_of_two``. Load is router-tracked in-flight requests by default
    (``load: inflight|waiting|running|kv``). Ties go to the first sampled replica, itself random.
    """

    def __init__(self, rng=None, **params):
        cfg = parse_params("router", "power-of-two", _P2CParams, params)
        super().__init__(rng)
        self.load = cfg.load

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        if len(views) == 1:
            return views[0].replica_id
        i, j = self.rng.choice(len(views), size=2, replace=False)
        a, b = views[int(i)], views[int(j)]
        return (b if load_of(b, self.load) < load_of(a, self.load) else a).replica_id
