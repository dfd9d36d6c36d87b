"""Autoscaling study: HPA, KPA, Ray Serve and the saturation autoscaler against fixed fleets.

    python -m studies.autoscaling_study [--quick] [--out DIR] [--jobs N]

Workloads, each served by llama-3.1-8b on L40S replicas (one GPU each, $1.861/h). Why L40S: on
H100s the Azure code trace needs 1 to 3 replicas, too coarse a range to compare autoscalers.

- ``azure-code``: the Azure 2023 code trace, all 8819 requests over 57 minutes. Per-minute counts
  swing between 0 and 632 and 10-second bursts reach 33 req/s (inter-arrival CV 13).
- ``azure-code-new-node`` (full mode only): the same with the ``new-node`` cold start (a node is
  provisioned: 220-750 s) instead of ``warm`` (26-75 s).
- ``servegen-diurnal`` (full mode only): day 2 of ServeGen's m-small language curve (hourly rate
  0.43x to 1.82x of the day's mean), compressed 48x into 30 minutes (~34k requests), with Azure
  conversation prompt/output lengths.

Policies, all between 1 and 16 replicas and starting from the fixed-mean size; the target-based
ones aim at the workload's ``target`` requests in flight per replica, near what one replica of the
smallest SLO-meeting fixed fleet carries (4 for the prefill-heavy code trace, 64 for the
decode-heavy conversation lengths; the tables print the measured values):

- ``hpa``: ``metric: concurrency`` (running + waiting) at the target; Kubernetes defaults otherwise.
- ``kpa``: the target with ``target_utilization: 1.0`` (the same effective target); Knative
  defaults otherwise (60 s / 6 s windows, no scale-down delay). ``kpa (delay 300 s)`` adds
  ``scale_down_delay_s: 300``.
- ``ray-serve``: ``target_ongoing_requests`` = the target; Ray's 30 s / 600 s delays.
- ``saturation``: llm-d WVA defaults (KV 0.80 / queue 5, +1 per 60 s); it has no target.
- ``fixed-peak``: the smallest fixed fleet with SLO attainment >= 0.99, found by bisection between
  1 and an ample 16 replicas (the 16-replica run is reported as ``fixed-16``). ``fixed-mean``:
  fixed-peak scaled by mean / peak arrivals per minute, rounded up. No autoscaler.

Outputs in ``--out``: ``autoscaling.csv``, ``autoscaling.md`` (tables),
``autoscaling_series.csv`` (cluster time series of every run) and one
``autoscaling_<workload>.png`` per workload (arrivals per minute, and replicas over time per policy).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from studies.common import Case, markdown_table, matplotlib_pyplot, parse_args, rows_frame, run_cases, write_text

MODEL = "llama-3.1-8b"
GPU = "L40S"
MIN_REPLICAS, MAX_REPLICAS = 1, 16
SIZING_REPLICAS = 16
SLO = {"ttft_s": 2.0, "tpot_s": 0.2}
SLO_GOAL = 0.99  # fixed-peak = the smallest fixed fleet with at least this SLO attainment


def autoscalers(target: float) -> dict[str, dict[str, Any]]:
    """The autoscaler sections, all aiming at ``target`` requests in flight per replica."""
    return {
        "hpa": {"policy": "hpa", "metric": "concurrency", "target": target},
        "kpa": {"policy": "kpa", "target": target, "target_utilization": 1.0},
        "kpa (delay 300 s)": {"policy": "kpa", "target": target, "target_utilization": 1.0, "scale_down_delay_s": 300},
        "ray-serve": {"policy": "ray-serve", "target_ongoing_requests": target},
        "saturation": {"policy": "saturation"},
    }


@dataclass(frozen=True)
class ScalingWorkload:
    """One workload of the study.

    ``target``: requests in flight per replica for every target-based autoscaler and for the fixed-mean
    sizing; roughly the per-replica concurrency at which a fixed fleet meets the SLO (measured, see
    docs/policy-study.md). ``fixed_as``: a workload whose fixed-fleet rows hold for this one too
    (same requests; the cold start never touches a fixed fleet), so they are not re-run.
    """

    key: str
    title: str
    workload: dict[str, Any]
    cold_start: str | float
    target: float
    full_only: bool = False
    fixed_as: str | None = None


WORKLOADS: list[ScalingWorkload] = [
    ScalingWorkload("azure-code", "Azure 2023 code trace (57 min, very bursty), warm cold start (26-75 s)",
                    {"trace": "azure2023-code"}, "warm", target=4),
    ScalingWorkload("azure-code-new-node", "Azure 2023 code trace, new-node cold start (220-750 s)",
                    {"trace": "azure2023-code"}, "new-node", target=4, full_only=True, fixed_as="azure-code"),
    ScalingWorkload(
        "servegen-diurnal",
        "ServeGen m-small day 2 compressed 48x into 30 min (Azure conversation lengths), warm cold start",
        {"synthetic": {"arrival": "poisson", "rate_per_s": 24, "duration_s": 1800,
                       "rate_curve": {"servegen": "m-small", "speedup": 48, "start_s": 86400},
                       "prompt_tokens": {"dist": "trace", "trace": "azure2023-conv"},
                       "output_tokens": {"dist": "trace", "trace": "azure2023-conv"}}},
        "warm", target=64, full_only=True),
]


def _cluster(replicas: int, cold_start: str | float) -> dict[str, Any]:
    return {"replicas": replicas, "gpu": GPU, "model": MODEL, "engine": {"max_model_len": 16384},
            "cold_start_s": cold_start}


def _scenario(name: str, wl: ScalingWorkload, replicas: int, autoscaler: dict[str, Any] | None) -> dict[str, Any]:
    sc: dict[str, Any] = {
        "name": f"autoscaling-study {wl.key} {name}", "seed": 0, "workload": copy.deepcopy(wl.workload),
        "cluster": _cluster(replicas, wl.cold_start), "router": {"policy": "least-requests"}, "slo": dict(SLO),
    }
    if autoscaler is not None:
        sc["autoscaler"] = {**autoscaler, "min_replicas": MIN_REPLICAS, "max_replicas": MAX_REPLICAS}
    return sc


def fixed_case(wl: ScalingWorkload, n: int, label: str | None = None) -> Case:
    label = label or f"fixed-{n}"
    return Case({"workload": wl.key, "policy": label}, _scenario(label, wl, n, None), keep_series=True)


def mean_fleet(n_peak: int, per_minute: pd.Series) -> int:
    """fixed-mean size: the peak-sized fleet scaled by mean / peak arrivals per minute (rounded up)."""
    return max(1, math.ceil(n_peak * float(per_minute.mean()) / float(per_minute.max())))


def concurrency_columns(res: Any) -> dict[str, Any]:
    """Requests in the system per serving-or-starting replica: the mean over the run and the
    busiest minute (60-sample rolling mean). For the fixed-peak fleet this is the concurrency a
    replica sustains within the SLO, which is what the autoscalers' target should be near."""
    ts = res.timeseries
    cl = ts[ts["replica"] == -1].sort_values("time_s")
    replicas = cl["state"].str.removeprefix("replicas=").astype(float).clip(lower=1.0)
    per = cl["in_flight"].astype(float).to_numpy() / replicas.to_numpy()
    per = pd.Series(per)
    return {"inflight_per_replica_mean": float(per.mean()),
            "inflight_per_replica_peak_min": float(per.rolling(60, min_periods=1).mean().max())}


def smallest_fleet(wl: ScalingWorkload, lo: int, hi: int, known: dict[int, float],
                   log=None) -> tuple[int, dict[int, float]]:
    """The smallest fixed fleet in ``[lo, hi]`` with SLO attainment >= SLO_GOAL, by bisection.

    ``known`` maps fleet sizes already simulated to their attainment (it is extended). If even
    ``hi`` misses the goal, ``hi`` is returned (the caller reports its attainment).
    """
    def attainment(n: int) -> float:
        if n not in known:
            (r,) = run_cases([fixed_case(wl, n)], log=log, post=concurrency_columns)
            known[n] = float(r.row["slo_attainment"])
        return known[n]

    if attainment(hi) < SLO_GOAL:
        return hi, known
    while lo < hi:
        mid = (lo + hi) // 2
        if attainment(mid) >= SLO_GOAL:
            hi = mid
        else:
            lo = mid + 1
    return hi, known


def build_cases(quick: bool, sizing: tuple[int, int] | dict[str, tuple[int, int]],
                workloads: Sequence[ScalingWorkload] = WORKLOADS) -> list[Case]:
    """Every autoscaler of every workload, plus fixed-mean and fixed-peak fleets of the given
    ``sizing`` (one (mean, peak) pair for all workloads, or one per workload key)."""
    cases = []
    for wl in workloads:
        if quick and wl.full_only:
            continue
        n_mean, n_peak = sizing[wl.fixed_as or wl.key] if isinstance(sizing, dict) else sizing
        for name, a in autoscalers(wl.target).items():
            cases.append(Case({"workload": wl.key, "policy": name}, _scenario(name, wl, n_mean, a), keep_series=True))
        if wl.fixed_as is None:
            cases.append(fixed_case(wl, n_mean, f"fixed-mean ({n_mean})"))
            cases.append(fixed_case(wl, n_peak, f"fixed-peak ({n_peak})"))
    return cases


TABLE_COLUMNS = [
    ("policy", "policy", ""),
    ("slo_attainment", "SLO att.", ".3f"),
    ("ttft_p50_s", "TTFT p50 (s)", ".3f"),
    ("ttft_p99_s", "TTFT p99 (s)", ".2f"),
    ("e2e_p99_s", "E2E p99 (s)", ".1f"),
    ("replicas_mean", "replicas mean", ".2f"),
    ("replicas_max", "max", ".0f"),
    ("replicas_started", "started", ".0f"),
    ("gpu_hours", "GPU-h", ".2f"),
    ("cost_usd", "cost ($)", ".2f"),
    ("requests_rejected", "rejected", ".0f"),
    ("inflight_per_replica_mean", "in flight / replica", ".1f"),
    ("inflight_per_replica_peak_min", "busiest min", ".1f"),
]


def report(df: pd.DataFrame, workloads: Sequence[ScalingWorkload] = WORKLOADS) -> str:
    parts = []
    for wl in workloads:
        sub = df[df["workload"] == wl.key]
        if sub.empty:
            continue
        n = int(sub["requests_total"].iloc[0])
        slo = ", ".join(f"{k.removesuffix('_s')} <= {v:g} s" for k, v in SLO.items())
        fixed = (f" Fixed fleets: as for {wl.fixed_as} (a fixed fleet never pays a cold start)." if wl.fixed_as else "")
        parts.append(f"### {wl.title}\n\n{n} requests; {GPU} x llama-3.1-8b; SLO: {slo}; autoscalers between "
                     f"{MIN_REPLICAS} and {MAX_REPLICAS} replicas, target {wl.target:g} in flight per replica.{fixed} "
                     "replicas = serving + starting (sampled each second); started = replicas ever created "
                     "(initial ones included); in flight / replica = requests in the system per replica, mean and "
                     "busiest minute.\n\n" + markdown_table(sub, TABLE_COLUMNS))
    return "\n\n".join(parts) + "\n"


def plot(series: pd.DataFrame, requests_per_min: dict[str, pd.Series], out_dir: Path,
         workloads: Sequence[ScalingWorkload] = WORKLOADS) -> list[Path]:
    """Per workload: arrivals per minute on top, then one panel per policy with its replicas over
    time (serving + starting), all on the same axes; fixed-peak is drawn dashed in every panel."""
    plt = matplotlib_pyplot()
    paths = []
    for wl in workloads:
        sub = series[series["workload"] == wl.key]
        if sub.empty:
            continue
        policies = list(dict.fromkeys(sub["policy"]))
        peak_label = next((p for p in policies if str(p).startswith("fixed-peak")), None)
        peak = sub[sub["policy"] == peak_label].sort_values("time_s") if peak_label else None
        fig, axes = plt.subplots(len(policies) + 1, 1, figsize=(11, 1.35 * (len(policies) + 1) + 0.8), sharex=True)
        top = axes[0]
        rpm = requests_per_min.get(wl.key)
        if rpm is not None:
            top.bar(rpm.index.to_numpy(dtype=float), rpm.to_numpy(), width=1.0, align="edge", color="0.6")  # minutes
        top.set_ylabel("arrivals\n/ min", fontsize=8)
        top.set_title(wl.title, fontsize=10)
        ymax = max(int(sub["replicas"].max()), 1) + 1
        for ax, policy in zip(axes[1:], policies):
            g = sub[sub["policy"] == policy].sort_values("time_s")
            if peak is not None and policy != peak_label:
                ax.step(peak["time_s"] / 60.0, peak["replicas"], where="post", linestyle="--", color="0.5", linewidth=0.9)
            ax.step(g["time_s"] / 60.0, g["replicas"], where="post", linewidth=1.2)
            ax.set_ylim(0, ymax)
            ax.text(0.005, 0.93, str(policy), transform=ax.transAxes, fontsize=8, va="top",
                    bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})
            ax.set_ylabel("replicas", fontsize=8)
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        axes[-1].set_xlabel("time (min); dashed: fixed-peak fleet")
        fig.tight_layout()
        path = out_dir / f"autoscaling_{wl.key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def arrivals_per_minute(wl: ScalingWorkload) -> pd.Series:
    """Requests arriving in each minute of the workload (for the plot's top panel)."""
    from traces.config import WorkloadSpec, build_workload

    w = build_workload(WorkloadSpec.model_validate(wl.workload), seed=0)
    minute = (w.df["arrival_s"] // 60).astype(int)
    return minute.value_counts().sort_index().reindex(range(int(minute.max()) + 1), fill_value=0)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args("autoscaling_study", "Autoscalers vs fixed fleets on bursty and diurnal workloads.", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workloads = [wl for wl in WORKLOADS if not (args.quick and wl.full_only)]
    sized = [wl for wl in workloads if wl.fixed_as is None]
    # 1. Sizing: fixed-peak = the smallest fixed fleet meeting the SLO goal (bisection up to an ample
    #    fleet, which is also reported); fixed-mean = fixed-peak x mean/peak arrivals per minute.
    per_minute = {wl.key: arrivals_per_minute(wl) for wl in workloads}
    sizing_runs = run_cases([fixed_case(wl, SIZING_REPLICAS) for wl in sized], jobs=args.jobs, post=concurrency_columns)
    sizing: dict[str, tuple[int, int]] = {}
    for wl, r in zip(sized, sizing_runs):
        n_peak, known = smallest_fleet(wl, 1, SIZING_REPLICAS, {SIZING_REPLICAS: r.row["slo_attainment"]})
        n_mean = min(n_peak, mean_fleet(n_peak, per_minute[wl.key]))
        sizing[wl.key] = (n_mean, n_peak)
        tried = ", ".join(f"{n}: {a:.3f}" for n, a in sorted(known.items()))
        print(f"{wl.key}: fixed-peak {n_peak}, fixed-mean {n_mean} (SLO attainment by fleet size: {tried})")
    # 2. Every autoscaler and the two fixed fleets.
    results = run_cases(build_cases(args.quick, sizing, workloads), jobs=args.jobs, post=concurrency_columns)
    # Table order per workload: the autoscalers, the fixed fleets, then the sizing run.
    sizing_by_key = {wl.key: r for wl, r in zip(sized, sizing_runs)}
    ordered = []
    for wl in workloads:
        ordered += [r for r in results if r.row["workload"] == wl.key]
        if wl.key in sizing_by_key:
            ordered.append(sizing_by_key[wl.key])
    df = rows_frame(ordered)
    df.to_csv(args.out / "autoscaling.csv", index=False)
    series = pd.concat([r.series for r in ordered if r.series is not None], ignore_index=True)
    series.to_csv(args.out / "autoscaling_series.csv", index=False)
    text = report(df, workloads)
    write_text(args.out / "autoscaling.md", text)
    plot(series, per_minute, args.out, workloads)
    print(text)
    print(f"wrote {args.out / 'autoscaling.csv'}, autoscaling.md, autoscaling_series.csv and autoscaling_*.png "
          f"({len(df)} runs, {df['sim_wall_s'].sum():.0f} s of simulation)")
    return df


if __name__ == "__main__":
    main()
