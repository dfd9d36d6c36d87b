"""fleetsim's speed on standard workloads: simulated requests and engine steps per wall-second,
peak memory, and the real-time factor (simulated seconds per wall second).

    python benchmarks/run.py                 # everything (about 15 minutes on one core)
    python benchmarks/run.py --quick         # smaller sizes (about 2 minutes)
    python benchmarks/run.py --only scaling --json results.json

Workloads (performance issue):
  1. ``azure-1m``: the Azure 2023 conversation trace tiled to 1,000,000 requests and time-compressed
     so 16 H100 replicas of Llama-3.1-8B are ~70% busy, prefix-aware routing (``fleetsim bench``).
  2. ``scaling``: the same at 10^4 and 10^5 requests on 1, 4, 16 and 64 replicas, at the same load
     per replica (the rate grows with the fleet), to show how cost grows.
  3. ``mooncake``: the Mooncake/Kimi conversation trace (12,031 requests, long shared prefixes) with
     prefix caching on, prefix-aware routing, 8 replicas.
  4. ``default``: ``fleetsim run`` with no arguments (Azure conv on 4 H100).

Each case runs in a fresh subprocess so that its peak memory is its own. The fast-forward can be
turned off (``--naive``, i.e. FLEETSIM_NAIVE=1) to measure the one-event-per-step reference.
docs/performance.md explains the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = [("case", 30), ("requests", 9), ("replicas", 8), ("wall_s", 8), ("cpu_s", 8), ("req_per_wall_s", 14),
           ("steps_per_wall_s", 16), ("realtime_factor", 15), ("peak_rss_mb", 11), ("gpu_busy_frac", 13),
           ("prefix_hit_rate", 15)]


def cases(quick: bool, only: set[str] | None) -> list[tuple[str, dict]]:
    from sim.benchmarks_cli import bench_scenario

    out: list[tuple[str, dict]] = []

    def want(group: str) -> bool:
        return only is None or group in only

    if want("default"):
        out.append(("default (fleetsim run)", {"name": "default"}))
    if want("azure-1m"):
        n = 100_000 if quick else 1_000_000
        out.append((f"azure x{n // 1000}k / 16 rep", bench_scenario(n, 16)))
    if want("scaling"):
        sizes = (10_000,) if quick else (10_000, 100_000)
        for n in sizes:
            for r in (1, 4, 16, 64):
                out.append((f"scaling {n // 1000}k / {r} rep", bench_scenario(n, r)))
    if want("mooncake"):
        out.append(("mooncake-conversation / 8 rep", {
            "name": "bench: mooncake conversation, prefix caching, 8 x H100 / llama-3.1-8b",
            "seed": 0,
            "workload": {"trace": "mooncake-conversation", **({"max_requests": 3000} if quick else {})},
            "cluster": {"replicas": 8, "gpu": "H100-80GB", "model": "llama-3.1-8b",
                        "engine": {"enable_prefix_caching": True}},
            "router": {"policy": "prefix-aware"},
        }))
    return out


def run_one(scenario: dict) -> dict:
    """In this process: run the scenario and measure it."""
    from sim.benchmarks_cli import measure

    if scenario.get("name") == "default":
        from sim.scenario import DEFAULT_SCENARIO

        scenario = dict(DEFAULT_SCENARIO, name="default")
    return measure(scenario)


def run_isolated(scenario: dict, naive: bool) -> dict:
    env = dict(os.environ)
    if naive:
        env["FLEETSIM_NAIVE"] = "1"
    proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(scenario)], capture_output=True, text=True,
                          env=env, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark case failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes")
    p.add_argument("--only", action="append", choices=["default", "azure-1m", "scaling", "mooncake"],
                   help="run only these groups (repeatable)")
    p.add_argument("--naive", action="store_true", help="one event per engine step (FLEETSIM_NAIVE=1)")
    p.add_argument("--json", type=Path, help="also write all results to this JSON file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(json.loads(a.one))))
        return 0
    results = []
    print("  ".join(f"{name:>{w}}" for name, w in COLUMNS), flush=True)
    for label, scenario in cases(a.quick, set(a.only) if a.only else None):
        r = run_isolated(scenario, a.naive)
        r["case"] = label
        results.append(r)
        print("  ".join(f"{str(r.get(name, '')):>{w}}" for name, w in COLUMNS), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
