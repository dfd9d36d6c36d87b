"""``fleetsim bench``: how fast the simulator is, on a standard large workload.

Workload (1) of the performance issue: the Azure 2023 conversation trace (19,366 requests over one
hour) tiled to any number of requests -- copy ``k`` is shifted by ``k`` trace periods -- and time
compressed (``workload.rate_scale``) so that every replica of an H100 / Llama-3.1-8B fleet is busy
~70% of the time, routed by the ``prefix-aware`` router. Everything runs through the public
``sim.run(scenario)``; the tiled trace is a native Parquet file written once to a cache directory.

"Utilisation" is GPU-busy time, the fraction of time a replica has a step in flight (what
``nvidia-smi`` reports as GPU-Util). The compression that gives ~70% on 16 replicas was measured
with this simulator (docs/performance.md); with R replicas the rate is scaled by R/16, so the load
per replica, and hence the work per request, stays the same at every fleet size. The measured
utilisation is printed with every result.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Rate scale putting 16 H100 replicas of Llama-3.1-8B (roofline step time, default engine) at ~70%
# GPU-busy time on the Azure conv trace; measured as described in docs/performance.md.
RATE_SCALE_16 = 1.3
REFERENCE_REPLICAS = 16
TRACE = "azure2023-conv"


def cache_dir() -> Path:
    d = Path(os.environ.get("FLEETSIM_BENCH_CACHE", Path(tempfile.gettempdir()) / "fleetsim-bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def tiled_trace(num_requests: int, trace: str = TRACE) -> Path:
    """A Parquet trace of ``num_requests`` requests: the trace repeated, copy k shifted by k periods.

    The period is the trace duration plus one mean inter-arrival gap, so the seams look like the
    rest of the trace. Written once per size (the file name has the size in it).
    """
    path = cache_dir() / f"{trace}-x{num_requests}.parquet"
    if path.exists():
        return path
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from traces.config import WorkloadSpec, build_workload

    df = build_workload(WorkloadSpec(trace=trace)).df
    n = len(df)
    t = df["arrival_s"].to_numpy(dtype=np.float64)
    period = (t[-1] - t[0]) * n / (n - 1)
    copies = -(-num_requests // n)
    k = np.repeat(np.arange(copies), n)[:num_requests]
    idx = np.tile(np.arange(n), copies)[:num_requests]
    table = pa.table({
        "arrival_s": t[idx] - t[0] + k * period,
        "prompt_tokens": df["prompt_tokens"].to_numpy(np.int64)[idx],
        "output_tokens": df["output_tokens"].to_numpy(np.int64)[idx],
    })
    meta = {"name": f"{trace} x{copies} (tiled to {num_requests} requests)"}
    table = table.replace_schema_metadata({b"fleetsim": json.dumps(meta).encode()})
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def bench_scenario(num_requests: int, replicas: int, *, router: str = "prefix-aware",
                   utilisation_scale: float = 1.0) -> dict[str, Any]:
    """Workload (1): tiled Azure conv on ``replicas`` H100 / Llama-3.1-8B at ~70% GPU-busy time."""
    return {
        "name": f"bench: azure conv x{num_requests} on {replicas} x H100 / llama-3.1-8b",
        "seed": 0,
        "workload": {"trace": str(tiled_trace(num_requests)),
                     "rate_scale": RATE_SCALE_16 * replicas / REFERENCE_REPLICAS * utilisation_scale},
        "cluster": {"replicas": replicas, "gpu": "H100-80GB", "model": "llama-3.1-8b"},
        "router": {"policy": router},
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 1024.0 / 1024.0


def measure(scenario: dict[str, Any]) -> dict[str, Any]:
    """Run one scenario through ``sim.run`` and report speed, memory and what was simulated."""
    import sim

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    result = sim.run(scenario)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    s = result.summary
    ts = result.timeseries
    rep = ts[ts["replica"] >= 0]
    running = rep["vllm:num_requests_running"].to_numpy()
    sim_s = float(s["duration_s"])
    steps = int(s["engine_steps"])
    n = int(s["requests_total"])
    return {
        "workload": scenario.get("name", ""),
        "requests": n,
        "replicas": int(scenario["cluster"]["replicas"]),
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "sim_wall_s": round(float(s["sim_wall_s"]), 3),  # the event loop alone (no loading)
        "req_per_wall_s": round(n / wall, 1),
        "steps": steps,
        "steps_per_wall_s": round(steps / wall, 1),
        "simulated_s": round(sim_s, 1),
        "realtime_factor": round(sim_s / wall, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "gpu_busy_frac": round(float((running > 0).mean()) if len(running) else 0.0, 3),
        "mean_running": round(float(running.mean()) if len(running) else 0.0, 2),
        "requests_completed": int(s["requests_completed"]),
        "prefix_hit_rate": round(float(s["prefix_hit_rate"]), 4),
        "ttft_p50_s": s["ttft_p50_s"],
        "tpot_p50_s": s["tpot_p50_s"],
    }


BENCH_KEYS = ("requests", "replicas", "wall_s", "req_per_wall_s", "steps_per_wall_s", "peak_rss_mb")


def register(app) -> None:
    import typer

    @app.command()
    def bench(
        requests: int = typer.Option(1_000_000, "--requests", min=1, help="Requests (the Azure conv trace, tiled)."),
        replicas: int = typer.Option(16, "--replicas", min=1, help="H100 replicas of Llama-3.1-8B (~70% busy each)."),
        router: str = typer.Option("prefix-aware", "--router", help="Router policy."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    ) -> None:
        """Time the simulator on the standard workload: Azure conv tiled to N requests, R replicas."""
        from sim.errors import FleetsimError

        try:
            out = measure(bench_scenario(requests, replicas, router=router))
        except FleetsimError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        if as_json:
            typer.echo(json.dumps(out))
            return
        for k in BENCH_KEYS:
            typer.echo(f"{k:>18}: {out[k]}")
        for k in ("simulated_s", "realtime_factor", "steps", "cpu_s", "gpu_busy_frac", "mean_running"):
            typer.echo(f"{k:>18}: {out[k]}")
