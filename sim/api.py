"""Run a scenario and hold its results."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from sim.build import build_cluster_config
from sim.cluster import Cluster
from sim.scenario import Scenario, load_scenario


@dataclass
class Result:
    """The outcome of one simulation run.

    Attributes:
        requests: one row per request (see ``sim.metrics.REQUEST_COLUMNS``).
        timeseries: sampled gauges, per replica (``replica >= 0``) and for the cluster (``replica == -1``).
        summary: headline numbers (TTFT/TPOT/ITL/E2E percentiles, throughput, goodput, cost, ...).
        scenario: the validated scenario that produced it.
        replicas: one row per replica ever started (lifetime, busy fraction, hit rate, cost).
    """

    requests: pd.DataFrame
    timeseries: pd.DataFrame
    summary: dict
    scenario: Scenario
    replicas: pd.DataFrame = field(default_factory=pd.DataFrame)

    def save(self, out_dir: str | Path) -> Path:
        """Write ``requests``/``timeseries``/``replicas`` Parquet, ``summary.json`` and ``scenario.yaml``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        req = self.requests.copy()
        for col in ("session_id", "tenant", "reason", "request_id"):
            if col in req.columns and req[col].dtype == object:
                req[col] = req[col].astype("string")
        req.to_parquet(out / "requests.parquet", index=False)
        self.timeseries.to_parquet(out / "timeseries.parquet", index=False)
        self.replicas.to_parquet(out / "replicas.parquet", index=False)
        (out / "summary.json").write_text(json.dumps(json_safe(self.summary), indent=2) + "\n")
        (out / "scenario.yaml").write_text(self.scenario.to_yaml())
        return out

    def cluster_series(self) -> pd.DataFrame:
        """The cluster-level rows of the time series, indexed by time."""
        return self.timeseries[self.timeseries["replica"] == -1].set_index("time_s")


def json_safe(o):
    """A JSON-standard copy: NaN/inf become null, numpy scalars become Python ones, recursively."""
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if hasattr(o, "item") and not hasattr(o, "__len__"):  # numpy scalar
        o = o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o


def run(scenario: Scenario | dict | str | Path | None = None, *, progress: bool = False,
        overrides: list[str] | None = None,
        on_progress: Callable[[int, int, float], None] | None = None) -> Result:
    """Simulate a scenario (a :class:`Scenario`, a dict, a YAML path, or ``None`` for the default).

    ``on_progress(ended, total, sim_time_s)`` is called about 200 times over the run (for UIs).

    >>> import sim
    >>> r = sim.run({"workload": {"synthetic": {"rate_per_s": 2, "num_requests": 20}},
    ...              "cluster": {"replicas": 1}})
    >>> r.summary["requests_completed"]
    20
    """
    sc = scenario if isinstance(scenario, Scenario) else load_scenario(scenario, overrides)
    if isinstance(scenario, Scenario) and overrides:
        sc = load_scenario(sc.model_dump(mode="json", exclude_none=True), overrides)
    cfg, dep = build_cluster_config(sc, progress=progress)
    cfg.on_progress = on_progress
    out = Cluster(cfg).run()
    summary = dict(out.summary)
    summary.update({
        "gpu": dep.gpu.name, "model": dep.model.name, "tensor_parallel": dep.num_gpus,
        "num_gpu_blocks": dep.engine.num_gpu_blocks, "max_num_batched_tokens": dep.engine.max_num_batched_tokens,
        "max_num_seqs": dep.engine.max_num_seqs, "router": sc.router.policy, "autoscaler": sc.autoscaler.policy,
    })
    summary["sim_wall_s"] = summary.pop("sim_wall_s")
    return Result(out.requests, out.timeseries, summary, sc, out.replicas)
