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
from dataclasses import dataclass

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
        # A Python list: bumped once per decode run or step in the hot loop, where a list item
        # costs a fraction of a numpy scalar update.
        self.counts: list[int] = [0] * self.n_buckets
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
    """The run's headline numbers (the ``--json`` contract of ``fleetsim run``).

    Works on the columns it needs as numpy arrays and a boolean mask of completed requests, never a
    filtered copy of the whole table (which, with its string columns, costs more than the rest of
    the summary for a million requests).
    """
    n = len(requests)
    status = requests["status"]
    done = (status == COMPLETED).to_numpy(dtype=bool)
    n_done = int(done.sum())

    def completed(col: str) -> np.ndarray:
        return requests[col].to_numpy(dtype=float)[done]

    ttft = completed("ttft_s")
    tpot = completed("tpot_s")
    tpot = tpot[~np.isnan(tpot)]
    e2e = completed("e2e_s")
    queue = completed("queue_s")
    out_tokens = int(requests["output_tokens"].to_numpy()[done].sum())
    s: dict = {
        "requests_total": int(n),
        "requests_completed": n_done,
        "requests_failed": int((status == FAILED).sum()),
        "requests_rejected": int((status == REJECTED).sum()),
        "duration_s": duration_s,
    }
    for name, arr in (("ttft", ttft), ("tpot", tpot), ("e2e", e2e), ("queue", queue)):
        s[f"{name}_mean_s"] = float(arr.mean()) if len(arr) else float("nan")
        for q in (50, 90, 99):
            s[f"{name}_p{q}_s"] = _pct(arr, q)
    s["itl_mean_s"] = itl.mean
    for q in (50, 90, 99):
        s[f"itl_p{q}_s"] = itl.quantile(q / 100)
    s["throughput_req_s"] = n_done / duration_s if duration_s > 0 else float("nan")
    s["throughput_output_tok_s"] = out_tokens / duration_s if duration_s > 0 else float("nan")
    if slo is not None and n:
        good = done.copy()
        if slo.ttft_s is not None:
            good &= requests["ttft_s"].to_numpy(dtype=float) <= slo.ttft_s
        if slo.tpot_s is not None:
            tp = requests["tpot_s"].to_numpy(dtype=float)
            good &= np.where(np.isnan(tp), 0.0, tp) <= slo.tpot_s
        if slo.e2e_s is not None:
            good &= requests["e2e_s"].to_numpy(dtype=float) <= slo.e2e_s
        s["slo_attainment"] = float(good.sum() / n)
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


class TimeSeries:
    """Sampled gauges, kept by column; turned into a DataFrame at the end of the run.

    Why columnar: a day-long run samples ~10^5 ticks x (replicas + 1) rows. One Python tuple per
    row cost hundreds of MB for 2.4M rows (1M requests on 16 replicas) and its conversion to a
    DataFrame (object arrays, one value at a time) ~1.7 us per row. Here a row's values are added to
    two flat Python lists (integers and floats; the cheapest append CPython has), moved into numpy
    chunks every ``FLUSH`` values so few Python objects are ever alive, and the state strings are
    codes into a small label table. The time of a tick is stored once per tick, not per row.

    The DataFrame is exactly what ``pd.DataFrame(rows, columns=COLUMNS)`` gave for the same rows:
    same columns, values, order and dtypes (``state`` gets the dtype pandas infers for strings).
    """

    COLUMNS = (
        "time_s", "replica", "state", "vllm:num_requests_running", "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc", "prefix_cache_hit_rate", "vllm:num_preemptions_total",
        "vllm:generation_tokens_total", "in_flight",
    )
    # A row's values in ``ints`` (``state`` as a label code) and in ``floats``, in this order.
    INT_COLUMNS = ("replica", "state", "vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:num_preemptions_total", "vllm:generation_tokens_total", "in_flight")
    FLOAT_COLUMNS = ("vllm:kv_cache_usage_perc", "prefix_cache_hit_rate")
    FLUSH = 1 << 16  # values held as Python objects before they move to numpy

    def __init__(self) -> None:
        self.ints: list[int] = []  # len(INT_COLUMNS) values per row, appended by the sampler
        self.floats: list[float] = []  # len(FLOAT_COLUMNS) values per row
        self.labels: list[str] = []  # state code -> label
        self.label_codes: dict[str, int] = {}  # label -> state code
        self._times: list[float] = []  # one per tick
        self._rows: list[int] = []  # rows per tick
        self._int_chunks: list[np.ndarray] = []
        self._float_chunks: list[np.ndarray] = []

    def code(self, label: str) -> int:
        """The state code of ``label`` (registered on first use)."""
        c = self.label_codes.get(label)
        if c is None:
            c = self.label_codes[label] = len(self.labels)
            self.labels.append(label)
        return c

    def end_tick(self, t: float, rows: int) -> None:
        """Close a tick whose ``rows`` rows were appended to ``ints``/``floats`` at time ``t``."""
        self._times.append(t)
        self._rows.append(rows)
        if len(self.ints) >= self.FLUSH:
            self._flush()

    def _flush(self) -> None:
        if self.ints:
            self._int_chunks.append(np.array(self.ints, dtype=np.int64))
            self.ints.clear()
        if self.floats:
            self._float_chunks.append(np.array(self.floats, dtype=np.float64))
            self.floats.clear()

    def __len__(self) -> int:
        return sum(self._rows)

    @staticmethod
    def _joined(chunks: list[np.ndarray], dtype) -> np.ndarray:
        if len(chunks) != 1:  # join once and keep the result, so memory is held once
            chunks[:] = [np.concatenate(chunks) if chunks else np.empty(0, dtype=dtype)]
        return chunks[0]

    def frame(self) -> pd.DataFrame:
        if not self._times:
            return pd.DataFrame([], columns=list(self.COLUMNS))
        self._flush()
        ints = self._joined(self._int_chunks, np.int64).reshape(-1, len(self.INT_COLUMNS))
        floats = self._joined(self._float_chunks, np.float64).reshape(-1, len(self.FLOAT_COLUMNS))
        cols: dict = {"time_s": np.repeat(np.array(self._times, dtype=np.float64), self._rows)}
        for k, name in enumerate(self.INT_COLUMNS):
            cols[name] = ints[:, k]
        for k, name in enumerate(self.FLOAT_COLUMNS):
            cols[name] = floats[:, k]
        cols["state"] = labelled_column(self.labels, ints[:, 1])
        return pd.DataFrame(cols, columns=list(self.COLUMNS))


def labelled_column(labels: list, codes: np.ndarray):
    """The column ``[labels[c] for c in codes]`` as pandas would infer it, without n Python objects.

    Why: pandas infers a column of Python strings element by element (and, since pandas 3, copies
    them into an Arrow string array); taking from the inferred label array is a vectorised gather.
    The dtype is the same as inferring the whole column provided the labels are strings or None and
    either every label is used or all are strings (pandas 3: strings, with or without None -> str,
    None as NaN; None alone -> object. pandas 2: object).
    """
    return pd.Series(labels, dtype=None if labels else object).array.take(np.asarray(codes, dtype=np.intp))
