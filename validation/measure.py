"""One measurement run: replay a workload on a real engine and collect everything the fit and the
comparison need (engine config, per-request timings, per-step shapes, scraped metrics).

Kept separate from the CLI so tests and scripts can drive it; artifacts are written to a run
directory so a run can be re-fitted or re-compared without the engine.
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from traces.schema import Workload
from validation.engine import EngineInfo, VllmServer
from validation.replay import ReplayResult, build_requests, replay
from validation.steps import parse_iteration_log, reconstruct_shapes


@dataclass
class Measurement:
    name: str
    engine: EngineInfo
    replay: ReplayResult
    steps: pd.DataFrame  # with reconstructed features (see validation.steps)
    steps_report: dict
    preemptions: float | None  # vllm:num_preemptions_total increase during the run
    engine_alive: bool  # False if the server died during the run (failed requests say so too)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory) / self.name
        d.mkdir(parents=True, exist_ok=True)
        req = self.replay.requests.copy()
        req["token_times"] = req["token_times"].map(list)
        req.to_parquet(d / "requests.parquet", index=False)
        self.steps.to_csv(d / "steps.csv", index=False)
        self.replay.metrics.to_csv(d / "metrics.csv", index=False)
        (d / "run.json").write_text(json.dumps({
            "engine": self.engine.to_dict(), "overhead": self.replay.overhead, "t0_wall": self.replay.t0_wall,
            "duration_s": self.replay.duration_s, "steps_report": self.steps_report,
            "preemptions": self.preemptions, "engine_alive": self.engine_alive,
            "summary": self.replay.summary(),
        }, indent=1, default=str) + "\n")
        return d


def load_measurement(directory: str | Path) -> Measurement:
    """Read back a run written by :meth:`Measurement.save` (re-fit / re-compare without the engine)."""
    from validation.replay import ReplayResult

    d = Path(directory)
    meta = json.loads((d / "run.json").read_text())
    req = pd.read_parquet(d / "requests.parquet")
    req["token_times"] = req["token_times"].map(list)
    metrics = pd.read_csv(d / "metrics.csv") if (d / "metrics.csv").stat().st_size > 1 else pd.DataFrame()
    rr = ReplayResult(req, metrics, meta["overhead"], meta["t0_wall"], meta["duration_s"])
    info = EngineInfo(**meta["engine"])
    return Measurement(d.name, info, rr, pd.read_csv(d / "steps.csv"), meta["steps_report"], meta["preemptions"],
                       meta["engine_alive"])


def vocab_size_of(model: str) -> int:
    from sim.catalog import load_catalog

    return load_catalog().model(model, field="engine.model").vocab_size


def measure(server: VllmServer, workload: Workload, *, name: str, vocab_size: int, rate_scale: float = 1.0,
            seed: int = 0, timeout_s: float = 300.0, client_cpus: set[int] | None = None,
            settle_s: float = 0.5) -> Measurement:
    """Replay ``workload`` on ``server`` and reconstruct the engine steps it caused.

    Only the log written during this replay is parsed (offset taken before it starts), so several
    runs can share one server.
    """
    info = server.info
    # A salt per run name: runs on one server must not hit each other's prefix cache (the
    # simulator starts every run cold), so the same trace rows get different token ids per run.
    run_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) & 0xFFFFFFFF
    reqs = build_requests(workload, block_size=info.block_size, vocab_size=vocab_size, seed=run_seed,
                          max_model_len=info.max_model_len)
    offset = len(server.log_text())
    result = replay(server.url, reqs, model=info.model, rate_scale=rate_scale, timeout_s=timeout_s,
                    client_cpus=client_cpus)
    time.sleep(settle_s)  # let the API server flush the last steps' log lines
    alive = server.alive()
    text = server.log_text()[offset:]
    steps = parse_iteration_log(text)
    if steps["t_log"].notna().all() and len(steps):
        steps, report = reconstruct_shapes(steps, result.requests, result.t0_wall)
    else:
        report = {"steps": int(len(steps)), "steps_reconstructed": 0,
                  "note": "no per-step log with timestamps (attached server without its log?)"}
    pre = None
    m = result.metrics
    if "vllm:num_preemptions_total" in m.columns and m["vllm:num_preemptions_total"].notna().sum() >= 1:
        col = m["vllm:num_preemptions_total"].dropna()
        pre = float(col.iloc[-1] - col.iloc[0])
    return Measurement(name, info, result, steps, report, pre, alive)
