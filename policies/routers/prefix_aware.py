"""Prefix-cache-aware routing: send a request where its prompt's leading blocks are already cached.

Rule (``route``), with ``matched(r)`` = leading blocks of ``request.block_hashes`` cached on replica
``r`` and ``total`` = number of full blocks of the prompt:

1. **Load guard.** Candidates are the replicas with ``inflight(r) <= min_inflight + max_imbalance``
   (default 8, AIBrix's ``POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT``): a replica that is already far
   busier than the least busy one is not chosen for its cache (recomputing a prefix is cheaper than
   queueing behind a long batch). ``max_imbalance: null`` disables the guard.
2. **Score** ``matched(r) / total`` (llm-d ``prefix-cache-scorer``). If the best candidate score is
   0, or below ``min_match_ratio``, the cache does not help: **fall back** to the candidate with the
   fewest in-flight requests (random tie-break).
3. Otherwise pick the best-scoring candidate; **ties** go to fewer in-flight requests, then random.

``mode: approximate`` reads a router-side per-replica LRU of block hashes (llm-d's approximate
scorer, see :mod:`policies.routers.prefix_index`), updated in ``on_routed``; ``mode: precise`` reads
the replica's true cache (``ReplicaView.cached_prefix_blocks``), like KV-event-fed routers.
"""

from __future__ import annotations

from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from policies.base import ReplicaView, Router, RoutingRequest
from policies.registry import parse_params, register_router
from policies.routers.prefix_index import PrefixMatcher
from policies.routers.selection import drawer


class PrefixParams(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    mode: Literal["approximate", "precise"] = "approximate"
    cache_blocks: int | None = Field(None, ge=1, description="approximate LRU size; default: replica cache size")
    max_imbalance: int | None = Field(8, ge=0, description="load guard on in-flight requests; null = off")
    # Ray Serve's PrefixCacheAffinityRouter uses match_rate_threshold=0.1: below it a match is too
    # short to be worth herding onto (a shared 512-token system prompt would otherwise pin every
    # request to the first replicas that saw it; see docs/policy-study.md).
    min_match_ratio: float = Field(0.1, ge=0.0, le=1.0)


def load_guard(views: Sequence[ReplicaView], max_imbalance: int | None) -> list[ReplicaView]:
    """Replicas within ``max_imbalance`` in-flight requests of the least-loaded one."""
    if max_imbalance is None:
        return list(views)
    return list(_guard(views, max_imbalance)[0])


def _guard(views: Sequence[ReplicaView], max_imbalance: int | None) -> tuple[Sequence[ReplicaView], list[int], int]:
    """:func:`load_guard`'s candidates (``views`` itself when every one passes), their in-flight
    counts, and the least of them: one read of each view's load."""
    inflight = [v.inflight_requests for v in views]
    lo = min(inflight)
    if max_imbalance is not None and max(inflight) > lo + max_imbalance:
        hi = lo + max_imbalance
        keep = [i for i, x in enumerate(inflight) if x <= hi]
        return [views[i] for i in keep], [inflight[i] for i in keep], lo
    return views, inflight, lo


class PrefixRule:
    """The prefix-aware decision (shared by ``prefix-aware`` and the ``seed`` hybrid)."""

    def __init__(self, cfg: PrefixParams, rng):
        self.cfg = cfg
        self.rng = rng
        self.matcher = PrefixMatcher(cfg.mode, cfg.cache_blocks)
        self.last_decision = ""  # "prefix" or "fallback" (for tests and traces)
        self._draw_rng = None  # the rng that _draw draws from (see _pick)
        self._draw = None

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView]) -> int:
        # On the path of every request, so: one read of each view's load, candidates as positions,
        # and no match list at all when no replica holds the prompt's first block. The choices and
        # the rng draws are exactly those of ``load_guard`` followed by ``argmin_random``.
        cfg = self.cfg
        cands, inflight, lo = _guard(views, cfg.max_imbalance)
        hashes = request.block_hashes
        total = len(hashes)
        if total:
            matched = self.matcher.held_matches(hashes, cands)
            if matched is not None:
                best = max(matched)
                if best > 0 and best / total >= cfg.min_match_ratio:
                    self.last_decision = "prefix"
                    top = [i for i, m in enumerate(matched) if m == best]
                    if len(top) > 1:
                        least = min(inflight[i] for i in top)
                        top = [i for i in top if inflight[i] == least]
                    return cands[self._pick(top)].replica_id
        self.last_decision = "fallback"  # the least loaded candidate (the guard keeps every one at lo)
        # _pick([i for i, x in enumerate(inflight) if x == lo]) without the list: the k-th
        # position holding lo, k drawn below the number of them (no draw when there is one).
        n = inflight.count(lo)
        pos = inflight.index(lo)
        if n > 1:
            for _ in range(self._draw_below(n)):
                pos = inflight.index(lo, pos + 1)
        return cands[pos].replica_id

    def _pick(self, positions: list[int]) -> int:
        """One of ``positions``, uniformly at random if several (as :func:`argmin_random`)."""
        return positions[0] if len(positions) == 1 else positions[self._draw_below(len(positions))]

    def _draw_below(self, n: int) -> int:
        """``randbelow(self.rng, n)``, through :func:`drawer` (looked up once per rng)."""
        rng = self.rng
        if rng is not self._draw_rng:
            self._draw = drawer(rng)
            self._draw_rng = rng
        return self._draw(n)


@register_router("prefix-aware")
class PrefixAware(Router):
    """Longest cached prefix wins, behind a load guard (see module docstring).

    Parameters: ``mode`` (approximate|precise), ``cache_blocks`` (approximate LRU size per replica;
    default the replica's ``num_total_blocks``), ``max_imbalance`` (8), ``min_match_ratio`` (0.1, as Ray Serve's match_rate_threshold).
    """

    def __init__(self, rng=None, **params):
        cfg = parse_params("router", "prefix-aware", PrefixParams, params)
        super().__init__(rng)
        self.mode = cfg.mode
        self._rule = PrefixRule(cfg, None)

    @property
    def last_decision(self) -> str:
        return self._rule.last_decision

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        self._rule.rng = self.rng  # the cluster may replace self.rng after construction
        return self._rule.route(request, views)

    def on_routed(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        index = self._rule.matcher.index  # approximate mode: remember what was sent where
        if index is not None:
            index.insert(replica_id, request.block_hashes)

    def on_replica_removed(self, replica_id: int) -> None:
        self._rule.matcher.on_replica_removed(replica_id)
