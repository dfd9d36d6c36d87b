"""Simulate what the real engine just served, and report the simulator's relative error.

The whole loop (``fleetsim validate``), in :func:`validate`:

1. Start the engine (or attach to one) and record its configuration (:mod:`validation.engine`).
2. Warm it up, then replay a closed burst of the *fit* trace to measure the engine's saturated
   throughput, and replay the fit trace open-loop at ``fit_load`` x that throughput.
3. Reconstruct every step's shape and fit the linear step-time profile on those runs
   (:mod:`validation.steps`, :mod:`validation.fit`).
4. On a *different* trace (held-out arrivals and lengths): a closed burst measures its capacity,
   then open-loop runs at each load level (fractions of that capacity). Each run, and the burst, is
   simulated with the fitted profile and the mirrored engine config (same block size, KV blocks,
   budget, max seqs, chunked prefill, prefix caching), using the *actual* send times as arrivals,
   and compared: relative error ``sim/real - 1`` of TTFT / TPOT / E2E percentiles, throughput,
   and preemption counts. The step-time fit is also scored on the held-out runs' steps.

Nothing here imports vLLM: the engine is a subprocess of another interpreter.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sim.api import json_safe
import pandas as pd

from sim.errors import FleetsimError
from traces.schema import Workload
from validation.engine import EngineError, EngineInfo, EngineSpec, VllmServer, vllm_python
from validation.fit import feature_matrix, fit_step_time, mape, usable_steps, write_profile
from validation.measure import Measurement, measure, vocab_size_of
from validation.workloads import at_rate, burst, shrink, with_arrivals

METRICS = ("ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p90", "tpot_p99", "e2e_p50", "e2e_p90", "e2e_p99")
CONTRACT_METRICS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "e2e_p50", "e2e_p90")
SIM_GPU = "H100-80GB"  # only names a catalog entry: KV size and step time come from the engine/profile


@dataclass
class TraceSpec:
    """A real trace cut down to what the engine under test can serve in a short run."""

    trace: str
    requests: int
    start: int = 0
    length_scale: float = 1.0
    output_scale: float = 1.0
    max_prompt: int | None = None
    max_output: int | None = None

    def load(self) -> Workload:
        from traces.config import load_trace

        return shrink(load_trace(self.trace), length_scale=self.length_scale, output_scale=self.output_scale,
                      max_prompt=self.max_prompt, max_output=self.max_output, start=self.start,
                      max_requests=self.requests)


@dataclass
class Plan:
    engine: EngineSpec
    fit: TraceSpec
    test: TraceSpec
    loads: tuple[float, ...]
    fit_load: float = 0.7
    burst_requests: int = 32
    warmup_requests: int = 4
    seed: int = 0
    timeout_s: float = 300.0
    client_cpus: set[int] | None = field(default_factory=lambda: {1})
    # Per-request latency outside the engine's steps added to simulated TTFT / E2E; None = measure it
    # on the fit run (client_latency), 0.0 = none.
    client_latency: float | None = None


def quick_plan(engine: EngineSpec | None = None) -> Plan:
    """The CI-sized run for the tiny dummy model on one CPU core (a few minutes)."""
    return Plan(
        engine=engine or EngineSpec(num_gpu_blocks_override=1024),
        # Azure conversation: no prefix sharing, mixed lengths, bursty-ish Poisson-like arrivals.
        # Lengths x1/2 (cap 1536) so the fit covers the held-out trace's context lengths too: with
        # x1/4 the fit never saw decode contexts beyond ~400 tokens and could not learn their cost.
        fit=TraceSpec("azure2023-conv", requests=160, start=1000, length_scale=0.5, output_scale=0.25,
                      max_prompt=1536, max_output=64),
        # Mooncake conversation: another length mix and real prefix reuse (512-token blocks -> 32).
        test=TraceSpec("mooncake-conversation", requests=100, start=2000, length_scale=1 / 16, output_scale=1 / 8,
                       max_prompt=1536, max_output=64),
        loads=(0.5, 0.9),
    )


def full_plan(engine: EngineSpec | None = None) -> Plan:
    p = quick_plan(engine)
    p.fit.requests, p.test.requests = 600, 300
    p.loads = (0.3, 0.5, 0.7, 0.9)
    p.burst_requests = 64
    return p


# -- simulation of a measured run ------------------------------------------------------------------

def scenario_for(workload_path: Path, info: EngineInfo, profile: Path, *, model: str, seed: int = 0) -> dict:
    """The scenario that mirrors the engine: one replica, its knobs, its KV blocks, the profile."""
    return {
        "name": f"validate:{workload_path.stem}",
        "seed": seed,
        "workload": {"trace": str(workload_path)},
        "cluster": {
            "replicas": 1, "gpu": SIM_GPU, "model": model, "tensor_parallel": 1,
            "engine": {
                "max_num_seqs": info.max_num_seqs,
                "max_num_batched_tokens": info.max_num_batched_tokens,
                "block_size": info.block_size,
                "enable_prefix_caching": bool(info.enable_prefix_caching),
                "enable_chunked_prefill": bool(info.enable_chunked_prefill),
                "num_gpu_blocks": info.num_gpu_blocks,
                "max_model_len": info.max_model_len,
            },
            "step_time": {"model": "linear", "profile": str(profile)},
        },
        "router": {"policy": "round-robin"},
    }


def simulate_measurement(m: Measurement, workload: Workload, profile: Path, workdir: Path, *, model: str,
                         seed: int = 0):
    """Simulate the requests of ``m`` arriving when the client actually sent them."""
    import sim
    from traces.formats import native

    req = m.replay.requests
    sent = req.set_index("request_id")["send_s"]
    ids = workload.df["request_id"] if workload.has("request_id") else pd.Series([f"r{i}" for i in range(len(workload))])
    arrivals = sent.reindex(ids.astype(str)).to_numpy(np.float64)
    if np.isnan(arrivals).any():  # never sent (should not happen): keep the schedule for those
        arrivals = np.where(np.isnan(arrivals), workload.df["arrival_s"].to_numpy(), arrivals)
    df = workload.df.copy()
    df["request_id"] = ids.astype(str).to_numpy()  # the simulated rows carry the replay's ids
    workload = Workload(df, name=workload.name, hash_block_size=workload.hash_block_size, source=workload.source,
                        notes=list(workload.notes))
    w = with_arrivals(workload, arrivals - np.nanmin(arrivals))
    path = workdir / f"{m.name}.workload.parquet"
    native.write(w, path)
    return sim.run(scenario_for(path, m.engine, profile, model=model, seed=seed))


def _pcts(values: np.ndarray, prefix: str) -> dict:
    v = values[~np.isnan(values)]
    return {f"{prefix}_p{q}": (float(np.percentile(v, q)) if len(v) else float("nan")) for q in (50, 90, 99)}


def real_metrics(m: Measurement) -> dict:
    df = m.replay.requests
    ok = df[df["status"] == "ok"]
    out = {}
    for col in ("ttft", "tpot", "e2e"):
        out.update(_pcts(ok[f"{col}_s"].to_numpy(np.float64), col))
    span = float(ok["end_s"].max() - df["send_s"].min()) if len(ok) else float("nan")
    out["throughput_req_s"] = len(ok) / span if span > 0 else float("nan")
    out["preemptions"] = m.preemptions
    cached = pd.to_numeric(ok["cached_tokens"], errors="coerce")
    out["prefix_hit_rate"] = (float(cached.sum() / ok["prompt_tokens"].sum())
                              if cached.notna().any() and len(ok) else float("nan"))
    out["requests"] = int(len(df))
    out["failed"] = int((df["status"] != "ok").sum())
    return out


def sim_metrics(result, latency_s: float = 0.0) -> dict:
    """Percentiles etc. of a simulated run; ``latency_s`` (see :func:`client_latency`) is added to
    every TTFT and E2E, as the client measures them."""
    df = result.requests
    ok = df[df["status"] == "completed"]
    out = {}
    for col in ("ttft", "tpot", "e2e"):
        add = latency_s if col in ("ttft", "e2e") else 0.0
        out.update(_pcts(ok[f"{col}_s"].to_numpy(np.float64) + add, col))
    span = float(ok["finish_s"].max() - df["arrival_s"].min()) if len(ok) else float("nan")
    out["throughput_req_s"] = len(ok) / span if span > 0 else float("nan")
    out["preemptions"] = float(result.summary.get("preemptions", float("nan")))
    out["prefix_hit_rate"] = float(ok["cached_tokens"].sum() / ok["prompt_tokens"].sum()) if len(ok) else float("nan")
    out["requests"] = int(len(df))
    out["failed"] = int((df["status"] != "completed").sum())
    return out


def client_latency(m: Measurement, result, *, max_queue_s: float = 1e-3, min_requests: int = 5) -> tuple[float, int]:
    """The per-request latency outside the engine's steps, measured on a *fit* run.

    The client times a request from its send to the arrival of its tokens; the simulator from the
    engine receiving it to the end of the step that produced them. In between are HTTP, the API
    server's request handling, the IPC to the engine core and back, and (vLLM's async scheduling) a
    request that arrives while a step runs cannot join the step scheduled meanwhile. For requests the
    simulation admits at once (queue below ``max_queue_s``), ``real TTFT - simulated TTFT`` is that
    latency plus noise; its median is what :func:`sim_metrics` adds to simulated TTFT and E2E.
    Measured on the CPU engine: ~15 ms (1-1.5 steps of the tiny model) at an idle engine.

    Returns (latency in seconds, number of requests it was measured on); (0.0, n) when fewer than
    ``min_requests`` requests qualify."""
    real = m.replay.requests.set_index(m.replay.requests["request_id"].astype(str))
    sim_df = result.requests.set_index(result.requests["request_id"].astype(str))
    sim_df = sim_df[(sim_df["status"] == "completed") & (sim_df["queue_s"] <= max_queue_s)]
    both = sim_df.index.intersection(real.index[real["status"] == "ok"])
    if len(both) < min_requests:
        return 0.0, int(len(both))
    d = real.loc[both, "ttft_s"].to_numpy(np.float64) - sim_df.loc[both, "ttft_s"].to_numpy(np.float64)
    return float(np.median(d)), int(len(both))


def relative_errors(sim: dict, real: dict) -> dict:
    err = {}
    for k in (*METRICS, "throughput_req_s"):
        r, s = real.get(k), sim.get(k)
        err[k] = (s / r - 1.0) if r and s is not None and math.isfinite(r) and math.isfinite(s) and r > 0 else None
    return err


# -- the loop ----------------------------------------------------------------------------------------

@dataclass
class LoadResult:
    label: str
    load: float | None  # fraction of measured capacity; None for the burst
    rate_req_s: float | None
    real: dict
    sim: dict
    error: dict
    steps_mape: float | None  # fitted step-time model vs this run's measured periods
    # sum(measured periods) / sum(predicted) - 1 on this run's steps: how much faster (< 0) or slower
    # the engine ran than during the fit runs; on a shared machine the main error source
    steps_bias: float | None = None


@dataclass
class ValidationReport:
    engine: dict
    fit: dict
    profile: str
    capacity_req_s: dict
    loads: list[LoadResult]
    client_overhead: dict
    wall_s: dict
    steps: dict
    machine: dict = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)

    def worst_error(self, metrics=CONTRACT_METRICS) -> dict:
        """Per metric, the error of largest magnitude over the open-loop load levels (the burst is
        reported but not included: its first requests wait behind the whole batch by design)."""
        out = {}
        for k in metrics:
            vals = [lr.error.get(k) for lr in self.loads if lr.load is not None and lr.error.get(k) is not None]
            out[k] = max(vals, key=abs) if vals else None
        return out

    def to_json(self) -> dict:
        requests = sum(lr.real["requests"] for lr in self.loads)
        return json_safe({
            "engine": "vllm-cpu" if self.engine.get("device") == "cpu" else (
                "url" if self.engine.get("attached") else "vllm"),
            "vllm_version": self.engine.get("vllm_version"),
            "requests": requests,
            "fit": self.fit,
            "error": self.worst_error(),
            "loads": [{"label": lr.label, "load": lr.load, "rate_req_s": lr.rate_req_s, "real": lr.real,
                       "sim": lr.sim, "error": lr.error, "steps_mape": lr.steps_mape, "steps_bias": lr.steps_bias}
                      for lr in self.loads],
            "capacity_req_s": self.capacity_req_s,
            "engine_config": self.engine,
            "profile": self.profile,
            "client_overhead": self.client_overhead,
            "steps": self.steps,
            "wall_s": self.wall_s,
            "machine": self.machine,
            "plots": self.plots,
        })


def _capacity(m: Measurement) -> float:
    return real_metrics(m)["throughput_req_s"]


RUN_NAMES = ("warmup", "fit-burst", "fit", "test-burst")  # + "test-<load>" per load level


def validate(plan: Plan, out_dir: str | Path, *, attach_url: str | None = None, attach_log: str | None = None,
             log=print) -> ValidationReport:
    """Run the whole loop (module docstring); artifacts go to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    walls: dict = {}
    t_all = time.monotonic()
    # other work on the machine is the largest error source on shared hosts: record it
    machine = {"cpus": os.cpu_count(), "loadavg_start": _loadavg()}
    if not attach_url:
        vllm_python()  # fail fast, with the install hint, before loading traces
    vocab = vocab_size_of(plan.engine.model)
    fit_w, test_w = plan.fit.load(), plan.test.load()
    if attach_url:
        server = VllmServer.attach(attach_url, plan.engine, attach_log)
    else:
        log(f"starting vLLM ({plan.engine.model}, block {plan.engine.block_size}, "
            f"budget {plan.engine.max_num_batched_tokens}, max seqs {plan.engine.max_num_seqs}) ...")
        server = VllmServer.launch(plan.engine, out / "engine")
    ms: dict[str, Measurement] = {}
    with server:
        info = server.info
        walls["engine_start"] = info.start_s
        log(f"engine ready: vLLM {info.vllm_version} on {info.device}, {info.num_gpu_blocks} KV blocks of "
            f"{info.block_size} tokens" + (f", started in {info.start_s:.0f} s" if info.start_s else ""))

        def run(name: str, w: Workload) -> Measurement:
            t = time.monotonic()
            m = measure(server, w, name=name, vocab_size=vocab, seed=plan.seed, timeout_s=plan.timeout_s,
                        client_cpus=plan.client_cpus)
            m.save(out / "runs")
            walls[name] = time.monotonic() - t
            s = m.replay.summary()
            log(f"  {name}: {s['requests_ok']}/{s['requests_total']} ok in {m.replay.duration_s:.1f} s, "
                f"{m.steps_report.get('steps_reconstructed', 0)}/{m.steps_report.get('steps', 0)} steps reconstructed")
            if not m.engine_alive:
                failed = int((m.replay.requests["status"] != "ok").sum())
                raise EngineError(f"the engine died during run {name} ({failed} request(s) failed; per-request "
                                  f"statuses in {out / 'runs' / name / 'requests.parquet'}); log {info.log_path}")
            ms[name] = m
            return m

        run("warmup", burst(shrink(fit_w, max_requests=plan.warmup_requests)))
        run("fit-burst", burst(shrink(fit_w, max_requests=plan.burst_requests)))
        run("fit", at_rate(fit_w, plan.fit_load * _capacity(ms["fit-burst"])))
        if "reconstructed" not in ms["fit"].steps.columns:
            raise FleetsimError(f"no per-step timings from the engine at {info.url}: an attached server needs "
                                f"--engine-log (its log, written with validation.engine.LOGGING_CONFIG and "
                                f"--enable-logging-iteration-details)")
        run("test-burst", burst(shrink(test_w, max_requests=plan.burst_requests)))
        cap_test = _capacity(ms["test-burst"])
        for load in plan.loads:
            run(f"test-{load:g}", at_rate(test_w, load * cap_test))
    walls["engine_total"] = time.monotonic() - t_all
    machine["loadavg_end"] = _loadavg()
    return analyse(plan, out, info.to_dict(), ms, log=log, walls=walls, machine=machine)


def recompare(out_dir: str | Path, plan: Plan | None = None, *, log=print) -> ValidationReport:
    """Fit and compare again from the runs a previous :func:`validate` saved in ``out_dir/runs``
    (no engine needed): to try a change of the fit or of the simulator on the same measurements.
    ``plan`` must be the one the runs were made with (default: :func:`quick_plan`)."""
    from validation.measure import load_measurement

    out = Path(out_dir)
    plan = plan or quick_plan()
    names = [*RUN_NAMES[1:], *(f"test-{load:g}" for load in plan.loads)]
    missing = [n for n in names if not (out / "runs" / n / "run.json").exists()]
    if missing:
        raise FleetsimError(f"{out / 'runs'}: run(s) {', '.join(missing)} missing (was it made with this plan?)")
    ms = {n: load_measurement(out / "runs" / n) for n in names}
    prev = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return analyse(plan, out, ms["fit"].engine.to_dict(), ms, log=log, walls=prev.get("wall_s", {}),
                   machine=prev.get("machine", {}))


def analyse(plan: Plan, out: Path, engine: dict, ms: dict[str, Measurement], *, log=print, walls: dict | None = None,
            machine: dict | None = None) -> ValidationReport:
    """Fit the profile on the fit trace's runs, simulate every held-out run, compare (steps 3-4)."""
    t0 = time.monotonic()
    walls = dict(walls or {})
    model = plan.engine.model
    fit_w, test_w = plan.fit.load(), plan.test.load()
    cap_fit = _capacity(ms["fit-burst"])
    fit_run_w = at_rate(fit_w, plan.fit_load * cap_fit)
    train = pd.concat([ms["fit-burst"].steps, ms["fit"].steps], ignore_index=True)
    fit = fit_step_time(train, target="cycle", seed=plan.seed)
    profile = write_profile(out / "profile.json", fit, engine)
    log(f"fit on {fit.n_train} steps: held-out (blocks) step MAPE {fit.heldout_mape:.1%} "
        f"(elapsed part {fit.heldout_mape_elapsed:.1%}, {fit.window}-step windows {fit.heldout_mape_window:.1%})")
    cap_test = _capacity(ms["test-burst"])
    runs: list[tuple[str, float | None, float | None, Measurement, Workload]] = [
        ("burst", None, None, ms["test-burst"], burst(shrink(test_w, max_requests=plan.burst_requests)))]
    for load in plan.loads:
        rate = load * cap_test
        runs.append((f"load-{load:g}", load, rate, ms[f"test-{load:g}"], at_rate(test_w, rate)))

    simdir = out / "sim"
    simdir.mkdir(exist_ok=True)
    # the client-side latency, measured on the fit run (never on the held-out trace)
    latency_s, latency_n = client_latency(ms["fit"], simulate_measurement(ms["fit"], fit_run_w, profile, simdir,
                                                                          model=model, seed=plan.seed))
    if plan.client_latency is not None:
        latency_s = plan.client_latency
    log(f"client-side latency (fit run, {latency_n} requests admitted at once in the simulation): "
        f"{latency_s * 1000:.1f} ms")
    results: list[LoadResult] = []
    heldout_steps = []
    plots = []
    coef = np.array(list(fit.coefficients.values()))
    for label, load, rate, m, w in runs:
        res = simulate_measurement(m, w, profile, simdir, model=model, seed=plan.seed)
        real, simd = real_metrics(m), sim_metrics(res, latency_s)
        plots += _run_plot(out, label, m, res, latency_s)
        u = usable_steps(m.steps) if "reconstructed" in m.steps else m.steps.iloc[:0]
        steps_mape = mape(feature_matrix(u) @ coef, u["period_s"].to_numpy()) if len(u) else None
        steps_bias = float(u["period_s"].sum() / (feature_matrix(u) @ coef).sum() - 1.0) if len(u) else None
        if load is not None:
            heldout_steps.append(u)
        results.append(LoadResult(label, load, rate, real, simd, relative_errors(simd, real), steps_mape, steps_bias))
    held = pd.concat(heldout_steps, ignore_index=True) if heldout_steps else None
    has_held = held is not None and len(held)
    fit_json = {
        "heldout_mape": fit.heldout_mape,
        "heldout_mape_window": fit.heldout_mape_window,
        "heldout_mape_elapsed": fit.heldout_mape_elapsed,
        "heldout_bias": fit.heldout_bias,
        "train_mape": fit.train_mape,
        "n_train": fit.n_train,
        "n_heldout": fit.n_heldout,
        "test_trace_mape": mape(feature_matrix(held) @ coef, held["period_s"].to_numpy()) if has_held else None,
        "test_trace_bias": (float(held["period_s"].sum() / (feature_matrix(held) @ coef).sum() - 1.0)
                            if has_held else None),
        "coefficients": fit.coefficients,
        "target": fit.target,
        "client_latency_s": latency_s,
        "client_latency_requests": latency_n,
    }
    walls["analysis"] = time.monotonic() - t0
    walls["total"] = walls.get("engine_total", 0.0) + walls["analysis"]
    overhead = {name: m.replay.overhead for name, _, _, m, _ in runs}
    steps = {name: m.steps_report for name, _, _, m, _ in runs}
    report = ValidationReport(engine, fit_json, str(profile), {"fit_trace": cap_fit, "test_trace": cap_test},
                              results, overhead, walls, steps, dict(machine or {}), plots)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=1, default=str) + "\n")
    return report


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _run_plot(out: Path, label: str, m: Measurement, result, latency_s: float) -> list[str]:
    """CDFs of TTFT / TPOT / E2E, real vs simulated, for one run (``cdf-<label>.png``)."""
    from validation.plots import columns, plot_cdfs

    real = m.replay.requests[m.replay.requests["status"] == "ok"]
    sim_ok = result.requests[result.requests["status"] == "completed"].copy()
    sim_ok["ttft_s"] = sim_ok["ttft_s"] + latency_s
    sim_ok["e2e_s"] = sim_ok["e2e_s"] + latency_s
    p = plot_cdfs({"real": columns(real), "sim": columns(sim_ok)}, out / f"cdf-{label}.png",
                  title=f"validate: {label} ({m.name}), sim vs real vLLM {m.engine.vllm_version}")
    return [str(p)] if p is not None else []


def format_table(report: ValidationReport) -> str:
    """Plain-text error table (one column per run)."""
    cols = report.loads
    head = f"{'metric':<18}" + "".join(f"{lr.label:>22}" for lr in cols)
    lines = [head, f"{'':<18}" + "".join(f"{'real / sim / err':>22}" for _ in cols)]

    def fmt(v, scale=1000.0, unit="ms"):
        return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v * scale:.0f}"

    for k in (*METRICS, "throughput_req_s", "prefix_hit_rate", "preemptions"):
        row = f"{k:<18}"
        for lr in cols:
            r, s, e = lr.real.get(k), lr.sim.get(k), lr.error.get(k)
            if k == "throughput_req_s":
                cell = f"{r:.2f} / {s:.2f} / {e:+.0%}" if e is not None else "-"
            elif k == "prefix_hit_rate":
                cell = "-" if r is None or s is None else f"{r:.0%} / {s:.0%}"
            elif k == "preemptions":
                cell = f"{r if r is not None else '-'} / {s:g}"
            else:
                cell = f"{fmt(r)} / {fmt(s)} / " + (f"{e:+.0%}" if e is not None else "-")
            row += f"{cell:>22}"
        lines.append(row)
    lines.append(f"{'step MAPE':<18}" + "".join(
        f"{(f'{lr.steps_mape:.1%}' if lr.steps_mape is not None else '-'):>22}" for lr in cols))
    lines.append(f"{'step bias':<18}" + "".join(
        f"{(f'{lr.steps_bias:+.1%}' if lr.steps_bias is not None else '-'):>22}" for lr in cols))
    return "\n".join(lines)
