"""Registries keyed by name: ``router.policy`` and ``autoscaler.policy`` in scenario files.

Add a policy by subclassing :class:`policies.base.Router` (or ``Autoscaler``) and decorating it::

    from policies import Router, register_router

    @register_router("shortest-queue")
    class ShortestQueue(Router):
        def route(self, request, views, now):
            return min(views, key=lambda v: (v.num_waiting, v.replica_id)).replica_id

A plain function ``route(request, views, now) -> replica_id`` (optionally taking ``rng`` too) can be
registered the same way. A scenario may also name a policy by import path, ``"mymodule:MyRouter"``
(a Router class or such a function; for autoscalers an Autoscaler class), with no registration.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, TypeVar

from sim.errors import ConfigError

_M = TypeVar("_M")

ROUTERS: dict[str, type] = {}
AUTOSCALERS: dict[str, type] = {}


def function_router(fn: Callable, name: str | None = None) -> type:
    """A Router class around a stateless function ``fn(request, views, now[, rng]) -> replica_id``."""
    from policies.base import Router

    takes_rng = "rng" in inspect.signature(fn).parameters

    def route(self, request, views, now):
        return fn(request, views, now, rng=self.rng) if takes_rng else fn(request, views, now)

    return type(f"FunctionRouter[{getattr(fn, '__name__', 'fn')}]", (Router,),
                {"name": name or getattr(fn, "__name__", "function"), "route": route, "__doc__": fn.__doc__})


def register_router(name: str) -> Callable[[Any], Any]:
    """Class decorator (a Router subclass) or function decorator (see :func:`function_router`).
    Decorating a function registers a wrapper class and returns the function unchanged."""

    def deco(obj: Any) -> Any:
        if isinstance(obj, type):
            obj.name = name
            ROUTERS[name] = obj
            return obj
        if callable(obj):
            ROUTERS[name] = function_router(obj, name)
            return obj
        raise TypeError(f"register_router({name!r}) needs a Router subclass or a function")

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


# The modules of ``policies.routers`` that register the built-in routers, and which one registers
# each name: a run imports only the module of the router it uses (the others, and their pydantic
# models, cost ~7 ms of start-up); listings and unknown names load them all.
_ROUTER_MODULES = ("basic", "hybrid", "load_aware", "prefix_aware", "sticky")
_ROUTER_MODULE_OF = {
    "round-robin": "basic", "random": "basic", "least-requests": "basic", "least-loaded": "basic",
    "hybrid": "hybrid", "least-kv": "load_aware", "power-of-two": "load_aware",
    "prefix-aware": "prefix_aware", "sticky": "sticky",
}


def _load_builtin_routers(policy: str | None = None) -> None:
    """Import (and so register) the built-in router ``policy``, or every built-in router."""
    mod = _ROUTER_MODULE_OF.get(policy) if policy is not None else None
    for m in (mod,) if mod is not None else _ROUTER_MODULES:
        importlib.import_module(f"policies.routers.{m}")


def _load_builtin_autoscalers() -> None:
    # Separate from the routers: a run without an autoscaler (the common case, and ``fleetsim run``'s
    # default) never pays for importing the autoscaler modules and building their pydantic models.
    import policies.autoscalers  # noqa: F401


def _load_builtin() -> None:
    """Register every built-in policy (for listings; ``make_*`` load only their own kind)."""
    _load_builtin_routers()
    _load_builtin_autoscalers()


def _import_policy(kind: str, policy: str) -> Any:
    mod, _, attr = policy.partition(":")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{kind}.policy: cannot import {policy!r} ({e})") from None


def make_router(policy: str, rng=None, **params: Any):
    _load_builtin_routers(policy)
    if policy not in ROUTERS and ":" not in policy:
        _load_builtin_routers()  # every built-in, for the error's list of known routers
    if policy in ROUTERS:
        cls = ROUTERS[policy]
    elif ":" in policy:
        from policies.base import Router

        cls = _import_policy("router", policy)
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            if not callable(cls):
                raise ConfigError(f"router.policy: {policy!r} is neither a Router subclass nor a function")
            cls = function_router(cls)
    else:
        raise ConfigError(f"router.policy: unknown router {policy!r}; known: {sorted(ROUTERS)}")
    try:
        return cls(rng=rng, **params)
    except TypeError as e:
        raise ConfigError(f"router {policy!r}: bad parameters: {e}") from None


def make_autoscaler(policy: str, rng=None, **params: Any):
    _load_builtin_autoscalers()
    if policy in AUTOSCALERS:
        cls = AUTOSCALERS[policy]
    elif ":" in policy:
        from policies.base import Autoscaler

        cls = _import_policy("autoscaler", policy)
        if not (isinstance(cls, type) and issubclass(cls, Autoscaler)):
            raise ConfigError(f"autoscaler.policy: {policy!r} is not an Autoscaler subclass")
    else:
        raise ConfigError(f"autoscaler.policy: unknown autoscaler {policy!r}; known: {sorted(AUTOSCALERS)}")
    try:
        return cls(rng=rng, **params)
    except TypeError as e:
        raise ConfigError(f"autoscaler {policy!r}: bad parameters: {e}") from None
