"""Routing, autoscaling and admission policies, shared by the simulator and real-engine runs."""

from policies.base import (  # noqa: F401
    Autoscaler,
    ClusterView,
    ReplicaState,
    ReplicaView,
    Router,
    RoutingRequest,
)
from policies.registry import make_autoscaler, make_router, register_autoscaler, register_router  # noqa: F401
