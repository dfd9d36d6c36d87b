"""Routing study: every router on shared-prefix and multi-turn workloads, at two load levels.

    python -m studies.routing_study [--quick] [--out DIR] [--jobs N]

Workloads (each on llama-3.1-8b / H100-80GB replicas; why each cluster, in ``WorkloadCase.why``):

- ``mooncake``: the Kimi/Mooncake FAST'25 conversation trace (first 2000 requests; 12k-token mean
  prompts, 512-token prefix blocks), 8 replicas with an fp8 KV cache.
- ``chat-sessions``: synthetic multi-turn chat sessions (each turn's prompt = the previous prompt +
  answer + a new message) behind 16 Zipf-popular system prompts of 4 tenants, 4 replicas.
- ``lmbench``: the LMBench long-input multi-round QA trace (30 users with ~21k-token growing
  contexts, as measured by llm-d-benchmark on 2 replicas), 2 replicas.
- ``mooncake-bf16kv`` (full mode only): the mooncake case with half the KV cache (bf16), for three
  routers, to show how the cache size sets the gap between routers.

Load levels are ``workload.rate_scale`` (the same requests, time compressed). Outputs in ``--out``:
``routing.csv`` (one row per run, every summary key), ``routing.md`` (the tables) and
``routing_<workload>.png`` (hit rate and TTFT per router and load).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from studies.common import Case, markdown_table, matplotlib_pyplot, parse_args, rows_frame, run_cases, write_text

MODEL = "llama-3.1-8b"
GPU = "H100-80GB"

# (label, router section). ``sticky`` gets its key per workload (see WorkloadCase.sticky).
ROUTERS: list[tuple[str, dict[str, Any]]] = [
    ("round-robin", {"policy": "round-robin"}),
    ("random", {"policy": "random"}),
    ("least-requests", {"policy": "least-requests"}),
    ("least-kv", {"policy": "least-kv"}),
    ("power-of-two", {"policy": "power-of-two"}),
    ("sticky", {"policy": "sticky"}),
    ("prefix-aware approx", {"policy": "prefix-aware", "mode": "approximate"}),
    ("prefix-aware precise", {"policy": "prefix-aware", "mode": "precise"}),
    # A what-if on the default: ignore matches under 10% of the prompt (Ray Serve's
    # PrefixCacheAffinityRouter default match_rate_threshold), so a short shared system prompt alone
    # does not pull every request to the replicas that already saw it (see docs/policy-study.md).
    ("prefix-aware approx, min match 0.1", {"policy": "prefix-aware", "mode": "approximate", "min_match_ratio": 0.1}),
    ("hybrid seed", {"policy": "hybrid", "style": "seed"}),
    ("hybrid llm-d", {"policy": "hybrid", "style": "llm-d"}),
    ("hybrid sglang", {"policy": "hybrid", "style": "sglang"}),
    ("hybrid dynamo", {"policy": "hybrid", "style": "dynamo"}),
]


@dataclass(frozen=True)
class WorkloadCase:
    """One workload of the study and the cluster it runs on.

    ``sticky`` is the sticky router's affinity key: ``{"key": "session"}`` where the workload has
    session ids; a trace without sessions (Mooncake) can only be keyed on its prefix.
    """

    key: str
    title: str
    why: str
    workload: dict[str, Any]
    quick_workload: dict[str, Any]
    cluster: dict[str, Any]
    loads: tuple[float, ...]
    sticky: dict[str, Any]
    slo: dict[str, Any] = field(default_factory=lambda: {"ttft_s": 2.0})
    routers: tuple[str, ...] | None = None  # None = all of ROUTERS
    full_only: bool = False


def chat_sessions(duration_s: float) -> dict[str, Any]:
    """Synthetic multi-turn chat with shared system prompts (``workload.synthetic``).

    Sessions start at 0.5/s (Poisson) and last 8 turns on average (log-normal, CV 1, at most 40).
    Turn 1 is a tenant prefix (1000 tokens) + one of the tenant's 4 system prompts (1000-5000
    tokens) + a first message (log-normal, mean 4000 tokens: pasted documents or code). Each
    later turn appends the previous answer (mean 300 tokens) and a new message (mean 500), and
    arrives 20 s (exponential) after the previous one's estimated completion. Tenants and their
    prompts are Zipf-popular. About 100 sessions are active at once, ~10k tokens each: about
    1M tokens of live context against 456k tokens of KV cache per replica. Round-robin would
    need every session's context on every replica; an affinity router needs a quarter of it.
    """
    return {
        "synthetic": {
            "arrival": "poisson", "rate_per_s": 0.5, "duration_s": duration_s,
            "prompt_tokens": {"dist": "lognormal", "mean": 4000, "cv": 1.0, "max": 16000},
            "output_tokens": {"dist": "lognormal", "mean": 300, "cv": 1.0, "max": 2000},
            "sessions": {
                "turns": {"dist": "lognormal", "mean": 8, "cv": 1.0, "max": 40},
                "think_time_s": {"dist": "exponential", "mean": 20},
                "user_tokens": {"dist": "lognormal", "mean": 500, "cv": 1.0, "max": 4000},
            },
            "shared_prefix": {
                "tenants": 4, "prompts_per_tenant": 4, "tenant_prefix_tokens": 1000,
                "system_prompt_tokens": {"dist": "uniform", "min": 1000, "max": 5000},
                "tenant_popularity": "zipf", "prompt_popularity": "zipf",
            },
        }
    }


WORKLOADS: list[WorkloadCase] = [
    WorkloadCase(
        key="mooncake",
        title="Mooncake conversation trace (first 2000 requests), 8 x H100, llama-3.1-8b, fp8 KV cache",
        why=("Prompts average 12k tokens and every request shares the first 512-token block. With bf16 KV an "
             "H100 holds 456k tokens (about 38 prompts), and even all 8 caches together capture little reuse "
             "(an ideal single LRU of 8 x 456k tokens would hit ~16%). With an fp8 KV cache each replica holds "
             "912k tokens and the fleet 7.3M, where an ideal shared LRU hits ~24%. That is the regime where "
             "routing decides whether the fleet caches like one big cache or like eight copies of a small one."),
        workload={"trace": "mooncake-conversation", "max_requests": 2000},
        quick_workload={"trace": "mooncake-conversation", "max_requests": 500},
        cluster={"replicas": 8, "gpu": GPU, "model": MODEL, "kv_cache_dtype": "fp8"},
        loads=(1.0, 2.0),
        sticky={"key": "prefix", "prefix_blocks": 64},
    ),
    WorkloadCase(
        key="chat-sessions",
        title="Synthetic multi-turn chat sessions with shared system prompts, 4 x H100, llama-3.1-8b",
        why=("About 1M tokens of live session context against 456k tokens of KV per replica (bf16): it fits the "
             "fleet if each session stays on one replica, and cannot fit if every replica sees every session."),
        workload=chat_sessions(600.0),
        quick_workload=chat_sessions(200.0),
        cluster={"replicas": 4, "gpu": GPU, "model": MODEL},
        loads=(1.0, 3.0),
        sticky={"key": "session"},
        slo={"ttft_s": 1.0},
    ),
    WorkloadCase(
        key="lmbench",
        title="LMBench long-input multi-round QA (30 users, ~21k-token contexts), 2 x H100, llama-3.1-8b",
        why=("The setup llm-d-benchmark measured (2 replicas, Llama-3.1-8B). 30 contexts of ~22k tokens = 660k "
             "tokens: more than one replica's 456k-token cache, less than two."),
        workload={"trace": "lmbench-long-input"},
        quick_workload={"trace": "lmbench-long-input"},
        cluster={"replicas": 2, "gpu": GPU, "model": MODEL},
        loads=(1.0, 3.0),
        sticky={"key": "session"},
    ),
    WorkloadCase(
        key="mooncake-bf16kv",
        title="Mooncake as above with a bf16 KV cache (456k tokens per replica), load 1.0",
        why="Cache-size sensitivity: half the cache of the main mooncake case.",
        workload={"trace": "mooncake-conversation", "max_requests": 2000},
        quick_workload={"trace": "mooncake-conversation", "max_requests": 500},
        cluster={"replicas": 8, "gpu": GPU, "model": MODEL},
        loads=(1.0,),
        sticky={"key": "prefix", "prefix_blocks": 64},
        routers=("round-robin", "prefix-aware precise", "hybrid llm-d"),
        full_only=True,
    ),
]


def router_section(label: str, wl: WorkloadCase) -> dict[str, Any]:
    r = copy.deepcopy(dict(ROUTERS)[label])
    if r["policy"] == "sticky":
        r.update(wl.sticky)
    return r


def build_cases(quick: bool, workloads: Sequence[WorkloadCase] = WORKLOADS) -> list[Case]:
    cases = []
    for wl in workloads:
        if quick and wl.full_only:
            continue
        labels = wl.routers or tuple(name for name, _ in ROUTERS)
        for load in wl.loads:
            workload = copy.deepcopy(wl.quick_workload if quick else wl.workload)
            workload["rate_scale"] = load
            for label in labels:
                scenario = {
                    "name": f"routing-study {wl.key} x{load:g} {label}",
                    "seed": 0,
                    "workload": workload,
                    "cluster": copy.deepcopy(wl.cluster),
                    "router": router_section(label, wl),
                    "slo": dict(wl.slo),
                }
                cases.append(Case({"workload": wl.key, "load": load, "router": label}, scenario))
    return cases


def routing_columns(res: Any) -> dict[str, Any]:
    """Per-run columns from the request table: how many replicas got requests, the busiest one's
    share (herding shows here before it shows in latency), and the cost per 1000 requests that met
    the SLO (a fixed fleet's cost is set by the run's duration, so this is the fairer number)."""
    req = res.requests
    routed = req[req["replica"] >= 0]
    counts = routed["replica"].value_counts()
    s = res.summary
    good = s.get("slo_attainment", float("nan")) * s["requests_total"]
    return {
        "replicas_used": int((counts > 0).sum()),
        "max_replica_share": float(counts.max() / len(routed)) if len(routed) else float("nan"),
        "usd_per_1k_good": float(s["cost_usd"] / good * 1000) if good and good == good else float("nan"),
    }


TABLE_COLUMNS = [
    ("load", "load", "g"),
    ("router", "router", ""),
    ("ttft_p50_s", "TTFT p50 (s)", ".3f"),
    ("ttft_p99_s", "TTFT p99 (s)", ".2f"),
    ("e2e_p99_s", "E2E p99 (s)", ".1f"),
    ("prefix_hit_rate", "prefix hit", ".3f"),
    ("load_imbalance", "imbalance", ".2f"),
    ("replicas_used", "replicas used", ".0f"),
    ("max_replica_share", "busiest share", ".2f"),
    ("cost_usd", "cost ($)", ".2f"),
    ("slo_attainment", "SLO att.", ".3f"),
    ("usd_per_1k_good", "$/1k good", ".2f"),
]


def report(df: pd.DataFrame, workloads: Sequence[WorkloadCase] = WORKLOADS) -> str:
    """The markdown tables, one per workload, rows ordered by load then router."""
    order = {name: i for i, (name, _) in enumerate(ROUTERS)}
    parts = []
    for wl in workloads:
        sub = df[df["workload"] == wl.key]
        if sub.empty:
            continue
        sub = sub.assign(_o=sub["router"].map(order)).sort_values(["load", "_o"])
        slo = ", ".join(f"{k.removesuffix('_s')} <= {v:g} s" for k, v in wl.slo.items())
        n = int(sub["requests_total"].iloc[0])
        parts.append(f"### {wl.title}\n\n{wl.why}\n\n{n} requests per run; SLO: {slo}; load = workload.rate_scale; "
                     "imbalance = max/mean replica busy time; busiest share = the busiest replica's share of requests; "
                     "$/1k good = cost per 1000 requests that met the SLO.\n\n" + markdown_table(sub, TABLE_COLUMNS))
    return "\n\n".join(parts) + "\n"


def plot(df: pd.DataFrame, out_dir: Path, workloads: Sequence[WorkloadCase] = WORKLOADS) -> list[Path]:
    """One PNG per workload: prefix hit rate, TTFT p50 and TTFT p99, bars per router and load."""
    plt = matplotlib_pyplot()
    paths = []
    for wl in workloads:
        sub = df[df["workload"] == wl.key]
        if sub.empty:
            continue
        routers = [r for r, _ in ROUTERS if r in set(sub["router"])]
        loads = sorted(sub["load"].unique())
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharex=True)
        width = 0.8 / len(loads)
        for ax, (col, title) in zip(axes, [("prefix_hit_rate", "prefix hit rate"), ("ttft_p50_s", "TTFT p50 (s)"),
                                           ("ttft_p99_s", "TTFT p99 (s)")]):
            for k, load in enumerate(loads):
                vals = sub[sub["load"] == load].set_index("router").reindex(routers)[col]
                xs = [i + (k - (len(loads) - 1) / 2) * width for i in range(len(routers))]
                ax.bar(xs, vals.to_numpy(), width=width, label=f"load x{load:g}")
            ax.set_title(title)
            ax.set_xticks(range(len(routers)))
            ax.set_xticklabels(routers, rotation=60, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.suptitle(wl.title, fontsize=10)
        fig.tight_layout()
        path = out_dir / f"routing_{wl.key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    args = parse_args("routing_study", "Every router on shared-prefix and multi-turn workloads at two loads.", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = build_cases(args.quick)
    df = rows_frame(run_cases(cases, jobs=args.jobs, post=routing_columns))
    df.to_csv(args.out / "routing.csv", index=False)
    text = report(df)
    write_text(args.out / "routing.md", text)
    plot(df, args.out)
    print(text)
    print(f"wrote {args.out / 'routing.csv'}, routing.md and routing_*.png "
          f"({len(df)} runs, {df['sim_wall_s'].sum():.0f} s of simulation)")
    return df


if __name__ == "__main__":
    main()
