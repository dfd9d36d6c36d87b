"""Knative Pod Autoscaler (``pkg/autoscaler/scaling/autoscaler.go`` ``Scale``), stable + panic windows.

Samples (``observe``, every ``metric_period_s`` = 1 s, Knative's 1 s buckets): the cluster's total
concurrency (router-tracked in-flight requests on serving replicas plus requests held at the gateway,
which Knative's activator counts), or its request rate (``metric: rps``, from ``arrivals_total``).

Per tick (``sync_period_s`` = 2 s), with averages over the last ``stable_window_s`` (60 s) and
``panic_window = stable_window_s * panic_window_percentage / 100`` (6 s) of samples:

1. ``ready = max(1, serving replicas)``; ``max_up = ceil(max_scale_up_rate * ready)`` (rate 1000);
   ``max_down = floor(ready / max_scale_down_rate)`` (rate 2).
2. ``dspc = ceil(stable_avg / target)``, ``dppc = ceil(panic_avg / target)`` where
   ``target = target * target_utilization`` per replica (defaults 100 x 0.7 for concurrency; use
   ``target: 200`` and ``target_utilization: 1`` for Knative's rps default); both clamped to
   ``[max_down, max_up]``.
3. Panic starts when ``dppc / ready >= panic_threshold_percentage / 100`` (2.0); every tick over the
   threshold refreshes the panic time; panic ends on the first tick *not* over the threshold once a
   full stable window has passed since the last refresh.
4. In panic ``desired = max(stable, panic)`` and never decreases (``max_panic_pods``).
5. Optional ``scale_down_delay_s``: the max of the desired counts over that window.

Not modelled: scale-to-zero grace period and the activator's excess-burst-capacity switch. With no
sample in the stable window yet, the tick holds the current count (Knative reports no decision).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from pydantic import Field

from policies.autoscalers.common import BoundedAutoscaler, BoundsParams
from policies.base import ClusterView, ReplicaState
from policies.registry import register_autoscaler


class KPAParams(BoundsParams):
    metric: Literal["concurrency", "rps"] = "concurrency"
    target: float = Field(100.0, gt=0, description="per-replica concurrency (or rps) target")
    target_utilization: float = Field(0.7, gt=0, le=1)
    stable_window_s: float = Field(60.0, ge=6, le=3600)
    panic_window_percentage: float = Field(10.0, ge=1, le=100)
    panic_threshold_percentage: float = Field(200.0, ge=110, le=1000)
    max_scale_up_rate: float = Field(1000.0, gt=1)
    max_scale_down_rate: float = Field(2.0, gt=1)
    scale_down_delay_s: float = Field(0.0, ge=0, le=3600)
    metric_period_s: float = Field(1.0, gt=0)


@register_autoscaler("kpa")
class KPA(BoundedAutoscaler):
    """Knative KPA (see module docstring)."""

    Params = KPAParams
    default_sync_period_s = 2.0

    def __init__(self, rng=None, **params):
        super().__init__(rng, **params)
        c: KPAParams = self.cfg  # type: ignore[assignment]
        self.metric_period_s = c.metric_period_s
        self.target = c.target * c.target_utilization
        self.stable_window_s = c.stable_window_s
        self.panic_window_s = c.stable_window_s * c.panic_window_percentage / 100.0
        self.panic_threshold = c.panic_threshold_percentage / 100.0
        self._samples: deque[tuple[float, float]] = deque()
        self._last_arrivals: tuple[float, int] | None = None
        self.panic_time: float | None = None  # last tick over the panic threshold; None = not panicking
        self.max_panic_pods = 0
        self._delay_window: deque[tuple[float, int]] = deque()
        self.last_stable_avg = 0.0
        self.last_panic_avg = 0.0

    @property
    def in_panic(self) -> bool:
        return self.panic_time is not None

    def record(self, now: float, cluster: ClusterView) -> None:
        if self.cfg.metric == "rps":
            prev = self._last_arrivals
            self._last_arrivals = (now, cluster.arrivals_total)
            if prev is None or now <= prev[0]:
                return
            value = (cluster.arrivals_total - prev[1]) / (now - prev[0])
        else:
            value = float(
                sum(v.inflight_requests for v in cluster.replicas if v.state == ReplicaState.SERVING)
                + cluster.cluster_waiting
            )
        self._samples.append((now, value))
        while self._samples and self._samples[0][0] <= now - self.stable_window_s:
            self._samples.popleft()

    def _avg(self, now: float, window: float) -> float | None:
        vals = [x for t, x in self._samples if t > now - window]
        return sum(vals) / len(vals) if vals else None

    def decide(self, now: float, cluster: ClusterView) -> int:
        stable = self._avg(now, self.stable_window_s)
        panic = self._avg(now, self.panic_window_s)
        if stable is None or panic is None:
            return cluster.current
        self.last_stable_avg, self.last_panic_avg = stable, panic
        ready = max(1, len(cluster.ready))
        max_up = math.ceil(self.cfg.max_scale_up_rate * ready)
        max_down = math.floor(ready / self.cfg.max_scale_down_rate)
        dspc = math.ceil(stable / self.target)
        dppc = math.ceil(panic / self.target)
        stable_pods = int(min(max(dspc, max_down), max_up))
        panic_pods = int(min(max(dppc, max_down), max_up))
        over = dppc / ready >= self.panic_threshold
        if over:
            self.panic_time = now
        elif self.panic_time is not None and self.panic_time + self.stable_window_s < now:
            self.panic_time = None
            self.max_panic_pods = 0
        desired = stable_pods
        if self.panic_time is not None:
            desired = max(desired, panic_pods)
            if desired > self.max_panic_pods:
                self.max_panic_pods = desired
            else:
                desired = self.max_panic_pods
        if self.cfg.scale_down_delay_s > 0:
            self._delay_window.append((now, desired))
            while self._delay_window and self._delay_window[0][0] <= now - self.cfg.scale_down_delay_s:
                self._delay_window.popleft()
            desired = max(d for _, d in self._delay_window)
        return desired
