"""The fixed-size fleet (no autoscaling)."""

from __future__ import annotations

from policies.base import Autoscaler, ClusterView
from policies.registry import register_autoscaler


@register_autoscaler("none")
class NoAutoscaler(Autoscaler):
    """Keeps the fleet at its configured size."""

    def __init__(self, rng=None, **params):
        if params:
            from sim.errors import ConfigError

            raise ConfigError(f"autoscaler 'none': unknown parameter(s) {sorted(params)}")

    def desired(self, now: float, cluster: ClusterView) -> int:
        return cluster.current
