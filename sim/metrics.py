"""Metrics: the per-request table, the sampled time series, and the run summary.

- Per request: one row per request whatever its fate (completed, rejected, failed), so the table
  is the conservation ledger of the run.
- Time series: gauges sampled every ``sample_interval_s`` of simulated time, per replica and for
  the cluster, named after vLLM's Prometheus metrics where one exists.
- Inter-token latencies are kept in a log-bucketed histogram (0.5% relative resolution) rather
  than one float per token, so memory does not grow with output length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

REQUEST_COLUMNS = [
    "request_id", "arrival_s", "replica", "prompt_tokens", "cached_tokens", "output_tokens",
    "queue_s", "ttft_s", "tpot_s", "e2e_s", "finish_s", "preemptions", "retries", "status", "reason",
    "session_id", "tenant", "priority",
]

# Status values of a request's single ending.
COMPLETED, REJECTED, FAILED = "completed", "rejected", "failed"


class LogHistogram:
    """Histogram with geometric buckets: ``bucket = floor(log(x / lo) / log(1 + rel))``."""

    def __init__(self, lo: float = 1e-6, hi: float = 1e4, rel: float = 0.005):
        self.lo = lo
        self.log_base = math.log1p(rel)
        self.n_buckets = int(math.ceil(math.log(hi / lo) / self.log_base)) + 2
        self.counts = np.zeros(self.n_buckets, dtype=np.int64)
        self.total = 0
        self.sum = 0.0

    def add(self, x: float, count: int = 1) -> None:
        if x <= self.lo:
            b = 0
        else:
            b = min(int(math.log(x / self.lo) / self.log_base) + 1, self.n_buckets - 1)
        self.counts[b] += count
        self.total += count
        self.sum += x * count

    def quantile(self, q: float) -> float:
        if self.total == 0:
            return float("nan")
        target = q * self.total
        cum = np.cumsum(self.counts)
        b = int(np.searchsorted(cum, target, side="left"))
        if b == 0:
            return self.lo
        # geometric midpoint of the bucket
        return self.lo * math.exp((b - 0.5) * self.log_base)

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else float("nan")


@dataclass
class SLO:
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def summarize(requests: pd.DataFrame, itl: LogHistogram, *, duration_s: float, gpu_hours: float,
              cost_usd: float, prefix_queries: int, prefix_hits: int, preemptions: int,
              slo: SLO | None, sim_wall_s: float, extra: dict | None = None) -> dict:
    """The run's headline numbers (the ``--json`` contract of ``fleetsim run``)."""
    ok = requests[requests["status"] == COMPLETED]
    ttft = ok["ttft_s"].to_numpy(dtype=float)
    tpot = ok["tpot_s"].dropna().to_numpy(dtype=float)
    e2e = ok["e2e_s"].to_numpy(dtype=float)
    queue = ok["queue_s"].to_numpy(dtype=float)
    out_tokens = int(ok["output_tokens"].sum())
    s: dict = {
        "requests_total": int(len(requests)),
        "requests_completed": int(len(ok)),
        "requests_failed": int((requests["status"] == FAILED).sum()),
        "requests_rejected": int((requests["status"] == REJECTED).sum()),
        "duration_s": duration_s,
    }
    for name, arr in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e), ("queue", queue)):
        s[f"{name}_mean_s"] = float(arr.mean()) if len(arr) else float("nan")
        for q in (50, 90, 99):
            s[f"{name}_p{q}_s"] = _pct(arr, q)
    s["itl_mean_s"] = itl.mean
    for q in (50, 90, 99):
        s[f"itl_p{q}_s"] = itl.quantile(q / 100)
    s["throughput_req_s"] = len(ok) / duration_s if duration_s > 0 else float("nan")
    s["throughput_output_tok_s"] = out_tokens / duration_s if duration_s > 0 else float("nan")
    if slo is not None and len(requests):
        good = requests["status"] == COMPLETED
        if slo.ttft_s is not None:
            good &= requests["ttft_s"] <= slo.ttft_s
        if slo.tpot_s is not None:
            good &= requests["tpot_s"].fillna(0.0) <= slo.tpot_s
        if slo.e2e_s is not None:
            good &= requests["e2e_s"] <= slo.e2e_s
        s["slo_attainment"] = float(good.sum() / len(requests))
        s["goodput_req_s"] = float(good.sum() / duration_s) if duration_s > 0 else float("nan")
    s["prefix_hit_rate"] = prefix_hits / prefix_queries if prefix_queries else 0.0
    s["preemptions"] = int(preemptions)
    s["gpu_hours"] = gpu_hours
    s["cost_usd"] = cost_usd
    s["cost_per_million_output_tokens_usd"] = cost_usd / out_tokens * 1e6 if out_tokens else float("nan")
    if extra:
        s.update(extra)
    s["sim_wall_s"] = sim_wall_s
    return s


@dataclass
class TimeSeries:
    """Rows of sampled gauges; turned into a DataFrame at the end of the run."""

    rows: list[tuple] = field(default_factory=list)
    COLUMNS = (
        "time_s", "replica", "state", "vllm:num_requests_running", "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc", "prefix_cache_hit_rate", "vllm:num_preemptions_total",
        "vllm:generation_tokens_total", "in_flight",
    )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=list(self.COLUMNS))
