"""llm-d inference scheduler (GIE endpoint picker) default profile: weighted scorers + max-score picker.

``total(r) = sum_i w_i * clamp01(s_i(r))`` over the configured scorers, then the max-score picker
(shuffle, take the top-1: a uniformly random tie-break). Default weights are llm-d's default profile
(``pkg/epp/config/loader/defaults.go``): ``queue: 2, kv: 2, prefix: 3``. Scorers (same formulas as
``pkg/epp/framework/plugins/scheduling/scorer``):

- ``queue``: ``(maxQ - q)/(maxQ - minQ)`` over candidates with ``q = num_waiting``; 1.0 if all equal.
- ``kv``: ``1 - kv_usage``.
- ``prefix``: ``matched_blocks / total_blocks`` (approximate LRU by default, ``prefix_mode``).
- ``running``: min-max normalisation like ``queue`` on ``num_running``.
- ``load-aware``: ``0.5`` if ``q == 0`` else ``0.5 * (1 - min(q, 128)/128)``.
- ``token-load``: ``1 - min(1, inflight_tokens / 4_194_304)``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from policies.base import ReplicaView, Router, RoutingRequest
from policies.registry import parse_params
from policies.routers.prefix_index import PrefixMatcher
from policies.routers.selection import argmax_random_float

Scorer = Literal["queue", "kv", "prefix", "running", "load-aware", "token-load"]

LOAD_AWARE_QUEUE_THRESHOLD = 128
TOKEN_LOAD_CAPACITY = 4_194_304


class LlmdParams(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    weights: dict[Scorer, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: {"queue": 2.0, "kv": 2.0, "prefix": 3.0}
    )
    prefix_mode: Literal["approximate", "precise"] = "approximate"
    cache_blocks: int | None = Field(None, ge=1)


def _clamp01(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


def minmax_scores(values: Sequence[float]) -> list[float]:
    """``(max - x)/(max - min)``; 1.0 for everyone when all values are equal (llm-d queue scorer)."""
    hi, lo = max(values), min(values)
    if hi == lo:
        return [1.0] * len(values)
    return [(hi - x) / (hi - lo) for x in values]


class LlmdRouter(Router):
    """``hybrid`` with ``style: llm-d`` (see module docstring)."""

    name = "hybrid"

    def __init__(self, rng=None, **params):
        cfg = parse_params("router", "hybrid(style=llm-d)", LlmdParams, params)
        super().__init__(rng)
        self.weights = {k: float(w) for k, w in cfg.weights.items() if w > 0}
        self.matcher = PrefixMatcher(cfg.prefix_mode, cfg.cache_blocks)
        self.last_scores: dict[int, float] = {}

    def scores(self, request: RoutingRequest, views: Sequence[ReplicaView]) -> list[float]:
        n = len(views)
        total = [0.0] * n
        for scorer, w in self.weights.items():
            if scorer == "queue":
                s = minmax_scores([v.num_waiting for v in views])
            elif scorer == "running":
                s = minmax_scores([v.num_running for v in views])
            elif scorer == "kv":
                s = [1.0 - v.kv_usage for v in views]
            elif scorer == "prefix":
                nb = len(request.block_hashes)
                s = [m / nb for m in self.matcher.matches(request.block_hashes, views)] if nb else [0.0] * n
            elif scorer == "load-aware":
                t = LOAD_AWARE_QUEUE_THRESHOLD
                s = [0.5 if v.num_waiting == 0 else 0.5 * (1 - min(v.num_waiting, t) / t) for v in views]
            else:  # token-load
                s = [1.0 - min(1.0, v.inflight_tokens / TOKEN_LOAD_CAPACITY) for v in views]
            for i in range(n):
                total[i] += w * _clamp01(s[i])
        return total

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        sc = self.scores(request, views)
        self.last_scores = {v.replica_id: s for v, s in zip(views, sc)}
        return argmax_random_float(views, sc, self.rng).replica_id

    def on_routed(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        self.matcher.on_routed(request.block_hashes, replica_id)

    def on_replica_removed(self, replica_id: int) -> None:
        self.matcher.on_replica_removed(replica_id)
