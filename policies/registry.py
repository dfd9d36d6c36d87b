"""Registries keyed by name: ``router.policy`` and ``autoscaler.policy`` in scenario files.

Add a policy by subclassing :class:`policies.base.Router` (or ``Autoscaler``) and decorating it::

    from policies import Router, register_router

    @register_router("shortest-queue")
    class ShortestQueue(Router):
        def route(self, request, views, now):
            return min(views, key=lambda v: (v.num_waiting, v.replica_id)).replica_id
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from sim.errors import ConfigError

_M = TypeVar("_M")

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


def parse_params(kind: str, name: str, model: type[_M], params: dict[str, Any]) -> _M:
    """Validate a policy's parameters with its pydantic ``model`` (``extra="forbid"``).

    Any problem becomes ONE-line :class:`ConfigError` naming the policy and the field, e.g.
    ``router 'sticky': eps: Input should be greater than 0 (got -1)``; unknown keys are errors, not
    silently ignored.
    """
    from pydantic import ValidationError

    try:
        return model.model_validate(params)  # type: ignore[attr-defined]
    except ValidationError as e:
        parts = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err.get("loc", ()))
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            if err.get("type") == "extra_forbidden":
                msg = "unknown parameter"
            got = err.get("input")
            quiet = err.get("type") in ("extra_forbidden", "missing", "value_error") or not loc
            tail = "" if quiet else f" (got {got!r})"
            loc = loc or "(parameters)"
            parts.append(f"{loc}: {msg}{tail}")
        raise ConfigError(f"{kind} {name!r}: " + "; ".join(parts).replace("\n", " ")) from None


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
