"""The fixed-size fleet (no autoscaling)."""

from __future__ import annotations

from policies.autoscalers.common import BoundedAutoscaler
from policies.base import ClusterView
from policies.registry import register_autoscaler


@register_autoscaler("none")
class NoAutoscaler(BoundedAutoscaler):
    """Keeps the fleet at its current size (clamped to ``[min_replicas, max_replicas]`` if given)."""

    def decide(self, now: float, cluster: ClusterView) -> int:
        return cluster.current
