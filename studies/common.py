"""Shared machinery of the studies: a grid of simulation cases, run serially or in worker
processes, tabulated as pandas rows and markdown.

A :class:`Case` is a scenario dict plus the labels it gets in the tables (workload, load, policy).
Cases are independent simulations with their own seeds, so running them in parallel
(``--jobs``) gives exactly the same numbers as running them one after the other.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd

# Summary keys every study row carries (see sim.metrics.summarize and Cluster._collect).
SUMMARY_KEYS = (
    "requests_total", "requests_completed", "requests_rejected", "requests_failed",
    "ttft_p50_s", "ttft_p99_s", "ttft_mean_s", "tpot_p50_s", "tpot_p99_s", "e2e_p50_s", "e2e_p99_s",
    "queue_p99_s", "prefix_hit_rate", "load_imbalance", "preemptions", "gpu_hours", "cost_usd",
    "replicas_mean", "replicas_max", "replicas_started", "slo_attainment", "throughput_req_s",
    "duration_s", "num_gpu_blocks", "sim_wall_s",
)


@dataclass(frozen=True)
class Case:
    """One simulation of a study.

    Attributes:
        labels: the columns that identify the case in tables, e.g. ``{"workload": "mooncake",
            "load": 1.0, "router": "round-robin"}`` (kept in this order).
        scenario: a scenario dict for :func:`sim.run` (validated there).
        keep_series: also return the cluster-level time series (``replica == -1`` rows), e.g. for
            replicas-over-time plots. Off by default: per-replica series are large.
    """

    labels: dict[str, Any]
    scenario: dict[str, Any]
    keep_series: bool = False


@dataclass
class CaseResult:
    row: dict[str, Any]
    series: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def run_case(case: Case, post: Callable[[Any], dict[str, Any]] | None = None) -> CaseResult:
    """Simulate one case; ``post(result)`` may add study-specific columns computed from the Result."""
    import sim

    res = sim.run(case.scenario)
    s = res.summary
    row: dict[str, Any] = dict(case.labels)
    for k in SUMMARY_KEYS:
        v = s.get(k)
        row[k] = float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v
    if post is not None:
        row.update(post(res))
    series = None
    if case.keep_series:
        ts = res.timeseries
        series = ts[ts["replica"] == -1].copy()
        series["replicas"] = series["state"].str.removeprefix("replicas=").astype(int)
        for k, v in case.labels.items():
            series[k] = v
    return CaseResult(row, series)


def run_cases(cases: Sequence[Case], *, jobs: int = 1, post: Callable[[Any], dict[str, Any]] | None = None,
              log: Callable[[str], None] | None = None) -> list[CaseResult]:
    """Run every case (in ``jobs`` worker processes if > 1); results come back in case order.

    ``post`` must be a module-level function when ``jobs > 1`` (it is pickled to the workers).
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out: list[CaseResult | None] = [None] * len(cases)
    t0 = time.perf_counter()

    def done(i: int, r: CaseResult) -> None:
        out[i] = r
        n = sum(x is not None for x in out)
        label = " ".join(f"{v}" for v in cases[i].labels.values())
        log(f"[{n}/{len(cases)}] {label}: sim {r.row['sim_wall_s']:.1f}s (total {time.perf_counter() - t0:.0f}s)")

    if jobs <= 1:
        for i, c in enumerate(cases):
            done(i, run_case(c, post))
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futs = {pool.submit(run_case, c, post): i for i, c in enumerate(cases)}
            for f in as_completed(futs):
                done(futs[f], f.result())
    return [r for r in out if r is not None]


def rows_frame(results: Iterable[CaseResult]) -> pd.DataFrame:
    return pd.DataFrame([r.row for r in results])


def fmt_value(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return "—"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def markdown_table(df: pd.DataFrame, columns: Sequence[tuple[str, str, str]]) -> str:
    """A markdown table of ``df`` with ``columns`` = [(column, header, format spec)]."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    align = "|" + "|".join("---" if f == "" else "---:" for _, _, f in columns) + "|"
    lines = [head, align]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt_value(r.get(c), f) if f else str(r.get(c)) for c, _, f in columns) + " |")
    return "\n".join(lines)


def parse_args(name: str, description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m studies.{name}", description=description)
    p.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run of the whole study)")
    p.add_argument("--out", type=Path, default=Path("out") / name, help="output directory (CSV, PNG, markdown)")
    p.add_argument("--jobs", type=int, default=1,
                   help="simulations in parallel (worker processes); results do not depend on it")
    a = p.parse_args(argv)
    if a.jobs < 1:
        p.error("--jobs must be >= 1")
    a.jobs = min(a.jobs, os.cpu_count() or 1)
    return a


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def matplotlib_pyplot():
    """``matplotlib.pyplot`` with a file-only backend (studies run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
