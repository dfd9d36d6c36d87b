"""SGLang router's cache-aware policy (``sgl-router/src/policies/cache_aware.rs``), at block level.

With ``load(r)`` = router-tracked in-flight requests:

1. ``imbalanced = (max - min) > balance_abs_threshold and max > min * balance_rel_threshold``
   (defaults 64 and 1.5). If imbalanced: the least-loaded replica (random tie-break); the prompt is
   still recorded in that replica's tree.
2. Otherwise find the replica with the longest cached prefix; ``match_rate = matched / total``.
   If ``match_rate > cache_threshold`` (0.3) route there (ties: fewer in-flight, then random);
   else route to the "smallest tenant", the replica with the fewest blocks in the router's tree
   (ties: fewer in-flight, then random).
3. ``on_routed`` inserts the prompt into the chosen replica's tree.

Differences from SGLang, on purpose: SGLang's approximate radix tree matches raw *characters*; here it
is the engine's block hashes (``RoutingRequest.block_hashes``), the prefix identity the simulator has.
SGLang evicts LRU leaves down to ``max_tree_size`` (67 108 864 chars) every 120 s; here each
replica's tree is an LRU capped at ``max_tree_tokens`` (16 777 216 = 67 108 864 chars at 4 chars per
token) converted to blocks, evicted on insert.
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from policies.base import ReplicaView, Router, RoutingRequest
from policies.registry import parse_params
from policies.routers.prefix_index import PrefixMatcher
from policies.routers.selection import argmin_random


class SglangParams(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    balance_abs_threshold: int = Field(64, ge=0)
    balance_rel_threshold: float = Field(1.5, ge=1.0)
    cache_threshold: float = Field(0.3, ge=0.0, le=1.0)
    max_tree_tokens: int = Field(16_777_216, ge=1)
    prefix_mode: Literal["approximate", "precise"] = "approximate"


class SglangRouter(Router):
    """``hybrid`` with ``style: sglang`` (see module docstring)."""

    name = "hybrid"

    def __init__(self, rng=None, **params):
        cfg = parse_params("router", "hybrid(style=sglang)", SglangParams, params)
        super().__init__(rng)
        self.cfg = cfg
        # The tree is the router's own record even in precise mode (it decides the smallest tenant).
        self.matcher = PrefixMatcher(cfg.prefix_mode, None)
        self.tree = PrefixMatcher("approximate", None) if cfg.prefix_mode == "precise" else self.matcher
        self.last_decision = ""  # "imbalanced" | "cache" | "smallest-tenant"

    def is_imbalanced(self, views: Sequence[ReplicaView]) -> bool:
        loads = [v.inflight_requests for v in views]
        hi, lo = max(loads), min(loads)
        return (hi - lo) > self.cfg.balance_abs_threshold and hi > lo * self.cfg.balance_rel_threshold

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        if self.tree.index is not None and self.tree.index.capacity_blocks is None:
            self.tree.index.capacity_blocks = max(1, self.cfg.max_tree_tokens // max(1, views[0].block_size))
        by_load = lambda v: v.inflight_requests  # noqa: E731
        if self.is_imbalanced(views):
            self.last_decision = "imbalanced"
            return argmin_random(views, by_load, self.rng).replica_id
        total = len(request.block_hashes)
        if total:
            matched = self.matcher.matches(request.block_hashes, views)
            best = max(matched)
            if best / total > self.cfg.cache_threshold:
                self.last_decision = "cache"
                top = [v for v, m in zip(views, matched) if m == best]
                return argmin_random(top, by_load, self.rng).replica_id
        self.last_decision = "smallest-tenant"
        return argmin_random(views, lambda v: (self.tree.size(v), v.inflight_requests), self.rng).replica_id

    def on_routed(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        self.tree.on_routed(request.block_hashes, replica_id)

    def on_replica_removed(self, replica_id: int) -> None:
        self.tree.on_replica_removed(replica_id)
        self.matcher.on_replica_removed(replica_id)
