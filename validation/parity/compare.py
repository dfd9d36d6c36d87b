"""Step-by-step scheduler parity: fleetsim's :class:`sim.engine.Engine` against vLLM's own Scheduler.

Both engines get the same :class:`~validation.parity.spec.ParityScenario`. fleetsim runs here, in
process; vLLM's real ``vllm.v1.core.sched.scheduler.Scheduler`` runs in vLLM's virtualenv through
:mod:`validation.parity.vllm_driver` (a subprocess: fleetsim never imports vllm). Each step yields
one record per engine; :func:`first_divergence` names the first step and field where they differ.

Compared per step (all exact): the scheduled requests in scheduling order with their token counts
and computed tokens before the step (prefix hits show up there), the preempted and finished
requests, running/waiting counts, free KV blocks after ``schedule()`` and after the update, KV
usage, how many block hashes are cached, and the prefix-cache counters (tokens queried / hit by
requests admitted for the first time, i.e. ``vllm:prefix_cache_queries`` / ``_hits``). Block ids
are not compared: vLLM and fleetsim may order equivalent unhashed free blocks differently, and
an unhashed block's id has no observable effect.

Command line (runs the built-in scenarios of :mod:`validation.parity.scenarios`)::

    python -m validation.parity.compare [NAME ...] [--json]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from sim.engine import Engine, EngineConfig, EngineRequest
from sim.errors import FleetsimError
from traces.schema import engine_block_hashes
from validation.parity.spec import ParityScenario

DRIVER = Path(__file__).with_name("vllm_driver.py")

# Fields compared per step, in the order a report lists them. The prefix-cache counters are kept
# apart so a test can check scheduling and KV accounting separately from statistics.
SCHEDULING_FIELDS = (
    "scheduled", "preempted", "finished", "num_running", "num_waiting",
    "free_blocks_after_schedule", "free_blocks", "kv_usage", "num_cached_hashes",
)
PREFIX_STAT_FIELDS = ("prefix_queries", "prefix_hits")
COMPARED_FIELDS = SCHEDULING_FIELDS + PREFIX_STAT_FIELDS

StepRecord = dict[str, Any]


class ParityError(FleetsimError):
    """The vLLM side could not run (driver error, crash, timeout); the message says why."""


# -- fleetsim side --------------------------------------------------------------------------------

def engine_config(sc: ParityScenario) -> EngineConfig:
    e = sc.engine
    return EngineConfig(
        num_gpu_blocks=e.num_gpu_blocks, block_size=e.block_size,
        max_num_batched_tokens=e.max_num_batched_tokens, max_num_seqs=e.max_num_seqs,
        max_model_len=e.max_model_len, enable_chunked_prefill=e.enable_chunked_prefill,
        enable_prefix_caching=e.enable_prefix_caching, scheduling_policy=e.policy,
        watermark=e.watermark, long_prefill_token_threshold=e.long_prefill_token_threshold,
        # None = vLLM's default for the version under test (True since vLLM 0.32).
        scheduler_reserve_full_isl=True if e.scheduler_reserve_full_isl is None else e.scheduler_reserve_full_isl)


def run_fleetsim(sc: ParityScenario) -> list[StepRecord]:
    """Step fleetsim's Engine through the scenario; one record per step (same keys as the driver).

    Step k: add the requests with ``arrival_step == k``, ``schedule()``, ``update()``. Prompt token
    ids become block hashes with :func:`traces.schema.engine_block_hashes`, as a trace with token
    ids would.
    """
    cfg = engine_config(sc)
    engine = Engine(cfg)
    kv = engine.kv
    by_step: dict[int, list[int]] = {}
    for i, r in enumerate(sc.requests):
        by_step.setdefault(r.arrival_step, []).append(i)
    ids = [r.id for r in sc.requests]
    last_arrival = max(by_step, default=-1)
    records: list[StepRecord] = []
    step = 0
    while step <= last_arrival or engine.has_work():
        if step >= sc.max_steps:
            raise ParityError(f"scenario {sc.name!r}: fleetsim not finished after max_steps={sc.max_steps}")
        for i in by_step.get(step, ()):
            r = sc.requests[i]
            hashes = engine_block_hashes(len(r.prompt_token_ids), cfg.block_size,
                                         token_ids=r.prompt_token_ids)
            req = EngineRequest(i, sc.arrival_time(i), len(r.prompt_token_ids), r.max_tokens,
                                block_hashes=hashes, priority=r.priority)
            engine.add_request(req, float(step))
        q0, h0 = kv.prefix_queries, kv.prefix_hits
        plan = engine.schedule(float(step))
        # At plan time num_computed_tokens includes this step's prefix hits, not its new tokens.
        scheduled = [[ids[req.idx], n, req.num_computed_tokens]
                     for req, n in zip(plan.requests, plan.num_tokens)]
        free_after_schedule = kv.num_free_blocks
        finished = engine.update(plan, float(step))
        records.append({
            "step": step,
            "scheduled": scheduled,
            "preempted": sorted(ids[r.idx] for r in plan.preempted),
            "finished": sorted(ids[r.idx] for r in finished),
            "num_running": engine.num_running,
            "num_waiting": engine.num_waiting,
            "free_blocks_after_schedule": free_after_schedule,
            "free_blocks": kv.num_free_blocks,
            "kv_usage": kv.usage(),
            "num_cached_hashes": kv.pool.num_cached_hashes(),
            "prefix_queries": kv.prefix_queries - q0,
            "prefix_hits": kv.prefix_hits - h0,
        })
        step += 1
    return records


# -- vLLM side ------------------------------------------------------------------------------------

@dataclass
class VllmRun:
    """What the driver reported for one scenario."""

    config: dict[str, Any]
    steps: list[StepRecord]


def run_vllm(scenarios: Sequence[ParityScenario], python: str | Path | None = None,
             timeout_s: float = 900.0) -> dict[str, VllmRun]:
    """Run all scenarios through vLLM's Scheduler in ONE driver process (vllm imports once).

    ``python`` defaults to :func:`validation.engine.vllm_python` (the vLLM virtualenv).
    """
    if python is None:
        from validation.engine import vllm_python
        python = vllm_python()
    payload = json.dumps([sc.to_driver_json() for sc in scenarios])
    with tempfile.TemporaryFile(mode="w+") as err:
        try:
            proc = subprocess.run([str(python), str(DRIVER)], input=payload, stdout=subprocess.PIPE,
                                  stderr=err, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ParityError(f"vllm driver did not finish within {timeout_s:.0f} s") from None
        err.seek(0)
        stderr_tail = "".join(err.readlines()[-15:])
    runs: dict[str, VllmRun] = {}
    for line in proc.stdout.splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        kind = rec.pop("kind")
        name = rec.get("scenario")
        if kind == "error":
            raise ParityError(f"vllm driver failed on scenario {name!r}: {rec['message']}\n{stderr_tail}")
        if kind == "config":
            runs[name] = VllmRun(config=rec, steps=[])
        elif kind == "step":
            runs[name].steps.append(rec)
    if proc.returncode != 0:
        raise ParityError(f"vllm driver exited with status {proc.returncode}:\n{stderr_tail}")
    missing = [sc.name for sc in scenarios if sc.name not in runs]
    if missing:
        raise ParityError(f"vllm driver reported nothing for {missing}:\n{stderr_tail}")
    return runs


# -- the diff -------------------------------------------------------------------------------------

def _equal(field_name: str, a: Any, b: Any) -> bool:
    if field_name == "kv_usage":
        return abs(float(a) - float(b)) <= 1e-12
    return a == b


@dataclass
class Divergence:
    """The first step at which fleetsim and vLLM disagree."""

    scenario: str
    step: int
    fields: dict[str, tuple[Any, Any]]  # field -> (fleetsim, vllm)
    fleetsim_steps: int
    vllm_steps: int
    context: list[tuple[StepRecord | None, StepRecord | None]] = field(default_factory=list)
    arrivals: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"scenario {self.scenario!r}: first divergence at step {self.step} "
                 f"(fleetsim ran {self.fleetsim_steps} steps, vLLM {self.vllm_steps})"]
        if self.arrivals:
            lines.append(f"  arrivals before this step: {', '.join(self.arrivals)}")
        for name, (f, v) in self.fields.items():
            lines.append(f"  {name}:\n    fleetsim: {f}\n    vLLM:     {v}")
        if self.context:
            lines.append("  preceding steps (fleetsim | vLLM scheduled [id, tokens, computed]):")
            for f, v in self.context:
                step = (f or v or {}).get("step")
                lines.append(f"    step {step}: {f and f['scheduled']} | {v and v['scheduled']}")
        return "\n".join(lines)


def first_divergence(sc: ParityScenario, fleet: list[StepRecord], vllm: list[StepRecord],
                     fields: Sequence[str] = COMPARED_FIELDS,
                     context_steps: int = 3) -> Divergence | None:
    """The first step whose records differ in any of ``fields`` (or where one side stopped)."""
    n = max(len(fleet), len(vllm))
    for k in range(n):
        f = fleet[k] if k < len(fleet) else None
        v = vllm[k] if k < len(vllm) else None
        if f is None or v is None:
            diff = {"steps": (len(fleet), len(vllm))}
        else:
            diff = {name: (f[name], v[name]) for name in fields
                    if not _equal(name, f[name], v[name])}
        if diff:
            ctx = [(fleet[j] if j < len(fleet) else None, vllm[j] if j < len(vllm) else None)
                   for j in range(max(0, k - context_steps), k)]
            arrivals = [r.id for r in sc.requests if r.arrival_step == k]
            return Divergence(sc.name, k, diff, len(fleet), len(vllm), ctx, arrivals)
    return None


@dataclass
class ParityResult:
    scenario: ParityScenario
    fleetsim: list[StepRecord]
    vllm: VllmRun
    divergence: Divergence | None

    @property
    def ok(self) -> bool:
        return self.divergence is None

    def summary(self) -> str:
        if self.ok:
            n_pre = sum(len(r["preempted"]) for r in self.fleetsim)
            hits = sum(r["prefix_hits"] for r in self.fleetsim)
            return (f"{self.scenario.name}: identical over {len(self.fleetsim)} steps "
                    f"({len(self.scenario.requests)} requests, {n_pre} preemptions, "
                    f"{hits} prefix-hit tokens)")
        return self.divergence.report()


def compare(scenarios: Iterable[ParityScenario], python: str | Path | None = None) -> list[ParityResult]:
    """Run every scenario on both engines (vLLM in one subprocess) and diff them."""
    scenarios = list(scenarios)
    runs = run_vllm(scenarios, python=python)
    out = []
    for sc in scenarios:
        fleet = run_fleetsim(sc)
        out.append(ParityResult(sc, fleet, runs[sc.name], first_divergence(sc, fleet, runs[sc.name].steps)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from validation.parity.scenarios import SCENARIOS

    ap = argparse.ArgumentParser(prog="python -m validation.parity.compare",
                                 description="fleetsim vs vLLM scheduler parity, step by step")
    ap.add_argument("names", nargs="*", help=f"scenarios (default: all): {', '.join(SCENARIOS)}")
    ap.add_argument("--json", action="store_true", help="one JSON object per scenario")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in SCENARIOS]
    if unknown:
        print(f"error: unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    names = args.names or list(SCENARIOS)
    t0 = time.time()
    try:
        results = compare([SCENARIOS[n]() for n in names])
    except FleetsimError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for res in results:
        if args.json:
            d = res.divergence
            print(json.dumps({"scenario": res.scenario.name, "ok": res.ok, "steps": len(res.fleetsim),
                              "vllm_version": res.vllm.config.get("vllm_version"),
                              "divergence": None if d is None else {
                                  "step": d.step, "fields": {k: list(v) for k, v in d.fields.items()}}}))
        else:
            print(("OK   " if res.ok else "DIFF ") + res.summary())
    if not args.json:
        print(f"{sum(r.ok for r in results)}/{len(results)} scenarios identical "
              f"({time.time() - t0:.0f} s)")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
