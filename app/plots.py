"""One-line plots of simulation results, shared by the Streamlit explorer and notebooks.

Every function takes one :class:`sim.Result` or a mapping ``{label: Result}`` (runs to overlay, in
order; the first is the baseline) and returns a :class:`plotly.graph_objects.Figure`.

Why plotly: latency CDFs and time series of a busy fleet have tens of thousands of points, and the
interesting part is often a corner (the p99 tail, a burst at minute 12): plotly figures are
interactive (hover, zoom, toggle a run in the legend) in Streamlit *and* in Jupyter with the same
code, and have no row limit (Altair refuses more than 5,000 rows by default). Figures are kept
light anyway: CDFs are drawn from ~400 quantiles, not every request.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Union

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:  # pragma: no cover
    from sim.api import Result

Runs = Union["Result", Mapping[str, "Result"]]

# Colour-blind-safe qualitative palette (Okabe-Ito), baseline first.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
TEMPLATE = "plotly_white"

LATENCIES = {"ttft_s": "TTFT", "tpot_s": "TPOT", "e2e_s": "E2E latency"}


def as_runs(runs: Runs) -> dict[str, "Result"]:
    """Normalize one Result or a mapping into an ordered ``{label: Result}`` dict."""
    if hasattr(runs, "requests") and hasattr(runs, "summary"):
        return {getattr(runs.scenario, "name", "run") or "run": runs}  # type: ignore[union-attr]
    return dict(runs)  # type: ignore[arg-type]


def color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _style(fig: go.Figure, height: int, title: str | None = None, *, legend: bool = True) -> go.Figure:
    """House style: white template, compact margins, a horizontal legend above the subplot titles."""
    top = (50 if title else 30) + (34 if legend else 0)
    bottom = 10
    area = max(1, height - top - bottom)
    fig.update_layout(
        template=TEMPLATE, height=height, title=title, margin=dict(l=10, r=10, t=top, b=bottom),
        showlegend=legend,
        legend=dict(orientation="h", yanchor="bottom", y=1 + 30 / area, xanchor="left", x=0),
        hovermode="x unified", font=dict(size=13),
    )
    return fig


def cdf_points(values: np.ndarray, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """(x, F(x)) of the empirical CDF at ``n`` quantiles (exact for small samples).

    Why quantiles: an exact CDF of 20k requests is 20k points per curve per run; 400 quantiles are
    visually identical and keep the page fast.
    """
    v = np.sort(values[np.isfinite(values)])
    if len(v) == 0:
        return np.array([]), np.array([])
    if len(v) <= n:
        return v, np.arange(1, len(v) + 1) / len(v)
    q = np.linspace(0.0, 1.0, n)
    return np.quantile(v, q), q


def latency_cdfs(runs: Runs, slo: Mapping[str, float | None] | None = None, *, log_x: bool = True,
                 metrics: Mapping[str, str] = LATENCIES) -> go.Figure:
    """TTFT, TPOT and E2E CDFs side by side, one curve per run, SLOs as dashed lines.

    ``slo`` maps ``ttft_s``/``tpot_s``/``e2e_s`` to seconds (the scenario's ``slo`` section).
    Only completed requests are plotted (rejected/failed ones have no latency).
    """
    rs = as_runs(runs)
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[f"{t} CDF" for t in metrics.values()],
                        horizontal_spacing=0.06)
    for col, metric in enumerate(metrics, start=1):
        for i, (label, r) in enumerate(rs.items()):
            req = r.requests
            ok = req[req["status"] == "completed"] if "status" in req else req
            x, y = cdf_points(ok[metric].to_numpy(dtype=float))
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=label, legendgroup=label,
                                     showlegend=col == 1, line=dict(color=color(i), width=2),
                                     hovertemplate=f"{label}<br>%{{x:.3g}} s: %{{y:.1%}}<extra></extra>"),
                          row=1, col=col)
        limit = (slo or {}).get(metric)
        if limit:
            fig.add_vline(x=limit, line=dict(color="#B22222", dash="dash", width=1.5), row=1, col=col,
                          annotation_text="SLO", annotation_position="top left")
        fig.update_xaxes(title_text="seconds", type="log" if log_x else "linear", row=1, col=col)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%", row=1, col=1, title_text="fraction of requests")
    for col in range(2, len(metrics) + 1):
        fig.update_yaxes(range=[0, 1.02], tickformat=".0%", row=1, col=col)
    _style(fig, 380, legend=len(rs) > 1)
    fig.update_layout(hovermode="closest")
    return fig


def replica_counts(r: "Result") -> pd.DataFrame:
    """Replicas per sample time by state (columns: starting, serving, draining, ...), from the
    per-replica rows of the time series."""
    ts = r.timeseries
    per = ts[ts["replica"] >= 0]
    if per.empty:
        return pd.DataFrame(index=pd.Index(sorted(ts["time_s"].unique()), name="time_s"))
    counts = per.groupby(["time_s", "state"]).size().unstack("state", fill_value=0)
    times = pd.Index(sorted(ts["time_s"].unique()), name="time_s")
    return counts.reindex(times, fill_value=0)


def usd_per_replica_hour(r: "Result") -> float:
    """Price of one replica-hour (all its GPUs), from the run's own cost accounting."""
    s = r.summary
    gpu_hours, cost = s.get("gpu_hours") or 0.0, s.get("cost_usd") or 0.0
    per_gpu = cost / gpu_hours if gpu_hours else 0.0
    return per_gpu * float(s.get("tensor_parallel") or 1)


def cost_series(r: "Result") -> pd.Series:
    """Cumulative cost in USD over simulated time: every replica that exists (starting, serving
    or draining) is billed, as in the run's ``cost_usd``."""
    counts = replica_counts(r)
    billed = counts.drop(columns=[c for c in ("stopped", "failed") if c in counts.columns]).sum(axis=1)
    t = billed.index.to_numpy(dtype=float)
    dt = np.diff(t, append=t[-1] + (t[-1] - t[-2] if len(t) > 1 else 1.0)) if len(t) else t
    return pd.Series(np.cumsum(billed.to_numpy() * dt) / 3600.0 * usd_per_replica_hour(r), index=billed.index,
                     name="cost_usd")


def cluster_frame(r: "Result") -> pd.DataFrame:
    """The cluster-level time series the explorer plots, one row per sample time."""
    ts = r.timeseries
    c = ts[ts["replica"] == -1].set_index("time_s")
    counts = replica_counts(r)
    active = counts[[s for s in ("serving", "starting") if s in counts.columns]].sum(axis=1)
    return pd.DataFrame({
        "queue depth (waiting)": c["vllm:num_requests_waiting"],
        "running requests": c["vllm:num_requests_running"],
        "KV cache usage (mean)": c["vllm:kv_cache_usage_perc"],
        "replicas (serving + starting)": active.reindex(c.index, fill_value=0),
        "cumulative cost (USD)": cost_series(r).reindex(c.index).ffill(),
    })


def cluster_timeseries(runs: Runs, *, height: int = 720) -> go.Figure:
    """Queue depth, running requests, KV usage, replicas and cumulative cost over simulated time."""
    rs = as_runs(runs)
    frames = {label: cluster_frame(r) for label, r in rs.items()}
    panels = list(next(iter(frames.values())).columns) if frames else []
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=panels,
                        vertical_spacing=0.05)
    for i, (label, f) in enumerate(frames.items()):
        for row, col in enumerate(panels, start=1):
            shape = "hv" if col.startswith("replicas") else "linear"
            fig.add_trace(go.Scatter(x=f.index, y=f[col], mode="lines", name=label, legendgroup=label,
                                     showlegend=row == 1, line=dict(color=color(i), width=1.6, shape=shape)),
                          row=row, col=1)
    for row, col in enumerate(panels, start=1):
        if col.startswith("KV"):
            fig.update_yaxes(tickformat=".0%", rangemode="tozero", row=row, col=1)
        else:
            fig.update_yaxes(rangemode="tozero", row=row, col=1)
    fig.update_xaxes(title_text="simulated time (s)", row=len(panels), col=1)
    return _style(fig, height, legend=len(rs) > 1)


def replica_table(r: "Result") -> pd.DataFrame:
    """Per replica: requests served, tokens, prefix hit rate (cached / prompt tokens) and
    latency percentiles, from the per-request table."""
    req = r.requests
    routed = req[req["replica"] >= 0]
    if routed.empty:
        return pd.DataFrame(columns=["requests", "prompt_tokens", "cached_tokens", "output_tokens",
                                     "prefix_hit_rate", "ttft_p99_s", "e2e_p99_s"])
    g = routed.groupby("replica")
    out = pd.DataFrame({
        "requests": g.size(),
        "prompt_tokens": g["prompt_tokens"].sum(),
        "cached_tokens": g["cached_tokens"].sum(),
        "output_tokens": g["output_tokens"].sum(),
    })
    out["prefix_hit_rate"] = out["cached_tokens"] / out["prompt_tokens"].where(out["prompt_tokens"] > 0)
    out["ttft_p99_s"] = g["ttft_s"].quantile(0.99)
    out["e2e_p99_s"] = g["e2e_s"].quantile(0.99)
    out.index.name = "replica"
    return out


def replica_load(r: "Result") -> go.Figure:
    """Requests and output tokens per replica, and each replica's prefix-cache hit rate."""
    t = replica_table(r)
    fig = make_subplots(rows=1, cols=3, subplot_titles=["requests per replica", "output tokens per replica",
                                                         "prefix hit rate per replica"],
                        horizontal_spacing=0.07)
    x = [f"r{i}" for i in t.index]
    fig.add_trace(go.Bar(x=x, y=t["requests"], marker_color=color(0), name="requests"), row=1, col=1)
    fig.add_trace(go.Bar(x=x, y=t["output_tokens"], marker_color=color(2), name="output tokens"), row=1, col=2)
    fig.add_trace(go.Bar(x=x, y=t["prefix_hit_rate"], marker_color=color(1), name="hit rate"), row=1, col=3)
    if len(t):
        mean = t["requests"].mean()
        fig.add_hline(y=mean, line=dict(color="#555", dash="dot"), row=1, col=1, annotation_text="mean")
    fig.update_yaxes(tickformat=".0%", range=[0, 1], row=1, col=3)
    _style(fig, 320, legend=False)
    fig.update_layout(hovermode="closest")
    return fig


def replica_heatmap(r: "Result", column: str = "in_flight", *, title: str | None = None) -> go.Figure:
    """One row per replica, colour = ``column`` over time: where load went and when."""
    ts = r.timeseries
    per = ts[ts["replica"] >= 0]
    z = per.pivot_table(index="replica", columns="time_s", values=column, aggfunc="mean")
    fig = go.Figure(go.Heatmap(z=z.to_numpy(), x=z.columns.to_numpy(), y=[f"r{i}" for i in z.index],
                               colorscale="Blues", colorbar=dict(title=column.split(":")[-1]),
                               hovertemplate="t=%{x}s %{y}: %{z}<extra></extra>"))
    fig.update_xaxes(title_text="simulated time (s)")
    _style(fig, max(220, 90 + 22 * len(z)), title or f"{column} per replica", legend=False)
    fig.update_layout(hovermode="closest")
    return fig


def metric_bars(table: pd.DataFrame, metric: str, *, title: str | None = None) -> go.Figure:
    """One bar per row of a comparison table (index = run label) for one summary column."""
    labels = [str(i) for i in table.index]
    # "#3 router.policy=least-kv" -> tick "#3" (the full label is in the hover and the table)
    ticks = [lab.split(" ", 1)[0] if lab.startswith("#") else lab for lab in labels]
    fig = go.Figure(go.Bar(x=ticks, y=table[metric], customdata=labels,
                           marker_color=[color(i) for i in range(len(table))],
                           hovertemplate="%{customdata}<br>%{y:.4g}<extra></extra>"))
    _style(fig, 300, title or metric, legend=False)
    fig.update_layout(hovermode="closest")
    return fig


def capacity_curve(points: pd.DataFrame, x: str, y: str, *, limit: float | None = None,
                   title: str | None = None) -> go.Figure:
    """The tried points of a capacity search: ``y`` (e.g. TTFT p99) against ``x`` (e.g. replicas),
    coloured by whether they met the SLOs."""
    pts = points.sort_values(x)
    colors = np.where(pts["meets_slo"], "#009E73", "#D55E00")
    fig = go.Figure(go.Scatter(x=pts[x], y=pts[y], mode="lines+markers", marker=dict(size=11, color=colors),
                               line=dict(color="#999", width=1), name=y,
                               hovertemplate=f"{x}=%{{x}}<br>{y}=%{{y:.3g}}<extra></extra>"))
    if limit:
        fig.add_hline(y=limit, line=dict(color="#B22222", dash="dash"), annotation_text="SLO")
    names = {"cluster.replicas": "replicas", "workload.rate_scale": "load (x the workload's rate)"}
    fig.update_xaxes(title_text=names.get(x, x), tickvals=pts[x].tolist(),
                     type="log" if x == "workload.rate_scale" else "linear")
    metric, _, pct = y.removesuffix("_s").rpartition("_")
    fig.update_yaxes(title_text=f"{metric.upper()} {pct} (s)" if metric else y, type="log")
    _style(fig, 340, title, legend=False)
    fig.update_layout(hovermode="closest")
    return fig
