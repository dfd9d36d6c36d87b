"""``hybrid``: session affinity and prefix matching combined; ``style`` picks the design.

- ``seed`` (:class:`SeedHybrid`, fleetsim's own design): a **sticky fast path** while it is worth it,
  prefix matching otherwise.
- ``llm-d`` (:class:`policies.routers.llmd.LlmdRouter`): weighted scorers queue 2 / kv 2 / prefix 3.
- ``sglang`` (:class:`policies.routers.sglang.SglangRouter`): cache-aware with balance thresholds.
- ``dynamo`` (:class:`policies.routers.dynamo.DynamoRouter`): overlap-weighted prefill + decode cost.

All parameters other than ``style`` go to the chosen style (each validates its own).
"""

from __future__ import annotations

from typing import Sequence

from pydantic import Field

from policies.base import ReplicaView, Router, RoutingRequest
from policies.registry import parse_params, register_router
from policies.routers.dynamo import DynamoRouter
from policies.routers.llmd import LlmdRouter
from policies.routers.prefix_aware import PrefixParams, PrefixRule, load_guard
from policies.routers.sglang import SglangRouter
from sim.errors import ConfigError


class SeedParams(PrefixParams):
    hit_threshold: float = Field(0.5, ge=0.0, le=1.0)


class SeedHybrid(Router):
    """Sticky fast path + prefix match (``style: seed``).

    A session's *sticky replica* is the replica its previous request went to. A request of a known
    session goes straight there when all of these hold:

    - the sticky replica is serving (it is among the views),
    - it passes the prefix rule's load guard (``inflight <= min_inflight + max_imbalance``), and
    - its hit ratio for this prompt, ``cached leading blocks / prompt blocks``, is ``>= hit_threshold``
      (0.5; from the router's LRU in ``mode: approximate``, the replica's cache in ``mode: precise``).

    Otherwise (first turn, no session, sticky replica gone, overloaded or cold for this prompt) the
    request takes the ``prefix-aware`` rule (:class:`policies.routers.prefix_aware.PrefixRule`), which
    may well pick the same replica. Prompts shorter than one block have no hit ratio and take the
    prefix rule (which falls back to least-loaded).
    """

    name = "hybrid"

    def __init__(self, rng=None, **params):
        cfg = parse_params("router", "hybrid(style=seed)", SeedParams, params)
        super().__init__(rng)
        self.hit_threshold = cfg.hit_threshold
        self._rule = PrefixRule(PrefixParams(**cfg.model_dump(exclude={"hit_threshold"})), None)
        self._session_replica: dict[str, int] = {}
        self.last_decision = ""  # "sticky" | "prefix" | "fallback"

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        self._rule.rng = self.rng
        sid = request.session_id
        rid = self._session_replica.get(sid) if sid else None
        if rid is not None and request.block_hashes:
            healthy = load_guard(views, self._rule.cfg.max_imbalance)
            sticky = next((v for v in healthy if v.replica_id == rid), None)
            if sticky is not None:
                hit = self._rule.matcher.match_one(request.block_hashes, sticky) / len(request.block_hashes)
                if hit >= self.hit_threshold:
                    self.last_decision = "sticky"
                    return rid
        out = self._rule.route(request, views)
        self.last_decision = self._rule.last_decision
        return out

    def on_routed(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        if request.session_id:
            self._session_replica[request.session_id] = replica_id
        self._rule.matcher.on_routed(request.block_hashes, replica_id)

    def on_replica_removed(self, replica_id: int) -> None:
        self._rule.matcher.on_replica_removed(replica_id)
        self._session_replica = {s: r for s, r in self._session_replica.items() if r != replica_id}


STYLES: dict[str, type[Router]] = {
    "seed": SeedHybrid,
    "llm-d": LlmdRouter,
    "sglang": SglangRouter,
    "dynamo": DynamoRouter,
}


@register_router("hybrid")
class Hybrid(Router):
    """Dispatches to the style's router; the same object then handles every hook."""

    def __init__(self, rng=None, style: str = "seed", **params):
        if style not in STYLES:
            raise ConfigError(f"router 'hybrid': style: unknown style {style!r}; known: {sorted(STYLES)}")
        self.style = style
        self.impl = STYLES[style](rng=rng, **params)
        super().__init__(self.impl.rng)

    def __getattr__(self, item):  # last_decision, last_scores, ... of the style, for traces and tests
        if item == "impl":
            raise AttributeError(item)
        return getattr(self.impl, item)

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        self.impl.rng = self.rng  # the cluster may replace self.rng after construction
        return self.impl.route(request, views, now)

    def on_routed(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        self.impl.on_routed(request, replica_id, now)

    def on_finished(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        self.impl.on_finished(request, replica_id, now)

    def on_replica_removed(self, replica_id: int) -> None:
        self.impl.on_replica_removed(replica_id)
