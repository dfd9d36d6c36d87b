"""The seams between policies and the things they steer.

A policy sees replicas only through :class:`ReplicaView` and requests only through
:class:`RoutingRequest`, so the *same* router / autoscaler object drives simulated replicas
(:mod:`sim.replica`) and real vLLM servers (:mod:`validation`).

- :class:`Router`: ``route(request, views, now) -> replica_id`` plus ``on_routed`` /
  ``on_finished`` hooks for routers that keep state (LRU of hashes, session table, in-flight counts).
- :class:`Autoscaler`: ``desired(now, cluster) -> int`` called every ``sync_period_s``; the cluster
  owns the mechanics (cold start, draining, cost).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Protocol, Sequence, runtime_checkable


class ReplicaState(str, Enum):
    STARTING = "starting"  # cold start: provisioning, weight load, compile/graph capture
    SERVING = "serving"
    DRAINING = "draining"  # takes no new requests, finishes in-flight ones, then stops
    STOPPED = "stopped"
    FAILED = "failed"


@runtime_checkable
class ReplicaView(Protocol):
    """What a policy may know about one replica (possibly stale, see ``router.staleness_s``)."""

    replica_id: int
    state: ReplicaState
    num_running: int  # vllm:num_requests_running
    num_waiting: int  # vllm:num_requests_waiting
    kv_usage: float  # vllm:kv_cache_usage_perc, in [0, 1]
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    inflight_requests: int  # router-tracked: routed and not yet finished (always exact)
    inflight_tokens: int  # router-tracked: prompt + output tokens of in-flight requests

    def cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        """True number of leading ``block_hashes`` in the replica's prefix cache ("precise" routing)."""
        ...


@dataclass(slots=True)
class RoutingRequest:
    """What a router may know about a request at routing time."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # known to the simulator; real routers should not use it (see docs)
    block_hashes: Sequence[int] = ()  # engine block hashes (full blocks) of the prompt
    session_id: str | None = None
    tenant: str | None = None
    priority: int = 0


class Router:
    """Base class for routers. Subclasses set ``name`` and implement :meth:`route`.

    Routers receive only replicas that accept new work (state SERVING) and must return the
    ``replica_id`` of one of them. Randomness must come from ``self.rng`` (seeded by the cluster).
    """

    name: ClassVar[str] = "base"

    def __init__(self, rng=None, **params):
        import numpy as np

        if params:
            from sim.errors import ConfigError

            raise ConfigError(f"router {self.name!r}: unknown parameter(s) {sorted(params)}")
        self.rng = rng if rng is not None else np.random.default_rng(0)

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        raise NotImplementedError

    def on_routed(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        """Called after the request was handed to ``replica_id``."""

    def on_finished(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        """Called when the request ends on ``replica_id`` (completed, failed or rejected)."""

    def on_replica_removed(self, replica_id: int) -> None:
        """Called when a replica stops or fails (drop any state kept for it)."""


@dataclass
class ClusterView:
    """What an autoscaler may know about the cluster at a sync tick."""

    now: float
    replicas: Sequence[ReplicaView]  # every replica that is starting, serving or draining
    arrivals_total: int  # cumulative requests that reached the cluster (for rate estimates)
    cluster_waiting: int = 0  # requests queued at the cluster level (admission), if any

    @property
    def ready(self) -> list[ReplicaView]:
        return [v for v in self.replicas if v.state == ReplicaState.SERVING]

    @property
    def starting(self) -> list[ReplicaView]:
        return [v for v in self.replicas if v.state == ReplicaState.STARTING]

    @property
    def current(self) -> int:
        """Replicas that count towards the desired size (serving + starting; not draining)."""
        return sum(1 for v in self.replicas if v.state in (ReplicaState.SERVING, ReplicaState.STARTING))


class Autoscaler:
    """Base class for autoscalers: ``desired(now, cluster) -> int`` every ``sync_period_s``."""

    name: ClassVar[str] = "none"
    sync_period_s: float = 15.0

    def desired(self, now: float, cluster: ClusterView) -> int:
        return cluster.current
