"""Load-oblivious and simple load-aware routers."""

from __future__ import annotations

from typing import Sequence

from policies.base import ReplicaView, Router, RoutingRequest
from policies.registry import register_router


@register_router("round-robin")
class RoundRobin(Router):
    """Cycles through replicas in id order (like vLLM production-stack's RoundRobinRouter)."""

    def __init__(self, rng=None, **params):
        super().__init__(rng, **params)
        self._last = -1

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        ids = sorted(v.replica_id for v in views)
        # Next id after the last one used; robust to replicas appearing and disappearing.
        for rid in ids:
            if rid > self._last:
                self._last = rid
                return rid
        self._last = ids[0]
        return ids[0]


@register_router("random")
class RandomRouter(Router):
    """Uniform random choice (seeded)."""

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        return views[int(self.rng.integers(len(views)))].replica_id


@register_router("least-requests")
class LeastRequests(Router):
    """Fewest router-tracked in-flight requests; ties to the lowest id (AIBrix least-request)."""

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        return min(views, key=lambda v: (v.inflight_requests, v.replica_id)).replica_id


# The core issue's name for the same rule.
register_router("least-loaded")(type("LeastLoaded", (LeastRequests,), {"__doc__": LeastRequests.__doc__}))
