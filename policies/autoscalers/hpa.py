"""Kubernetes Horizontal Pod Autoscaler (``autoscaling/v2``) on a per-replica metric.

Per sync (every ``sync_period_s`` = 15 s), as ``pkg/controller/podautoscaler``:

1. **Replica calculator** (``replica_calculator.go``, ``AverageValue`` target on a pods metric):
   ``ratio = mean(metric over ready replicas) / target``. With no starting replicas: hold the current
   count if ``1 - scale_down_tolerance <= ratio <= 1 + scale_up_tolerance`` (tolerance 0.1), else
   ``ceil(ratio * ready)``. Starting replicas report no metrics yet and are treated conservatively:
   as using the target on a scale-down and 0 on a scale-up; the ratio is recomputed over
   ``ready + starting``, and the count is held if that flips the direction or lands within tolerance.
2. **Stabilization** (``stabilizeRecommendationWithBehaviors``): every raw recommendation is stored;
   a scale-down goes no lower than the **max** recommendation of the last
   ``scale_down.stabilization_window_s`` (300 s), a scale-up no higher than the min of the last
   ``scale_up.stabilization_window_s`` (0 s).
3. **Rate limits** (``convertDesiredReplicasWithBehaviorRate``): the defaults of ``behavior`` —
   scale-up ``max(+4 pods, +100%)`` per 15 s, scale-down ``-100%`` per 15 s — computed from the size at
   the start of each policy's period (current minus the changes this autoscaler made within it).
4. Clamp to ``[min_replicas, max_replicas]``; above ``max`` / below ``min`` the count is first
   brought back within bounds, as the controller does.

``warm_start`` (default true) seeds the stabilization window with the fleet size at the first sync,
as if the HPA had been running before the simulation began; a freshly created Kubernetes HPA has an
empty window and may scale an idle fleet down at its first sync (``warm_start: false``).

Metrics (``metric``): ``running`` (``vllm:num_requests_running``), ``waiting``
(``vllm:num_requests_waiting``), ``kv`` (``vllm:kv_cache_usage_perc``, 0..1), ``concurrency``
(running + waiting), or a custom per-replica function ``view -> float`` (a callable, or a
``"module:function"`` string in scenario files). Defaults: ``kv`` with ``target: 0.7`` — choose your own.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.autoscalers.common import BoundedAutoscaler, BoundsParams
from policies.base import ClusterView, ReplicaView
from policies.registry import register_autoscaler

BUILTIN_METRICS: dict[str, Callable[[ReplicaView], float]] = {
    "running": lambda v: float(v.num_running),
    "waiting": lambda v: float(v.num_waiting),
    "kv": lambda v: float(v.kv_usage),
    "concurrency": lambda v: float(v.num_running + v.num_waiting),
}


class ScalingPolicy(BaseModel):
    """One ``HPAScalingPolicy``: at most ``value`` pods / percent of change per ``period_s``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["pods", "percent"]
    value: int = Field(gt=0)
    period_s: float = Field(gt=0, le=1800)


class ScalingRules(BaseModel):
    """``HPAScalingRules`` for one direction."""

    model_config = ConfigDict(extra="forbid")
    stabilization_window_s: float = Field(ge=0, le=3600)
    select_policy: Literal["max", "min", "disabled"] = "max"
    policies: list[ScalingPolicy]


def _default_up() -> ScalingRules:
    return ScalingRules(
        stabilization_window_s=0,
        policies=[ScalingPolicy(type="pods", value=4, period_s=15), ScalingPolicy(type="percent", value=100, period_s=15)],
    )


def _default_down() -> ScalingRules:
    return ScalingRules(stabilization_window_s=300, policies=[ScalingPolicy(type="percent", value=100, period_s=15)])


class HPAParams(BoundsParams):
    metric: Any = "kv"
    target: float = Field(0.7, gt=0, description="target per-replica average of the metric")
    tolerance: float = Field(0.1, ge=0, lt=1)
    scale_up_tolerance: float | None = Field(None, ge=0)
    scale_down_tolerance: float | None = Field(None, ge=0, lt=1)
    scale_up: ScalingRules = Field(default_factory=_default_up)
    scale_down: ScalingRules = Field(default_factory=_default_down)
    warm_start: bool = True

    @field_validator("metric")
    @classmethod
    def _metric(cls, m):
        if callable(m):
            return m
        if isinstance(m, str) and m in BUILTIN_METRICS:
            return m
        if isinstance(m, str) and ":" in m:
            mod, _, attr = m.partition(":")
            try:
                fn = getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"cannot import custom metric {m!r} ({e})") from None
            if not callable(fn):
                raise ValueError(f"custom metric {m!r} is not callable")
            return fn
        raise ValueError(f"must be one of {sorted(BUILTIN_METRICS)}, a callable or 'module:function' (got {m!r})")


@dataclass(slots=True)
class _Event:
    t: float
    value: int


def _sum_since(events: list[_Event], cutoff: float) -> int:
    return sum(e.value for e in events if e.t > cutoff)


@register_autoscaler("hpa")
class HPA(BoundedAutoscaler):
    """Kubernetes HPA (see module docstring)."""

    Params = HPAParams
    default_sync_period_s = 15.0

    def __init__(self, rng=None, **params):
        super().__init__(rng, **params)
        c: HPAParams = self.cfg  # type: ignore[assignment]
        self.metric_fn: Callable[[ReplicaView], float] = (
            BUILTIN_METRICS[c.metric] if isinstance(c.metric, str) else c.metric
        )
        self.target = c.target
        self.up_tol = c.tolerance if c.scale_up_tolerance is None else c.scale_up_tolerance
        self.down_tol = c.tolerance if c.scale_down_tolerance is None else c.scale_down_tolerance
        self.up_rules = c.scale_up
        self.down_rules = c.scale_down
        self._recommendations: list[_Event] = []  # (time, raw recommendation)
        self._up_events: list[_Event] = []  # (time, replicas added)
        self._down_events: list[_Event] = []  # (time, replicas removed)
        self.last_ratio: float | None = None
        self._warm_start = c.warm_start

    # -- 1. replica calculator ------------------------------------------------------------------
    def _within(self, ratio: float) -> bool:
        return 1.0 - self.down_tol <= ratio <= 1.0 + self.up_tol

    def replica_calculator(self, current: int, ready_values: list[float], n_starting: int) -> int:
        if not ready_values:
            return current  # "did not receive metrics for targeted pods": no change
        ratio = (sum(ready_values) / len(ready_values)) / self.target
        self.last_ratio = ratio
        if n_starting == 0:
            if self._within(ratio):
                return current
            return math.ceil(ratio * len(ready_values))
        fill = self.target if ratio < 1.0 else 0.0
        values = ready_values + [fill] * n_starting
        new_ratio = (sum(values) / len(values)) / self.target
        if self._within(new_ratio) or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
            return current
        new = math.ceil(new_ratio * len(values))
        if (new_ratio < 1.0 and new > current) or (new_ratio > 1.0 and new < current):
            return current
        return new

    # -- 2. stabilization ------------------------------------------------------------------------
    def _stabilize(self, now: float, current: int, raw: int) -> int:
        up_cut = now - self.up_rules.stabilization_window_s
        down_cut = now - self.down_rules.stabilization_window_s
        up_rec = raw
        down_rec = raw
        for r in self._recommendations:
            if r.t > up_cut:
                up_rec = min(up_rec, r.value)
            if r.t > down_cut:
                down_rec = max(down_rec, r.value)
        keep_after = min(up_cut, down_cut)
        self._recommendations = [r for r in self._recommendations if r.t > keep_after]
        self._recommendations.append(_Event(now, raw))
        rec = current
        if rec < up_rec:
            rec = up_rec
        if rec > down_rec:
            rec = down_rec
        return rec

    # -- 3. rate limits -------------------------------------------------------------------------
    def _period_start(self, now: float, current: int, period_s: float) -> int:
        return current - _sum_since(self._up_events, now - period_s) + _sum_since(self._down_events, now - period_s)

    def scale_up_limit(self, now: float, current: int) -> int:
        rules = self.up_rules
        if rules.select_policy == "disabled":
            return current
        proposals = []
        for p in rules.policies:
            start = self._period_start(now, current, p.period_s)
            proposals.append(start + p.value if p.type == "pods" else math.ceil(start * (1 + p.value / 100)))
        return max(proposals) if rules.select_policy == "max" else min(proposals)

    def scale_down_limit(self, now: float, current: int) -> int:
        rules = self.down_rules
        if rules.select_policy == "disabled":
            return current
        proposals = []
        for p in rules.policies:
            start = self._period_start(now, current, p.period_s)
            proposals.append(start - p.value if p.type == "pods" else int(start * (1 - p.value / 100)))
        # "max" policy = the largest change = the lowest floor.
        return min(proposals) if rules.select_policy == "max" else max(proposals)

    def _rate_limit(self, now: float, current: int, desired: int) -> int:
        hi = self.max_replicas if self.max_replicas is not None else math.inf
        if desired > current:
            limit = max(self.scale_up_limit(now, current), current)
            return int(min(desired, hi, limit))
        if desired < current:
            limit = min(self.scale_down_limit(now, current), current)
            return max(desired, self.min_replicas, limit)
        return desired

    # -- the sync --------------------------------------------------------------------------------
    def decide(self, now: float, cluster: ClusterView) -> int:
        current = cluster.current
        if self._warm_start:
            # As if the HPA had been running at the initial size: seed the stabilization window.
            self._warm_start = False
            self._recommendations.append(_Event(now, current))
        if current == 0 and self.min_replicas != 0:
            return current  # "autoscaling is disabled" when scaled to 0 (the cluster clamps to min)
        if self.max_replicas is not None and current > self.max_replicas:
            desired = self.max_replicas
        elif current < self.min_replicas:
            desired = self.min_replicas
        else:
            ready_values = [float(self.metric_fn(v)) for v in cluster.ready]
            raw = self.replica_calculator(current, ready_values, len(cluster.starting))
            desired = self._rate_limit(now, current, self._stabilize(now, current, raw))
        self._record_scale(now, current, desired)
        return desired

    def _record_scale(self, now: float, current: int, desired: int) -> None:
        longest = max([p.period_s for p in self.up_rules.policies + self.down_rules.policies] or [0.0])
        self._up_events = [e for e in self._up_events if e.t > now - longest]
        self._down_events = [e for e in self._down_events if e.t > now - longest]
        if desired > current:
            self._up_events.append(_Event(now, desired - current))
        elif desired < current:
            self._down_events.append(_Event(now, current - desired))
