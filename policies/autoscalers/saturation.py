"""llm-d Workload Variant Autoscaler's saturation analyzer (``docs/saturation-analyzer.md``), one variant.

Samples (``observe``, every ``metric_period_s`` = 15 s, a Prometheus scrape): each serving replica's
``kv_usage`` and ``num_waiting``. The analyzer reads each replica's **peak** over the last
``lookback_s`` (60 s), as WVA's ``max_over_time[1m]`` queries do.

Per reconcile (``sync_period_s`` = 60 s), over the ready (serving) replicas:

1. A replica is *non-saturated* if ``kv < kv_cache_threshold (0.80) and queue < queue_length_threshold (5)``.
2. ``avg_spare_kv = mean(kv_cache_threshold - kv)`` and ``avg_spare_queue = mean(queue_length_threshold
   - queue)`` over the non-saturated replicas.
3. **Scale up** (+1) if ``avg_spare_kv < kv_spare_trigger (0.10)`` or ``avg_spare_queue <
   queue_spare_trigger (3)``, or if every replica is saturated; **blocked while any replica is
   starting** (WVA "prevents cascade scaling").
4. **Scale down** (-1) only if at least 2 replicas are non-saturated and spreading their total load
   over one fewer leaves ``threshold - total/(N-1) >= trigger`` for both KV and queue (the worst-case
   simulation). Here also only when no replica is starting, so a cold replica is never cancelled.
5. Otherwise hold.

With no serving replica: hold, or start one if requests are waiting at the gateway.
WVA emits this target for HPA/KEDA to apply; put HPA-style smoothing around it if you want BLIS's
"240 s stabilisation" variant.
"""

from __future__ import annotations

from collections import deque

from pydantic import Field

from policies.autoscalers.common import BoundedAutoscaler, BoundsParams
from policies.base import ClusterView, ReplicaState
from policies.registry import register_autoscaler


class SaturationParams(BoundsParams):
    kv_cache_threshold: float = Field(0.80, gt=0, le=1)
    queue_length_threshold: float = Field(5, gt=0)
    kv_spare_trigger: float = Field(0.10, ge=0, le=1)
    queue_spare_trigger: float = Field(3, ge=0)
    lookback_s: float = Field(60.0, gt=0)
    metric_period_s: float = Field(15.0, gt=0)


@register_autoscaler("saturation")
class Saturation(BoundedAutoscaler):
    """llm-d WVA saturation-based scaling (see module docstring)."""

    Params = SaturationParams
    default_sync_period_s = 60.0

    def __init__(self, rng=None, **params):
        super().__init__(rng, **params)
        c: SaturationParams = self.cfg  # type: ignore[assignment]
        self.metric_period_s = c.metric_period_s
        self._samples: dict[int, deque[tuple[float, float, float]]] = {}
        self.last_reason = ""

    def record(self, now: float, cluster: ClusterView) -> None:
        live = set()
        for v in cluster.replicas:
            if v.state != ReplicaState.SERVING:
                continue
            live.add(v.replica_id)
            dq = self._samples.setdefault(v.replica_id, deque())
            dq.append((now, float(v.kv_usage), float(v.num_waiting)))
            while dq and dq[0][0] <= now - self.cfg.lookback_s:
                dq.popleft()
        for rid in [r for r in self._samples if r not in live]:
            del self._samples[rid]

    def peak(self, now: float, view) -> tuple[float, float]:
        """(kv, queue) peaks of ``view`` over the look-back window (its current values if unsampled)."""
        dq = self._samples.get(view.replica_id)
        recent = [s for s in dq if s[0] > now - self.cfg.lookback_s] if dq else []
        if not recent:
            return float(view.kv_usage), float(view.num_waiting)
        return max(s[1] for s in recent), max(s[2] for s in recent)

    def decide(self, now: float, cluster: ClusterView) -> int:
        c: SaturationParams = self.cfg  # type: ignore[assignment]
        current = cluster.current
        ready = cluster.ready
        pending = len(cluster.starting) > 0
        if not ready:
            if current == 0 and cluster.cluster_waiting > 0:
                self.last_reason = "no replicas, requests waiting"
                return 1
            self.last_reason = "no ready replicas"
            return current
        peaks = [self.peak(now, v) for v in ready]
        nonsat = [(kv, q) for kv, q in peaks if kv < c.kv_cache_threshold and q < c.queue_length_threshold]
        if not nonsat:
            scale_up, why = True, "all replicas saturated"
        else:
            spare_kv = sum(c.kv_cache_threshold - kv for kv, _ in nonsat) / len(nonsat)
            spare_q = sum(c.queue_length_threshold - q for _, q in nonsat) / len(nonsat)
            scale_up = spare_kv < c.kv_spare_trigger or spare_q < c.queue_spare_trigger
            why = f"avg spare kv {spare_kv:.3f}, queue {spare_q:.2f}"
        if scale_up:
            if pending:
                self.last_reason = f"scale-up blocked: replicas pending ({why})"
                return current
            self.last_reason = f"scale up: {why}"
            return current + 1
        n = len(nonsat)
        if n >= 2 and not pending:
            kv_after = sum(kv for kv, _ in nonsat) / (n - 1)
            q_after = sum(q for _, q in nonsat) / (n - 1)
            if (c.kv_cache_threshold - kv_after >= c.kv_spare_trigger
                    and c.queue_length_threshold - q_after >= c.queue_spare_trigger):
                self.last_reason = f"scale down: N-1 keeps spare (kv {kv_after:.3f}, queue {q_after:.2f})"
                return current - 1
        self.last_reason = f"hold: {why}"
        return current
