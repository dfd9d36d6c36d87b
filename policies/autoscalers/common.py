"""What every autoscaler shares: replica bounds, the decision period, and the metric-sampling hook.

Calling convention (the cluster's side):

- ``desired(now, cluster)`` every ``sync_period_s`` (the policy's decision period: HPA 15 s, KPA 2 s,
  Ray Serve 0.1 s, saturation 60 s); the result is already clamped to ``[min_replicas, max_replicas]``.
- ``observe(now, cluster)`` every ``metric_period_s`` if the policy has one (not ``None``): policies that
  decide on windows of samples (KPA's 60 s / 6 s averages, Ray Serve's look-back, the saturation
  analyzer's 1-minute peaks) record one sample per call. Calls closer together than
  ``metric_period_s`` are ignored, and ``desired`` calls ``observe`` itself first, so a cluster that
  never calls ``observe`` still gets a working (coarser-sampled) policy.
"""

from __future__ import annotations

import math
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.base import Autoscaler, ClusterView
from policies.registry import parse_params


class BoundsParams(BaseModel):
    """Parameters every autoscaler takes."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int | None = Field(None, ge=1, description="null: no bound beyond the cluster's")
    sync_period_s: float | None = Field(None, gt=0, description="decision period; null: the policy's default")

    @model_validator(mode="after")
    def _check_bounds(self):
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class BoundedAutoscaler(Autoscaler):
    """Base class: parses ``Params`` (a :class:`BoundsParams` subclass) and clamps decisions.

    Subclasses implement :meth:`decide` (unclamped) and, if they keep samples, :meth:`record`
    together with a ``metric_period_s``.
    """

    Params: ClassVar[type[BoundsParams]] = BoundsParams
    default_sync_period_s: ClassVar[float] = 15.0
    metric_period_s: float | None = None

    def __init__(self, rng=None, **params):
        self.cfg = parse_params("autoscaler", self.name, self.Params, params)
        self.rng = rng
        self.min_replicas = self.cfg.min_replicas
        self.max_replicas = self.cfg.max_replicas
        self.sync_period_s = self.cfg.sync_period_s or self.default_sync_period_s
        self._last_sample_s = -math.inf

    def clamp(self, n: int) -> int:
        n = max(self.min_replicas, int(n))
        return n if self.max_replicas is None else min(self.max_replicas, n)

    def observe(self, now: float, cluster: ClusterView) -> None:
        if self.metric_period_s is None or now - self._last_sample_s < self.metric_period_s - 1e-9:
            return
        self._last_sample_s = now
        self.record(now, cluster)

    def record(self, now: float, cluster: ClusterView) -> None:
        """Store one metric sample (windowed policies override)."""

    def desired(self, now: float, cluster: ClusterView) -> int:
        self.observe(now, cluster)  # no-op if a sample was taken within the last metric period
        return self.clamp(self.decide(now, cluster))

    def decide(self, now: float, cluster: ClusterView) -> int:
        raise NotImplementedError
