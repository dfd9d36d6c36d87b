"""Ray Serve's default autoscaling policy (``ray/serve/autoscaling_policy.py``, Ray 2.x).

Samples (``observe``, every ``metric_period_s`` = 0.5 s, Ray's replica metric record interval): total
ongoing requests = router-tracked in-flight requests on serving replicas + requests held at the
gateway (Ray counts requests queued at handles). ``total`` is their ``aggregation_function`` (mean)
over the last ``look_back_period_s`` (30 s).

Per control-loop tick (``sync_period_s`` = 0.1 s, Ray's ``CONTROL_LOOP_INTERVAL_S``), with
``running`` = serving replicas and ``target`` = the current desired count (serving + starting):

1. Cold start: with 0 running replicas, scale to ``max(ceil(upscaling_factor), target)`` at once if
   any request is waiting, else hold (no delays).
2. ``desired = total / target_ongoing_requests`` (default 2).
3. Smoothing (``_apply_scaling_factors``): ``ceil(running + factor * (desired - running))`` with
   ``upscaling_factor`` / ``downscaling_factor`` (default ``smoothing_factor`` = 1.0); a downscale
   that the factor rounds away still removes one replica.
4. Clamp to ``[min_replicas, max_replicas]``.
5. Delays (``_apply_delay_logic``): a scale-up is applied once it has been wanted on more than
   ``upscale_delay_s / sync_period_s`` consecutive ticks (30 s), a scale-down on more than
   ``downscale_delay_s / sync_period_s`` (600 s; ``downscale_to_zero_delay_s`` for 1 -> 0); a tick
   wanting the opposite direction (or no change) resets the counter.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Literal

from pydantic import Field

from policies.autoscalers.common import BoundedAutoscaler, BoundsParams
from policies.base import ClusterView, ReplicaState
from policies.registry import register_autoscaler


class RayServeParams(BoundsParams):
    target_ongoing_requests: float = Field(2.0, gt=0)
    look_back_period_s: float = Field(30.0, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    downscale_to_zero_delay_s: float | None = Field(None, ge=0)
    smoothing_factor: float = Field(1.0, gt=0)
    upscaling_factor: float | None = Field(None, gt=0)
    downscaling_factor: float | None = Field(None, gt=0)
    aggregation_function: Literal["mean", "max", "min"] = "mean"
    metric_period_s: float = Field(0.5, gt=0)


@register_autoscaler("ray-serve")
class RayServe(BoundedAutoscaler):
    """Ray Serve ``replica_queue_length_autoscaling_policy`` (see module docstring)."""

    Params = RayServeParams
    default_sync_period_s = 0.1

    def __init__(self, rng=None, **params):
        super().__init__(rng, **params)
        c: RayServeParams = self.cfg  # type: ignore[assignment]
        self.metric_period_s = c.metric_period_s
        self.up_factor = c.upscaling_factor if c.upscaling_factor is not None else c.smoothing_factor
        self.down_factor = c.downscaling_factor if c.downscaling_factor is not None else c.smoothing_factor
        self._samples: deque[tuple[float, float]] = deque()
        self.decision_counter = 0
        self.last_total = 0.0

    def record(self, now: float, cluster: ClusterView) -> None:
        total = sum(v.inflight_requests for v in cluster.replicas if v.state == ReplicaState.SERVING)
        self._samples.append((now, float(total + cluster.cluster_waiting)))
        while self._samples and self._samples[0][0] <= now - self.cfg.look_back_period_s:
            self._samples.popleft()

    def total_ongoing(self) -> float:
        vals = [x for _, x in self._samples]
        if not vals:
            return 0.0
        agg = self.cfg.aggregation_function
        return max(vals) if agg == "max" else min(vals) if agg == "min" else sum(vals) / len(vals)

    def apply_scaling_factors(self, desired: float, running: int) -> int:
        delta = desired - running
        factor = self.up_factor if delta > 0 else self.down_factor
        scaled = math.ceil(running + factor * delta)
        if math.ceil(desired) < running and scaled == running:
            scaled -= 1
        return scaled

    def _ticks(self, delay_s: float) -> int:
        # Ray: int(delay / CONTROL_LOOP_INTERVAL_S); the epsilon keeps 30/0.1 = 299.999... at 300.
        return int(delay_s / self.sync_period_s + 1e-9)

    def apply_delay(self, desired: int, target: int) -> int:
        decision = target
        if desired > target:
            if self.decision_counter < 0:
                self.decision_counter = 0
            self.decision_counter += 1
            if self.decision_counter > self._ticks(self.cfg.upscale_delay_s):
                self.decision_counter = 0
                decision = desired
        elif desired < target:
            if self.decision_counter > 0:
                self.decision_counter = 0
            self.decision_counter -= 1
            if target == 1:
                dz = self.cfg.downscale_to_zero_delay_s
                delay = dz if dz is not None else self.cfg.downscale_delay_s
            else:
                delay = self.cfg.downscale_delay_s
                desired = max(1, desired)
            if self.decision_counter < -self._ticks(delay):
                self.decision_counter = 0
                decision = desired
        else:
            self.decision_counter = 0
        return decision

    def decide(self, now: float, cluster: ClusterView) -> int:
        running = len(cluster.ready)
        target = cluster.current
        total = self.total_ongoing()
        self.last_total = total
        if running == 0:
            waiting = cluster.cluster_waiting + sum(v.inflight_requests for v in cluster.replicas)
            return max(math.ceil(self.up_factor), target) if waiting > 0 else target
        desired = total / self.cfg.target_ongoing_requests
        return self.apply_delay(self.clamp(self.apply_scaling_factors(desired, running)), target)
