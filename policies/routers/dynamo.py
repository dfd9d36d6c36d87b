"""NVIDIA Dynamo's KV router cost (``DefaultWorkerSelector``; "matching the Python ``_cost_function``").

Per replica ``r``, with ``bs`` its block size and ``isl`` the prompt length:

    overlap(r)        = leading prompt blocks cached on r (precise by default, from KV events)
    prefill_blocks(r) = (isl - overlap(r) * bs) / bs
    decode_blocks(r)  = KV blocks r would hold for its active requests once this one is added
    logit(r)          = overlap_score_weight * prefill_blocks(r) + decode_blocks(r)     (lower is better)

``temperature == 0`` (default): argmin; ties go to the replica with the smallest cache index
(router LRU size in approximate mode, the view's optional ``cached_block_count`` in precise mode),
then uniformly at random. ``temperature > 0``: sample with
``p(r) ∝ exp(-(logit(r) - min) / ((max - min) * temperature))``, uniform if all logits are equal.

``decode_blocks`` is tracked by the router, as Dynamo's ``ActiveSequences`` does: the *unique* prompt
blocks of the requests it routed to ``r`` and that have not finished (requests sharing a prefix share
its blocks), plus one block per active request with a partial trailing block, plus this request's
blocks not already active there. Dynamo also grows the count as tokens are generated; the router here
is not told about generated tokens, so the decode term counts prompt blocks only (documented gap).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from policies.base import ReplicaView, Router, RoutingRequest
from policies.registry import parse_params
from policies.routers.prefix_index import PrefixMatcher


class DynamoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", defer_build=True)
    overlap_score_weight: float = Field(1.0, ge=0.0)
    temperature: float = Field(0.0, ge=0.0)
    prefix_mode: Literal["approximate", "precise"] = "precise"
    cache_blocks: int | None = Field(None, ge=1)


class _ActiveBlocks:
    """Unique active prompt blocks of one replica (refcounted hashes + partial-block count)."""

    __slots__ = ("refs", "partial")

    def __init__(self) -> None:
        self.refs: dict[int, int] = {}
        self.partial = 0

    def count(self) -> int:
        return len(self.refs) + self.partial

    def leading_shared(self, block_hashes: Sequence[int]) -> int:
        """Leading blocks of ``block_hashes`` already active. The active set is a union of chains, so
        it holds a leading run of any chain: binary search is exact."""
        lo, hi = 0, len(block_hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if block_hashes[mid - 1] in self.refs:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def add(self, block_hashes: Sequence[int], partial: bool) -> None:
        for h in block_hashes:
            self.refs[h] = self.refs.get(h, 0) + 1
        self.partial += int(partial)

    def remove(self, block_hashes: Sequence[int], partial: bool) -> None:
        for h in block_hashes:
            c = self.refs.get(h, 0) - 1
            if c > 0:
                self.refs[h] = c
            else:
                self.refs.pop(h, None)
        self.partial -= int(partial)


def softmax_sample(logits: Sequence[float], temperature: float, rng: np.random.Generator) -> int:
    """Index sampled with ``p_i ∝ exp(-(l_i - l_min)/((l_max - l_min) T))``; uniform if all equal."""
    lo, hi = min(logits), max(logits)
    if hi == lo:
        return int(rng.integers(len(logits)))
    z = np.exp(-(np.asarray(logits, dtype=float) - lo) / ((hi - lo) * temperature))
    return int(rng.choice(len(logits), p=z / z.sum()))


class DynamoRouter(Router):
    """``hybrid`` with ``style: dynamo`` (see module docstring)."""

    name = "hybrid"

    def __init__(self, rng=None, **params):
        cfg = parse_params("router", "hybrid(style=dynamo)", DynamoParams, params)
        super().__init__(rng)
        self.cfg = cfg
        self.matcher = PrefixMatcher(cfg.prefix_mode, cfg.cache_blocks)
        self._active: dict[int, _ActiveBlocks] = {}
        self._block_size: dict[int, int] = {}
        self._routed: dict[int, tuple[int, bool]] = {}  # request_id -> (replica_id, has partial block)
        self.last_logits: dict[int, float] = {}

    def logits(self, request: RoutingRequest, views: Sequence[ReplicaView]) -> list[float]:
        hashes = request.block_hashes
        overlaps = self.matcher.matches(hashes, views)
        out = []
        for v, ov in zip(views, overlaps):
            bs = v.block_size
            self._block_size[v.replica_id] = bs
            prefill_blocks = max(0, request.prompt_tokens - ov * bs) / bs
            act = self._active.get(v.replica_id)
            new_full = len(hashes) - (act.leading_shared(hashes) if act else 0)
            partial = 1 if request.prompt_tokens % bs else 0
            decode_blocks = (act.count() if act else 0) + new_full + partial
            out.append(self.cfg.overlap_score_weight * prefill_blocks + decode_blocks)
        return out

    def route(self, request: RoutingRequest, views: Sequence[ReplicaView], now: float) -> int:
        lg = self.logits(request, views)
        self.last_logits = {v.replica_id: x for v, x in zip(views, lg)}
        if self.cfg.temperature > 0:
            return views[softmax_sample(lg, self.cfg.temperature, self.rng)].replica_id
        best = min(lg)
        tied = [v for v, x in zip(views, lg) if x == best]
        if len(tied) > 1:
            smallest = min(self.matcher.size(v) for v in tied)
            tied = [v for v in tied if self.matcher.size(v) == smallest]
        return tied[0 if len(tied) == 1 else int(self.rng.integers(len(tied)))].replica_id

    def on_routed(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        self.matcher.on_routed(request.block_hashes, replica_id)
        bs = self._block_size.get(replica_id)
        partial = bool(bs and request.prompt_tokens % bs)
        self._active.setdefault(replica_id, _ActiveBlocks()).add(request.block_hashes, partial)
        self._routed[request.request_id] = (replica_id, partial)

    def on_finished(self, request: RoutingRequest, replica_id: int, now: float) -> None:
        entry = self._routed.pop(request.request_id, None)
        if entry is None:
            return
        rid, partial = entry
        act = self._active.get(rid)
        if act is not None:
            act.remove(request.block_hashes, partial)

    def on_replica_removed(self, replica_id: int) -> None:
        self.matcher.on_replica_removed(replica_id)
        self._active.pop(replica_id, None)
        self._block_size.pop(replica_id, None)
        self._routed = {k: e for k, e in self._routed.items() if e[0] != replica_id}
