"""Registries keyed by name: ``router.policy`` and ``autoscaler.policy`` in scenario files.

Add a policy by subclassing :class:`policies.base.Router` (or ``Autoscaler``) and decorating it::

    from policies import Router, register_router

    @register_router("shortest-queue")
    class ShortestQueue(Router):
        def route(self, request, views, now):
            return min(views, key=lambda v: (v.num_waiting, v.replica_id)).replica_id
"""

from __future__ import annotations

from typing import Any, Callable

from sim.errors import ConfigError

ROUTERS: dict[str, type] = {}
AUTOSCALERS: dict[str, type] = {}


def register_router(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return deco


def register_autoscaler(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        cls.name = name
        AUTOSCALERS[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    # Importing the modules registers their policies.
    import policies.routers  # noqa: F401
    import policies.autoscalers  # noqa: F401


def make_router(policy: str, rng=None, **params: Any):
    _load_builtin()
    if policy not in ROUTERS:
        raise ConfigError(f"router.policy: unknown router {policy!r}; known: {sorted(ROUTERS)}")
    try:
        return ROUTERS[policy](rng=rng, **params)
    except TypeError as e:
        raise ConfigError(f"router {policy!r}: bad parameters: {e}") from None


def make_autoscaler(policy: str, rng=None, **params: Any):
    _load_builtin()
    if policy not in AUTOSCALERS:
        raise ConfigError(f"autoscaler.policy: unknown autoscaler {policy!r}; known: {sorted(AUTOSCALERS)}")
    try:
        return AUTOSCALERS[policy](rng=rng, **params)
    except TypeError as e:
        raise ConfigError(f"autoscaler {policy!r}: bad parameters: {e}") from None
