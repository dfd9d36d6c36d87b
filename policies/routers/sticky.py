"""Session affinity by consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018).

Each serving replica owns ``vnodes`` points on a 64-bit hash ring (160, as SGLang's
``consistent_hash``). A request's key (its session id) hashes onto the ring and walks clockwise to
the first replica whose load is below the capacity

    C = ceil((1 + eps) * m / n),   m = in-flight requests including this one, n = serving replicas,

so a session keeps its replica (and that replica's prefix cache) while the replica is not overloaded,
and no replica ever takes a request that would lift it above ``C`` (the sum of loads is ``m - 1 < n*C``,
so some replica is always below ``C``). ``eps = 0.25`` is the usual choice (HAProxy
``hash-balance-factor 125``, SGLang ``prefix_hash_load_factor 1.25``). Load is router-tracked
in-flight requests, which are exact even when scraped gauges are stale.

Requests without a key go to the least-loaded replica (fewest in-flight, random tie-break), as
production-stack's ``SessionRouter`` falls back to QPS routing.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field

from policies.base import ReplicaView, Router, RoutingRequest
from policies.registry import parse_params, register_router
from policies.routers.selection import argmin_random


def stable_hash64(data: str) -> int:
    """Process-independent 64-bit hash (Python's ``hash(str)`` is salted per process)."""
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "big")


class _StickyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    eps: float = Field(0.25, gt=0, description="capacity slack: C = ceil((1+eps) m / n)")
    vnodes: int = Field(160, ge=1, le=10_000)
    key: Literal["session", "prefix"] = "session"
    prefix_blocks: int = Field(16, ge=1, description="key=prefix: hash of the first this-many blocks")


class HashRing:
    """A consistent-hash ring of replica ids with ``vnodes`` points each; rebuilt when ids change."""

    def __init__(self, vnodes: int):
        self.vnodes = vnodes
        self.ids: tuple[int, ...] = ()
        self._points: list[int] = []
        self._owners: list[int] = []

    def update(self, ids: Sequence[int]) -> None:
        key = tuple(sorted(ids))
        if key == self.ids:
            return
        pts = sorted((stable_hash64(f"replica-{rid}#{k}"), rid) for rid in key for k in range(self.vnodes))
        self.ids = key
        self._points = [p for p, _ in pts]
        self._owners = [r for _, r in pts]

    def walk(self, h: int):
        """Distinct replica ids in clockwise order from hash ``h``."""
        n = len(self._points)
        start = bisect.bisect_left(self._points, h)
        seen: set[int] = set()
        for k in range(n):
            rid = self._owners[(start + k) % n]
            if rid not in seen:
                seen.add(rid)
                yield rid
                if len(seen) == len(self.ids):
                    return


@register_router("sticky")
class Sticky(Router):
    """Consistent hashing with bounded loads on the session id (see module docstring).

    Parameters: ``eps`` (0.25), ``vnodes`` (160), ``key`` (``session``; ``prefix`` keys on the hash of
    the first ``prefix_blocks`` engine blocks, like SGLang's ``prefix_hash`` policy).
    """

    def __init__(self, rng=None, **params):
        cfg = parse_params("router", "sticky", _StickyParams, params)
        super().__init__(rng)
        self.eps = cfg.eps
        self.key = cfg.key
        self.prefix_blocks = cfg.prefix_blocks
        self.ring = HashRing(cfg.vnodes)
        self.last_capacity = 0  # capacity C used by the last keyed decision (for tests and traces)

    def capacity(self, views: Sequence[ReplicaView]) -> int:
        m = sum(v.inflight_requests for v in views) + 1
        # The tiny slack keeps float noise (1.25*4/5 = 1.0000000000000002) from adding a slot.
        return max(1, math.ceil((1.0 + self.eps) * m / len(views) - 1e-9))

    def _key(self, request: RoutingRequest) -> str | None:
        if self.key == "session":
            return request.session_id if request.session_id not in (None, "") else None
        if not request.block_hashes:
            return None
        return f"prefix:{request.block_hashes[min(self.prefix_blocks, len(request.block_hashes)) - 1]}"

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        key = self._key(request)
        if key is None:
            return argmin_random(views, lambda v: v.inflight_requests, self.rng).replica_id
        self.ring.update([v.replica_id for v in views])
        loads = {v.replica_id: v.inflight_requests for v in views}
        cap = self.capacity(views)
        self.last_capacity = cap
        for rid in self.ring.walk(stable_hash64(key)):
            if loads[rid] < cap:
                return rid
        raise AssertionError("bounded-load invariant broken: every replica at capacity")  # unreachable
