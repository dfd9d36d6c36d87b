"""Capacity finder: the smallest fleet that meets the SLOs, or the highest load a fleet sustains.

Both are searches over :func:`sim.run`, assuming the answer is monotone (more replicas never make
latency worse; more load never makes it better), which holds for the fixed fleets searched here
up to simulation noise. Each search first brackets the answer by doubling/halving from the
scenario's own value, then bisects, so a typical search costs ``2 log2(answer)`` runs.

Why a fixed fleet: with an autoscaler the fleet size is an outcome, not a knob; the fleet search
turns the autoscaler off (``autoscaler.policy: none``) and says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pandas as pd

from app.report import SLOCriterion
from sim.scenario import Scenario, load_scenario

StepHook = Callable[[int, dict], None]  # (runs so far, the point just evaluated)


@dataclass
class CapacityResult:
    """The answer (``None`` if no tried value met the SLOs), every tried point, and a sentence."""

    best: float | None
    points: pd.DataFrame
    message: str
    knob: str
    results: dict = field(default_factory=dict)  # knob value -> Result (kept for drill-down)


def _with(sc: Scenario, updates: dict) -> Scenario:
    """A copy of ``sc`` with dotted-key ``updates`` applied, validated again."""
    data = sc.model_dump(mode="json", exclude_none=True)
    for key, value in updates.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    out = load_scenario(data)
    out.base_dir = sc.base_dir
    return out


class _Evaluator:
    def __init__(self, sc: Scenario, crit: SLOCriterion, knob: str, run: Callable, on_step: StepHook | None,
                 extra: dict | None = None):
        self.sc, self.crit, self.knob, self.run, self.on_step = sc, crit, knob, run, on_step
        self.extra = extra or {}
        self.cache: dict[float, bool] = {}
        self.rows: list[dict] = []
        self.results: dict = {}

    def __call__(self, value: float) -> bool:
        if value in self.cache:
            return self.cache[value]
        sc = _with(self.sc, {self.knob: value, **self.extra})
        r = self.run(sc)
        ok, why = self.crit.check(r.summary)
        s = r.summary
        row = {
            self.knob: value, "meets_slo": ok, "why": why,
            "ttft_p99_s": s.get("ttft_p99_s"), "tpot_p99_s": s.get("tpot_p99_s"), "e2e_p99_s": s.get("e2e_p99_s"),
            "slo_attainment": s.get("slo_attainment"), "offered_req_s": offered_rate(r.requests),
            "cost_usd": s.get("cost_usd"), "cost_per_million_output_tokens_usd": s.get("cost_per_million_output_tokens_usd"),
        }
        self.rows.append(row)
        self.results[value] = r
        self.cache[value] = ok
        if self.on_step is not None:
            self.on_step(len(self.rows), row)
        return ok

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def offered_rate(requests: pd.DataFrame) -> float:
    """Arrivals per second over the arrival span of the run's workload."""
    if len(requests) < 2:
        return math.nan
    span = float(requests["arrival_s"].max() - requests["arrival_s"].min())
    return (len(requests) - 1) / span if span > 0 else math.nan


def smallest_fleet(sc: Scenario, crit: SLOCriterion, *, max_replicas: int = 64, run: Callable | None = None,
                   on_step: StepHook | None = None) -> CapacityResult:
    """Fewest replicas (fixed fleet, autoscaler off) whose run meets ``crit``."""
    if run is None:
        import sim

        run = sim.run
    crit.require_limits()
    slo = {**sc.slo.model_dump(exclude_none=True), **crit.slo_section()}
    ev = _Evaluator(sc, crit, "cluster.replicas", run, on_step,
                    extra={"autoscaler": {"policy": "none"}, "slo": slo})
    start = min(max(1, sc.cluster.replicas), max_replicas)
    if ev(start):
        lo, hi = 0, start  # hi meets; lo = largest known failing (0 = none tried)
        probe = start
        while probe > 1:
            probe = max(1, probe // 2)
            if ev(probe):
                hi = probe
            else:
                lo = probe
                break
        if hi == 1:
            return CapacityResult(1, ev.frame(), "1 replica already meets the SLOs", "cluster.replicas", ev.results)
    else:
        lo, hi = start, None
        probe = start
        while probe < max_replicas:
            probe = min(max_replicas, probe * 2)
            if ev(probe):
                hi = probe
                break
            lo = probe
        if hi is None:
            return CapacityResult(None, ev.frame(), f"even {max_replicas} replicas do not meet the SLOs",
                                  "cluster.replicas", ev.results)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ev(mid):
            hi = mid
        else:
            lo = mid
    row = ev.frame().set_index("cluster.replicas").loc[hi]
    return CapacityResult(hi, ev.frame(), f"{hi} replicas meet the SLOs ({row['why']}); "
                          f"{hi - 1} do not", "cluster.replicas", ev.results)


def highest_load(sc: Scenario, crit: SLOCriterion, *, max_factor: float = 64.0, min_factor: float = 1 / 64,
                 rel_tol: float = 0.05, run: Callable | None = None, on_step: StepHook | None = None) -> CapacityResult:
    """Largest multiple of the workload's arrival rate (``workload.rate_scale``) that the fleet
    sustains within ``crit``, to a relative precision of ``rel_tol``."""
    if run is None:
        import sim

        run = sim.run
    crit.require_limits()
    slo = {**sc.slo.model_dump(exclude_none=True), **crit.slo_section()}
    base = sc.workload.rate_scale
    knob = "workload.rate_scale"

    def ok(factor: float) -> bool:
        return ev(round(base * factor, 6))

    ev = _Evaluator(sc, crit, knob, run, on_step, extra={"slo": slo})
    if ok(1.0):
        lo, hi = 1.0, None
        f = 1.0
        while f < max_factor:
            f = min(max_factor, f * 2)
            if ok(f):
                lo = f
            else:
                hi = f
                break
        if hi is None:
            return CapacityResult(round(base * lo, 6), ev.frame(), f"meets the SLOs up to the search limit (x{max_factor:g} load)",
                                  knob, ev.results)
    else:
        lo, hi = None, 1.0
        f = 1.0
        while f > min_factor:
            f = max(min_factor, f / 2)
            if ok(f):
                lo = f
                break
            hi = f
        if lo is None:
            return CapacityResult(None, ev.frame(), f"does not meet the SLOs even at x{min_factor:g} of the load",
                                  knob, ev.results)
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    best = round(base * lo, 6)
    row = ev.frame().set_index(knob).loc[best]
    rate = row["offered_req_s"]
    return CapacityResult(best, ev.frame(), f"sustains x{lo:.3g} of the workload's rate "
                          f"(~{rate:.3g} req/s offered) within the SLOs; x{hi:.3g} does not", knob, ev.results)
