"""Admission control and load shedding at the gateway, before routing.

``AdmissionController.admit(request, now, cluster) -> (admitted, reason)`` applies, in order:

1. **Queue depth** (``max_queue_depth``): the cluster-wide waiting count (requests waiting inside
   replicas, ``num_waiting`` summed, plus requests held at the gateway, ``cluster_waiting``). A request
   arriving when it is ``>= max_queue_depth`` is rejected with ``"queue_full"``.
2. **Priority shedding** (``priority_queue_depth``, ``{priority: depth}``): priorities follow vLLM
   (*lower value = more important*, default 0). A request of priority ``p`` is rejected with
   ``"shed:priority-<p>"`` when the waiting count is ``>=`` the smallest depth configured for any
   priority ``<= p``; so ``{1: 50, 2: 20}`` sheds priority-1 traffic at 50 waiting, priority-2-and-worse
   at 20, and never sheds priority 0 before ``max_queue_depth``.
3. **Per-tenant rate limits** (``tenants``, ``default_tenant``): each tenant has two token buckets,
   ``requests_per_min`` and ``tokens_per_min``, refilled continuously at ``rate/60`` per second and
   holding at most ``burst_s`` seconds of budget (default 60 s: one minute's worth). A request needs a
   whole request token and a token bucket that is not exhausted (``> 0``); it is then charged 1
   request and its prompt tokens, and (``charge_output_tokens``) its output tokens when it finishes
   (``on_finished``), so the token bucket can go into debt, as usage-based gateway limits (LiteLLM
   TPM, Envoy AI Gateway token quotas) do: the output length is unknown at admission. Rejections read
   ``"rate_limited:<tenant>"``. Tenants not listed use ``default_tenant`` (each with its own
   buckets) or are unlimited; requests without a tenant are tenant ``"default"``.

Nothing is charged for a rejected request. The controller counts rejections per reason in
``rejections``. Priority *ordering* inside a replica is the engine's business (vLLM's
``--scheduling-policy priority``), not admission's.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

from policies.base import ClusterView, RoutingRequest
from policies.registry import parse_params

NO_TENANT = "default"


class TenantLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_min: float | None = Field(None, gt=0)
    tokens_per_min: float | None = Field(None, gt=0)
    burst_s: float = Field(60.0, gt=0, description="bucket capacity in seconds of refill")

    @model_validator(mode="after")
    def _some_limit(self):
        if self.requests_per_min is None and self.tokens_per_min is None:
            raise ValueError("set requests_per_min and/or tokens_per_min")
        return self


class AdmissionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_queue_depth: int | None = Field(None, ge=0)
    priority_queue_depth: dict[int, int] = Field(default_factory=dict)
    tenants: dict[str, TenantLimits] = Field(default_factory=dict)
    default_tenant: TenantLimits | None = None
    charge_output_tokens: bool = True

    @model_validator(mode="after")
    def _depths(self):
        bad = {p: d for p, d in self.priority_queue_depth.items() if d < 0}
        if bad:
            raise ValueError(f"priority_queue_depth values must be >= 0, got {bad}")
        return self


@dataclass
class TokenBucket:
    """A continuously refilled bucket: ``rate_per_s`` refill, at most ``capacity`` (may go negative)."""

    rate_per_s: float
    capacity: float
    level: float
    t: float = 0.0

    def refill(self, now: float) -> None:
        if now > self.t:
            self.level = min(self.capacity, self.level + (now - self.t) * self.rate_per_s)
            self.t = now


class _Tenant:
    __slots__ = ("requests", "tokens")

    def __init__(self, limits: TenantLimits, now: float):
        def bucket(per_min: float | None) -> TokenBucket | None:
            if per_min is None:
                return None
            cap = per_min * limits.burst_s / 60.0
            return TokenBucket(per_min / 60.0, cap, cap, now)

        self.requests = bucket(limits.requests_per_min)
        self.tokens = bucket(limits.tokens_per_min)


class AdmissionController:
    """Queue-depth limit, priority shedding and per-tenant token buckets (see module docstring)."""

    def __init__(self, **params):
        self.cfg: AdmissionParams = parse_params("admission", "admission", AdmissionParams, params)
        self._prio = sorted(self.cfg.priority_queue_depth.items())
        self._tenants: dict[str, _Tenant] = {}
        self.rejections: Counter[str] = Counter()

    @staticmethod
    def waiting(cluster: ClusterView) -> int:
        """Cluster-wide waiting requests: queued inside replicas plus held at the gateway."""
        return sum(int(v.num_waiting) for v in cluster.replicas) + int(cluster.cluster_waiting)

    def priority_depth(self, priority: int) -> int | None:
        """The waiting count at which a request of ``priority`` is shed (None: never by priority)."""
        depths = [d for p, d in self._prio if p <= priority]
        return min(depths) if depths else None

    def _tenant(self, name: str, now: float) -> _Tenant | None:
        t = self._tenants.get(name)
        if t is None:
            limits = self.cfg.tenants.get(name, self.cfg.default_tenant)
            if limits is None:
                return None
            t = self._tenants[name] = _Tenant(limits, now)
        return t

    def _reject(self, reason: str) -> tuple[bool, str]:
        self.rejections[reason] += 1
        return False, reason

    def admit(self, request: RoutingRequest, now: float, cluster: ClusterView) -> tuple[bool, str | None]:
        cfg = self.cfg
        if cfg.max_queue_depth is not None or self._prio:
            waiting = self.waiting(cluster)
            if cfg.max_queue_depth is not None and waiting >= cfg.max_queue_depth:
                return self._reject("queue_full")
            depth = self.priority_depth(int(request.priority or 0))
            if depth is not None and waiting >= depth:
                return self._reject(f"shed:priority-{int(request.priority or 0)}")
        name = request.tenant or NO_TENANT
        t = self._tenant(name, now)
        if t is not None:
            for b in (t.requests, t.tokens):
                if b is not None:
                    b.refill(now)
            if (t.requests is not None and t.requests.level < 1.0) or (t.tokens is not None and t.tokens.level <= 0.0):
                return self._reject(f"rate_limited:{name}")
            if t.requests is not None:
                t.requests.level -= 1.0
            if t.tokens is not None:
                t.tokens.level -= request.prompt_tokens
        return True, None

    def on_finished(self, request: RoutingRequest, now: float, output_tokens: int | None = None) -> None:
        """Charge the generated tokens of an admitted request (``output_tokens`` if given, else the
        request's ``output_tokens``) to its tenant's token bucket."""
        if not self.cfg.charge_output_tokens:
            return
        t = self._tenants.get(request.tenant or NO_TENANT)
        if t is None or t.tokens is None:
            return
        t.tokens.refill(now)
        t.tokens.level -= request.output_tokens if output_tokens is None else output_tokens


def make_admission(**params) -> AdmissionController | None:
    """``admission:`` section of a scenario (as keywords) -> controller; None when empty."""
    if not params:
        return None
    return AdmissionController(**params)
