"""Calibrate the step-time profile from request logs alone (no per-step data), and report the error.

``fleetsim validate --from-logs DIR``. A recorded run gives, per request, when the engine received
it, when it was first scheduled, when its first and last tokens came out, and the engine's exact
configuration; it gives no step timings. So the linear step-time profile
(:class:`sim.step_time.LinearStepTime`) is fitted by *simulation-based search*: simulate the logged
requests with a candidate profile and the mirrored engine config, compare the simulated and measured
latency distributions, and let ``scipy.optimize`` move the coefficients. The simulator is
deterministic, so the objective is a plain function of the coefficients (piecewise smooth: a change
of event order makes it jump a little).

Steps (:func:`calibrate`):

1. **Load** (:func:`load_logged_run`): LLMServingSim's vLLM bench format (``meta.json`` with the
   engine config, ``workload.jsonl`` with every prompt's token ids, ``requests.jsonl`` with per-request
   ``queued_ts / scheduled_ts / first_token_ts / last_token_ts`` on the engine's clock,
   ``timeseries.csv`` 1 s gauges). Arrivals are the engine's receipt times (``queued_ts``), latencies
   are measured from them, as the log's own summary does.
2. **Mirror the engine**: GPU and model from the catalog, block size, KV blocks as logged (the memory
   plan's own estimate is reported next to it), token budget, max seqs, max model length, prefix
   caching, chunked prefill, policy. Knobs the simulator cannot mirror are listed in
   ``engine.not_mirrored`` (e.g. vLLM's full-prompt admission gate, async scheduling).
3. **Start** from the roofline (:func:`roofline_start`): simulate with
   :class:`sim.roofline.RooflineStepTime` for the GPU, record every step's shape and time, and fit the
   linear form to those (relative NNLS), so the search starts from physics, not from zeros.
4. **Search** (:func:`search`): the parameters are the coefficients in units of "share of a mean
   step" (``c_k = ref_k * x_k``, see :func:`search`), kept >= 0. Stage 1 scales all coefficients
   together (a bounded 1-D search: the dominant error is the overall speed); stage 2 moves them one
   by one (Nelder-Mead by default; ``least_squares`` with finite-difference steps is cheaper where the
   objective is smooth). Residuals, over the *fit* requests only: per request
   ``log((sim + tau) / (real + tau))`` of TTFT, TPOT and E2E (tau = the median TPOT, one step), plus
   the log ratios of their 10/25/50/75/90% quantiles, plus a weak ridge pulling the coefficients back
   to the stage-1 point: request timings cannot separate every coefficient (e.g. ``decode_seqs`` vs
   ``num_seqs`` are nearly collinear), and the ridge keeps the unidentified directions where the
   roofline put them. The objective is piecewise smooth (a change of event order makes it jump),
   which is why Nelder-Mead, which needs no gradient, is the default.
5. **Cross-validate**: ``split="halves"`` fits on the first half of the requests (by arrival) and
   tests on the second, ``"alternate"`` on even / odd requests. Every simulation runs all requests
   (the engine state depends on all of them); only the *measured timings* of the test requests are
   never used by the search. The report has the error on the fit part, the held-out part and all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import numpy as np

from sim.api import json_safe
import pandas as pd

from sim.errors import ConfigError, TraceError
from sim.step_time import LINEAR_FEATURES, BatchShape, LinearStepTime, linear_features
from traces.schema import Workload

Split = Literal["halves", "alternate"]
Method = Literal["least_squares", "nelder-mead"]
Objective = Literal["requests", "quantiles"]

REQUIRED_FILES = ("meta.json", "workload.jsonl", "requests.jsonl")
REQUEST_FIELDS = ("request_id", "input_toks", "output_toks", "queued_ts", "scheduled_ts", "first_token_ts",
                  "last_token_ts")
FIT_QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
# Not fitted: the split of TTFT into queueing (receipt -> first scheduled) and prefill (first scheduled
# -> first token). With vLLM's async scheduling a request is scheduled while the *previous* step still
# runs, so the logged scheduled_ts is about one step earlier than its computation starts (measured
# on the RTX 4090 run: real prefill ~0.1-0.2 s longer, queue as much shorter, than the simulator's,
# which has no async scheduling); TTFT itself is unaffected. Both parts stay in the tables' data.
FIT_METRICS = ("ttft", "tpot", "e2e")
TABLE_METRICS = FIT_METRICS
REPORT_METRICS = ("ttft_p50", "ttft_p90", "ttft_p99", "tpot_p50", "tpot_p90", "tpot_p99", "e2e_p50", "e2e_p90",
                  "e2e_p99")
CONTRACT_METRICS = ("ttft_p50", "ttft_p90", "tpot_p50", "tpot_p90", "e2e_p50", "e2e_p90")


# -- loading ---------------------------------------------------------------------------------------

@dataclass
class LoggedEngine:
    """The engine configuration of a logged run, as the simulator mirrors it."""

    vllm_version: str
    model: str  # catalog name
    gpu: str  # catalog name
    tensor_parallel: int
    block_size: int
    num_gpu_blocks: int  # as logged (what the simulator uses)
    num_gpu_blocks_plan: int | None  # what sim.memory's plan computes for this GPU x model x knobs
    gpu_memory_utilization: float
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    enable_prefix_caching: bool
    enable_chunked_prefill: bool
    scheduling_policy: str
    long_prefill_token_threshold: int
    scheduler_reserve_full_isl: bool  # absent from older vLLM configs: they checked the first chunk only
    dtype: str
    kv_cache_dtype: str
    not_mirrored: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LoggedRun:
    """A recorded run: its engine, its requests as a workload, and the measured per-request timings.

    ``real`` columns (one row per request, workload order): request_id, arrival_s (engine receipt,
    rebased to the first request), prompt_tokens, output_tokens, queue_s (receipt -> first scheduled),
    ttft_s, tpot_s (``(last - first) / (output - 1)``), e2e_s, api_lag_s (how much later than the
    client's send the engine received it, relative to the first request: the API server's share).
    """

    directory: Path
    engine: LoggedEngine
    workload: Workload
    real: pd.DataFrame
    timeseries: pd.DataFrame | None
    meta: dict


def _get(d: dict, dotted: str, path: Path, *, default=..., types: tuple = ()):
    cur = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            if default is not ...:
                return default
            raise TraceError(f"{path}: field '{dotted}' missing (needed to mirror the engine)")
        cur = cur[part]
    if types and not isinstance(cur, types):
        raise TraceError(f"{path}: field '{dotted}' must be {'/'.join(t.__name__ for t in types)}, got {cur!r}")
    return cur


def engine_from_meta(meta: dict, path: Path) -> LoggedEngine:
    """The mirrored engine config from a bench ``meta.json`` (resolved config preferred: it is what ran)."""
    from sim.catalog import load_catalog
    from sim.memory import plan_kv

    cat = load_catalog()
    model_name = _get(meta, "model", path, types=(str,))
    device = _get(meta, "hardware.device_name", path, types=(str,))
    try:
        model = cat.model(model_name, field="meta.json model")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        gpu = cat.gpu(device, field="meta.json hardware.device_name")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e} (add the GPU to a catalog file)") from None
    ek = _get(meta, "engine_kwargs", path, types=(dict,))
    sched = _get(meta, "resolved_config.scheduler_config", path, default={})
    cache = _get(meta, "resolved_config.cache_config", path, default={})
    kv = _get(meta, "kv_cache", path, types=(dict,))
    integer = (int,)
    tp = int(_get(ek, "tensor_parallel_size", path, default=1))
    block = int(_get(kv, "block_size", path, types=integer))
    blocks = int(_get(kv, "num_gpu_blocks", path, types=integer))
    util = float(_get(kv, "gpu_memory_utilization", path, default=_get(cache, "gpu_memory_utilization", path,
                                                                        default=0.9)))
    max_seqs = int(sched.get("max_num_seqs") or _get(ek, "max_num_seqs", path, types=integer))
    budget = int(sched.get("max_num_batched_tokens") or _get(ek, "max_num_batched_tokens", path, types=integer))
    max_len = int(_get(ek, "max_model_len", path, types=integer))
    prefix = bool(_get(kv, "enable_prefix_caching", path, default=cache.get("enable_prefix_caching", True)))
    chunked = bool(sched.get("enable_chunked_prefill", True))
    policy = str(sched.get("policy", "fcfs"))
    thr = int(sched.get("long_prefill_token_threshold") or 0)
    full_isl = bool(sched.get("scheduler_reserve_full_isl", False))
    dtype = str(ek.get("dtype", "bfloat16"))
    kv_dtype = str(cache.get("cache_dtype") or ek.get("kv_cache_dtype") or "auto")
    if policy not in ("fcfs", "priority"):
        raise TraceError(f"{path}: resolved_config.scheduler_config.policy {policy!r}: the simulator knows "
                         f"fcfs and priority")
    try:
        plan_blocks = plan_kv(model, gpu, tensor_parallel=tp, block_size=block, gpu_memory_utilization=util,
                              max_num_batched_tokens=budget, max_num_seqs=max_seqs, max_model_len=max_len,
                              kv_cache_dtype=kv_dtype).num_gpu_blocks
    except Exception:  # noqa: BLE001 - an estimate only; the logged count is what the run used
        plan_blocks = None
    not_mirrored = []
    if sched.get("async_scheduling"):
        not_mirrored.append("async_scheduling=True: the next step is scheduled while the current one runs; "
                            "its effect on step time is absorbed in the fitted coefficients")
    return LoggedEngine(
        vllm_version=str(meta.get("vllm_version", "?")), model=model.name, gpu=gpu.name, tensor_parallel=tp,
        block_size=block, num_gpu_blocks=blocks, num_gpu_blocks_plan=plan_blocks, gpu_memory_utilization=util,
        max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=max_len, enable_prefix_caching=prefix,
        enable_chunked_prefill=chunked, scheduling_policy=policy, long_prefill_token_threshold=thr,
        scheduler_reserve_full_isl=full_isl, dtype=dtype,
        kv_cache_dtype=kv_dtype, not_mirrored=not_mirrored)


def _read_request_log(path: Path) -> pd.DataFrame:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            missing = [k for k in REQUEST_FIELDS if d.get(k) is None]
            if missing:
                raise TraceError(f"{path}:{lineno}: field '{missing[0]}' missing")
            q, s, ft, lt = (float(d[k]) for k in ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts"))
            if not q <= s <= ft <= lt:
                raise TraceError(f"{path}:{lineno}: timestamps out of order (need queued_ts <= scheduled_ts <= "
                                 f"first_token_ts <= last_token_ts)")
            d["_line"] = lineno
            rows.append(d)
    if not rows:
        raise TraceError(f"{path}: no requests")
    return pd.DataFrame(rows)


def load_logged_run(directory: str | Path) -> LoggedRun:
    """Read a logged run (module docstring, step 1). Errors name the file, line and field."""
    from traces.config import load_trace

    d = Path(directory)
    if not d.is_dir():
        raise TraceError(f"{d}: not a directory (expected a logged run: {', '.join(REQUIRED_FILES)})")
    for name in REQUIRED_FILES:
        if not (d / name).is_file():
            raise TraceError(f"{d / name}: missing (a logged run needs {', '.join(REQUIRED_FILES)})")
    meta_path = d / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise TraceError(f"{meta_path}:{e.lineno}: invalid JSON ({e.msg})") from None
    engine = engine_from_meta(meta, meta_path)
    w = load_trace(str(d / "workload.jsonl"))
    req = _read_request_log(d / "requests.jsonl")
    rpath = d / "requests.jsonl"
    if len(req) != len(w):
        raise TraceError(f"{rpath}: {len(req)} requests but workload.jsonl has {len(w)}")
    pt, ot = w.df["prompt_tokens"].to_numpy(np.int64), w.df["output_tokens"].to_numpy(np.int64)
    bad = np.flatnonzero((req["input_toks"].to_numpy(np.int64) != pt) | (req["output_toks"].to_numpy(np.int64) != ot))
    if len(bad):
        i = int(bad[0])
        raise TraceError(f"{rpath}:{int(req['_line'].iloc[i])}: input_toks/output_toks differ from workload.jsonl "
                         f"row {i + 1} (the two files must list the same requests in the same order)")
    q = req["queued_ts"].to_numpy(np.float64)
    if np.any(np.diff(q) < 0):
        i = int(np.flatnonzero(np.diff(q) < 0)[0]) + 1
        raise TraceError(f"{rpath}:{int(req['_line'].iloc[i])}: queued_ts goes backwards (requests must be in "
                         f"arrival order)")
    first, last = req["first_token_ts"].to_numpy(np.float64), req["last_token_ts"].to_numpy(np.float64)
    out = req["output_toks"].to_numpy(np.int64)
    arrival = q - q[0]
    real = pd.DataFrame({
        "request_id": req["request_id"].astype(str).to_numpy(),
        "arrival_s": arrival,
        "prompt_tokens": pt,
        "output_tokens": ot,
        "queue_s": req["scheduled_ts"].to_numpy(np.float64) - q,
        "ttft_s": first - q,
        "tpot_s": np.where(out > 1, (last - first) / np.maximum(out - 1, 1), np.nan),
        "e2e_s": last - q,
        "prefill_s": first - req["scheduled_ts"].to_numpy(np.float64),
    })
    if "arrival_time" in req.columns:
        a = pd.to_numeric(req["arrival_time"], errors="coerce").to_numpy(np.float64)
        real["api_lag_s"] = arrival - (a - a[0])
    df = w.df.copy()
    df["arrival_s"] = arrival
    df["request_id"] = real["request_id"].to_numpy()
    workload = Workload(df.reset_index(drop=True), name=f"logged:{d.name}", hash_block_size=w.hash_block_size,
                        source=str(d / "workload.jsonl"),
                        notes=[*w.notes, "arrivals = engine receipt times (requests.jsonl queued_ts)"])
    ts = None
    if (d / "timeseries.csv").is_file():
        ts = pd.read_csv(d / "timeseries.csv")
    return LoggedRun(d, engine, workload, real, ts, meta)


# -- simulating the logged run ----------------------------------------------------------------------

def scenario_for(run: LoggedRun, workload_path: Path, step_time: dict) -> dict:
    """A one-replica scenario mirroring the logged engine (its logged KV block count included)."""
    e = run.engine
    return {
        "name": f"from-logs:{run.directory.name}",
        "workload": {"trace": str(workload_path)},
        "cluster": {
            "replicas": 1, "gpu": e.gpu, "model": e.model, "tensor_parallel": e.tensor_parallel,
            "kv_cache_dtype": e.kv_cache_dtype,
            "engine": {
                "max_num_seqs": e.max_num_seqs, "max_num_batched_tokens": e.max_num_batched_tokens,
                "block_size": e.block_size, "enable_prefix_caching": e.enable_prefix_caching,
                "enable_chunked_prefill": e.enable_chunked_prefill, "num_gpu_blocks": e.num_gpu_blocks,
                "max_model_len": e.max_model_len, "scheduling_policy": e.scheduling_policy,
                "long_prefill_token_threshold": e.long_prefill_token_threshold,
                "scheduler_reserve_full_isl": e.scheduler_reserve_full_isl,
            },
            "step_time": step_time,
        },
        "router": {"policy": "round-robin"},
    }


def _aligned(sim_requests: pd.DataFrame, real: pd.DataFrame) -> pd.DataFrame:
    """Simulated per-request rows in the order of ``real``, with ``prefill_s = ttft_s - queue_s``."""
    df = sim_requests.set_index(sim_requests["request_id"].astype(str))
    df = df.reindex(real["request_id"].to_numpy()).reset_index(drop=True)
    df["prefill_s"] = df["ttft_s"] - df["queue_s"]
    return df


class _ShapeRecorder:
    """Wraps a step-time model and records every step's shape and duration (no fast-forward)."""

    def __init__(self, model):
        self.model = model
        self.name = f"recorded:{getattr(model, 'name', '?')}"
        self.rows: list[tuple] = []

    def step_time(self, shape: BatchShape) -> float:
        t = self.model.step_time(shape)
        self.rows.append((*linear_features(shape), t))
        return t


class LoggedRunSimulator:
    """Simulates a logged run again and again with different step-time models (built once)."""

    def __init__(self, run: LoggedRun, workdir: str | Path):
        import sim
        from sim.build import build_cluster_config
        from traces.formats import native

        self.run = run
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workload_path = self.workdir / "workload.parquet"
        native.write(run.workload, self.workload_path)
        self.scenario = sim.load_scenario(scenario_for(run, self.workload_path, {"model": "roofline"}))
        self.cfg, self.deployment = build_cluster_config(self.scenario)
        self.evaluations = 0
        self.sim_wall_s = 0.0

    def simulate(self, step_model, *, fast_forward: bool = True) -> pd.DataFrame:
        """Per-request simulated timings, in the order of ``run.real``."""
        from policies.registry import make_router
        from sim.cluster import Cluster

        cfg = dataclasses.replace(self.cfg, make_step_model=lambda: step_model, router=make_router("round-robin"),
                                  engine_fast_forward=fast_forward, progress=False, on_progress=None)
        t = time.perf_counter()
        out = Cluster(cfg).run()
        self.sim_wall_s += time.perf_counter() - t
        self.evaluations += 1
        return _aligned(out.requests, self.run.real)

    def roofline_model(self):
        from sim.roofline import RooflineStepTime

        dep, c = self.deployment, self.scenario.cluster
        return RooflineStepTime(dep.model, dep.gpu, tensor_parallel=c.tensor_parallel, weight_dtype=c.weight_dtype,
                                kv_cache_dtype=c.kv_cache_dtype)

    def full_result(self, coefficients: dict[str, float]):
        """A complete :class:`sim.api.Result` (time series included) for the final report."""
        import sim

        return sim.run(scenario_for(self.run, self.workload_path, {"model": "linear",
                                                                   "coefficients": dict(coefficients)}))


def roofline_start(simulator: LoggedRunSimulator) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Linear coefficients fitted (relative NNLS) to the roofline model's step times on the steps of a
    roofline simulation of this very run; also returns those steps' feature rows and times."""
    from validation.fit import nnls_fit

    rec = _ShapeRecorder(simulator.roofline_model())
    simulator.simulate(rec, fast_forward=False)
    arr = np.asarray(rec.rows, np.float64)
    X, y = arr[:, :-1], arr[:, -1]
    coef = nnls_fit(X, y, relative=True)
    coef[0] = max(coef[0], 1e-6)
    return {k: float(v) for k, v in zip(LINEAR_FEATURES, coef)}, X, y


# -- objective and errors ---------------------------------------------------------------------------

def split_mask(n: int, split: Split) -> np.ndarray:
    """True = a *fit* request. ``halves``: the first half by arrival; ``alternate``: even rows."""
    if split == "halves":
        return np.arange(n) < (n + 1) // 2
    if split == "alternate":
        return np.arange(n) % 2 == 0
    raise ConfigError(f"--split: expected halves or alternate, got {split!r}")


def quantile_residuals(sim_df: pd.DataFrame, real: pd.DataFrame, mask: np.ndarray,
                       quantiles: Sequence[float] = FIT_QUANTILES) -> np.ndarray:
    """``log(sim_q / real_q)`` for TTFT, TPOT, E2E at ``quantiles``, over the ``mask`` requests.

    A simulated request that did not complete makes every residual of its metric large (it must
    never look like a good fit)."""
    res = []
    ok = (sim_df["status"] == "completed").to_numpy() if "status" in sim_df else np.ones(len(sim_df), bool)
    for m in FIT_METRICS:
        r = real[f"{m}_s"].to_numpy(np.float64)[mask]
        s = sim_df[f"{m}_s"].to_numpy(np.float64)[mask]
        good = np.isfinite(r) & (r > 0)
        if not ok[mask].all():
            res.extend([5.0] * len(quantiles))
            continue
        rq = np.quantile(r[good], quantiles)
        sq = np.quantile(np.where(np.isfinite(s) & (s > 0), s, np.inf)[good], quantiles)
        res.extend(np.log(np.clip(sq / rq, 1e-6, 1e6)))
    return np.asarray(res, np.float64)


def request_residuals(sim_df: pd.DataFrame, real: pd.DataFrame, mask: np.ndarray) -> np.ndarray:
    """Per request of ``mask``: ``log((sim + tau) / (real + tau))`` for TTFT, TPOT and E2E, where tau is
    the measured median TPOT (one step): a TTFT of a few steps is not weighed like a minute of queueing.

    Unlike quantiles, these move continuously with the coefficients until two events swap order, so
    the finite-difference Jacobian sees slopes instead of the jumps of a quantile of a few requests.
    A request that did not complete in the simulation gets a large residual."""
    tau = float(np.nanmedian(real["tpot_s"].to_numpy(np.float64)[mask]))
    tau = tau if math.isfinite(tau) and tau > 0 else 1e-3
    ok = (sim_df["status"] == "completed").to_numpy()[mask] if "status" in sim_df else np.ones(int(mask.sum()), bool)
    out = []
    for m in FIT_METRICS:
        r = real[f"{m}_s"].to_numpy(np.float64)[mask]
        s = sim_df[f"{m}_s"].to_numpy(np.float64)[mask]
        v = np.log((np.where(np.isfinite(s), s, 1e6) + tau) / (np.where(np.isfinite(r), r, 0.0) + tau))
        v = np.where(ok, v, 5.0)
        out.append(np.where(np.isfinite(r), v, 0.0))
    return np.concatenate(out)


def _pcts(v: np.ndarray) -> dict:
    v = v[np.isfinite(v)]
    return {q: (float(np.percentile(v, q)) if len(v) else float("nan")) for q in (50, 90, 99)}


def error_table(sim_df: pd.DataFrame, real: pd.DataFrame, mask: np.ndarray) -> dict:
    """Real / sim / ``sim/real - 1`` for each of :data:`REPORT_METRICS` over the ``mask`` requests,
    plus the median per-request |error| of each latency (how well single requests are placed)."""
    out: dict = {"requests": int(mask.sum()), "real": {}, "sim": {}, "error": {}, "request_median_abs_error": {}}
    for m in TABLE_METRICS:
        r = real[f"{m}_s"].to_numpy(np.float64)[mask]
        s = sim_df[f"{m}_s"].to_numpy(np.float64)[mask]
        pr, ps = _pcts(r), _pcts(s)
        for q in (50, 90, 99):
            k = f"{m}_p{q}"
            out["real"][k], out["sim"][k] = pr[q], ps[q]
            out["error"][k] = ps[q] / pr[q] - 1.0 if pr[q] > 0 and math.isfinite(ps[q]) else None
        good = np.isfinite(r) & np.isfinite(s) & (r > 0)
        out["request_median_abs_error"][m] = float(np.median(np.abs(s[good] / r[good] - 1))) if good.any() else None
    out["failed_in_sim"] = int((sim_df["status"].to_numpy()[mask] != "completed").sum())
    return out


def median_abs(err: dict, keys: Sequence[str] = CONTRACT_METRICS) -> float | None:
    vals = [abs(err[k]) for k in keys if err.get(k) is not None]
    return float(np.median(vals)) if vals else None


# -- the search -------------------------------------------------------------------------------------

@dataclass
class SearchResult:
    coefficients: dict[str, float]
    start: dict[str, float]  # roofline-derived
    stage1_scale: float  # the common factor stage 1 found
    objective_start: float  # RMS of the fit residuals at the roofline start
    objective_stage1: float
    objective: float  # at the result
    evaluations: int
    method: str
    ridge: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (evaluation, objective) improvements


class _BudgetExhausted(Exception):
    """Raised inside the optimiser when the simulation budget is spent (the best point so far wins)."""


class _Objective:
    """Residuals of the fit requests as a function of the scaled coefficients ``x`` (``c = ref * x``)."""

    def __init__(self, simulator: LoggedRunSimulator, mask: np.ndarray, ref: np.ndarray, active: np.ndarray,
                 budget: int, objective: str = "requests"):
        self.sim = simulator
        self.objective = objective
        self.budget = budget
        self.mask = mask
        self.ref = ref
        self.active = active  # features the run exercises (others stay at 0)
        self.cache: dict[tuple, np.ndarray] = {}
        self.history: list[tuple[int, float]] = []
        self._best = math.inf

    def coefficients(self, x: np.ndarray) -> np.ndarray:
        c = np.zeros(len(LINEAR_FEATURES))
        c[self.active] = self.ref[self.active] * np.maximum(np.asarray(x, np.float64), 0.0)
        c[0] = max(c[0], 1e-6)  # LinearStepTime needs a positive per-step constant
        return c

    def residuals(self, x: np.ndarray) -> np.ndarray:
        key = tuple(np.round(np.asarray(x, np.float64), 12))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        if self.sim.evaluations >= self.budget:
            raise _BudgetExhausted
        c = self.coefficients(x)
        df = self.sim.simulate(LinearStepTime(dict(zip(LINEAR_FEATURES, c)), source="<search>"))
        real = self.sim.run.real
        q = quantile_residuals(df, real, self.mask)
        if self.objective == "quantiles":
            r = q
        else:  # "requests": per-request residuals, plus the quantiles so the distribution's shape counts
            pr = request_residuals(df, real, self.mask)
            r = np.concatenate([pr * math.sqrt(len(q) / len(pr)), q])
        self.cache[key] = r
        v = _rms(r)
        if v < self._best:
            self._best = v
            self.history.append((self.sim.evaluations, v))
        return r


def _rms(r: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(r) ** 2)))


def search(simulator: LoggedRunSimulator, mask: np.ndarray, *, method: Method = "nelder-mead",
           max_evaluations: int = 120, ridge: float = 0.005, diff_step: float = 0.03,
           start: dict[str, float] | None = None, objective: Objective = "requests",
           log: Callable[[str], None] = lambda s: None) -> SearchResult:
    """Fit the coefficients to the ``mask`` requests' timings (module docstring, step 4).

    Parametrisation: ``c_k = ref_k * x_k`` with ``ref_k = mean step time / mean feature_k`` over the
    roofline simulation's steps, so ``x_k = 0.1`` means "term k is worth 10% of a mean step" for every
    k: finite differences (``diff_step`` in those units) and the ridge then weigh all terms alike,
    and a coefficient that starts at 0 can grow (a log-parametrisation cannot leave 0, and moves a
    small coefficient by a tiny absolute amount). ``x >= 0`` (bounds) keeps every term a cost.

    ``max_evaluations`` bounds the number of simulations (stage 1 takes up to 12 of them);
    ``ridge`` weighs ``sum((x - x_stage1)^2)`` against the mean squared residual.
    """
    from scipy.optimize import least_squares, minimize, minimize_scalar

    if max_evaluations < 4:
        raise ConfigError(f"max_evaluations must be >= 4, got {max_evaluations}")
    if objective not in ("requests", "quantiles"):
        raise ConfigError(f"objective: expected requests or quantiles, got {objective!r}")
    budget_end = simulator.evaluations + max_evaluations  # the roofline recording run counts too
    if start is None:
        start, X, y = roofline_start(simulator)
    else:
        X, y = np.ones((1, len(LINEAR_FEATURES))), np.array([sum(start.values())])
    c0 = np.array([start[k] for k in LINEAR_FEATURES], np.float64)
    # A feature the run never exercises cannot be fitted: it stays at 0 (const is always active).
    active = (X != 0).any(axis=0)
    active[0] = True
    ref = float(y.mean()) / np.maximum(X.mean(axis=0), 1e-300)
    obj = _Objective(simulator, mask, ref, active, budget_end, objective)
    x_start = (c0 / ref)[active]
    f_start = _rms(obj.residuals(x_start))
    log(f"  roofline start: objective {f_start:.3f} (RMS log residual of the fit requests)")

    # Stage 1: one common factor (its own small budget, shared cache).
    obj.budget = min(budget_end, simulator.evaluations + min(12, max(2, max_evaluations // 3)))  # stage 1's share
    try:
        minimize_scalar(lambda ls: _rms(obj.residuals(x_start * math.exp(ls))),
                        bounds=(math.log(1 / 8), math.log(8)), method="bounded", options={"xatol": 0.01, "maxiter": 12})
    except _BudgetExhausted:
        pass
    obj.budget = budget_end
    # the best common factor evaluated (Brent's last point is not always its best)
    f1, x1 = min((_rms(r), k) for k, r in obj.cache.items())
    x1 = np.array(x1)
    scale1 = float(np.sum(x1) / np.sum(x_start))
    log(f"  stage 1: common factor x{scale1:.3f}, objective {f1:.3f} ({simulator.evaluations} simulations)")

    lam = math.sqrt(ridge)
    lower = np.zeros(len(x1))
    lower[0] = 1e-6 / ref[0]

    def residuals(x):
        r = obj.residuals(x)
        return np.concatenate([r / math.sqrt(len(r)), lam * (np.asarray(x) - x1)])

    try:
        if method == "least_squares":
            least_squares(residuals, np.maximum(x1, lower + 1e-12), method="trf", bounds=(lower, np.inf),
                          diff_step=diff_step, x_scale=1.0, max_nfev=10 * max_evaluations, xtol=1e-4, ftol=1e-5)
        elif method == "nelder-mead":
            n = len(x1)
            simplex = np.vstack([x1] + [x1 + 0.05 * np.eye(n)[i] for i in range(n)])
            minimize(lambda x: float(np.sum(residuals(x) ** 2)), x1, method="Nelder-Mead",
                     bounds=[(lo, None) for lo in lower],
                     options={"initial_simplex": simplex, "maxfev": 10 * max_evaluations, "xatol": 1e-4,
                              "fatol": 1e-7})
        else:
            raise ConfigError(f"--method: expected least_squares or nelder-mead, got {method!r}")
    except _BudgetExhausted:
        log(f"  stage 2: simulation budget ({max_evaluations}) spent")
    # Pick by the penalised objective (what the optimiser minimises), among every point evaluated.
    cand = [(float(np.mean(r ** 2) + ridge * np.sum((np.array(k) - x1) ** 2)), k) for k, r in obj.cache.items()]
    x = np.array(min(cand)[1])
    c = obj.coefficients(x)
    f = _rms(obj.cache[tuple(np.round(x, 12))])
    log(f"  stage 2 ({method}): objective {f:.3f} after {simulator.evaluations} simulations")
    return SearchResult(
        coefficients={k: float(v) for k, v in zip(LINEAR_FEATURES, c)}, start=dict(start),
        stage1_scale=scale1, objective_start=f_start, objective_stage1=f1, objective=f,
        evaluations=simulator.evaluations, method=method, ridge=ridge, history=list(obj.history))


# -- the whole calibration --------------------------------------------------------------------------

@dataclass
class LogCalibration:
    run: LoggedRun
    search: SearchResult
    split: str
    tables: dict  # {"fit": ..., "heldout": ..., "all": ...} at the calibrated profile
    start_tables: dict  # the same at the roofline start
    timeseries: dict  # time-averaged gauges, real vs sim
    preemptions_sim: int
    prefix_hit_rate_sim: float | None
    profile: Path
    wall_s: float
    sim_requests: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)
    plots: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        held = self.tables["heldout"]
        return json_safe({
            "engine": "logs",
            "source": str(self.run.directory),
            "vllm_version": self.run.engine.vllm_version,
            "requests": int(len(self.run.real)),
            "split": self.split,
            "fit": {
                "method": self.search.method, "evaluations": self.search.evaluations,
                "objective_start": self.search.objective_start, "objective_stage1": self.search.objective_stage1,
                "objective": self.search.objective, "stage1_scale": self.search.stage1_scale,
                "ridge": self.search.ridge, "coefficients": self.search.coefficients,
                "start_coefficients": self.search.start, "fit_requests": self.tables["fit"]["requests"],
                "heldout_requests": held["requests"],
                "heldout_median_abs_error": median_abs(held["error"]),
            },
            "error": {k: held["error"].get(k) for k in CONTRACT_METRICS},
            "tables": self.tables,
            "roofline_start_tables": self.start_tables,
            "timeseries": self.timeseries,
            "preemptions_sim": self.preemptions_sim,
            "prefix_hit_rate_sim": self.prefix_hit_rate_sim,
            "engine_config": self.run.engine.to_dict(),
            "profile": str(self.profile),
            "plots": self.plots,
            "wall_s": self.wall_s,
        })


def _timeseries_comparison(run: LoggedRun, result) -> dict:
    """Time-averaged running / waiting / KV usage over the busy period, real (1 s gauges) vs sim."""
    ts = run.timeseries
    if ts is None or not {"t", "running", "waiting", "kv_cache_pct"} <= set(ts.columns):
        return {}
    sim_ts = result.timeseries
    sim_ts = sim_ts[sim_ts["replica"] == 0]
    # over the real gauges' span (their t counts seconds from the start of the run)
    real = {"running_mean": float(ts["running"].mean()), "waiting_mean": float(ts["waiting"].mean()),
            "kv_usage_mean": float(ts["kv_cache_pct"].mean() / 100.0), "span_s": float(ts["t"].max())}
    s = sim_ts[(sim_ts["time_s"] >= 1.0) & (sim_ts["time_s"] <= real["span_s"])]
    simd = {"running_mean": float(s["vllm:num_requests_running"].mean()),
            "waiting_mean": float(s["vllm:num_requests_waiting"].mean()),
            "kv_usage_mean": float(s["vllm:kv_cache_usage_perc"].mean()),
            "span_s": float(result.requests["finish_s"].max())}
    return {"real": real, "sim": simd}


def write_profile(path: Path, coefficients: dict[str, float], run: LoggedRun, fit: dict) -> Path:
    doc = {"form": "linear", "tensor_parallel": run.engine.tensor_parallel, "coefficients": coefficients,
           "engine": run.engine.to_dict(), "fit": {"from": "request logs (simulation-based search)",
                                                    "source": str(run.directory), **fit}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(doc), indent=1) + "\n")
    LinearStepTime.from_file(path)
    return path


def calibrate(directory: str | Path, out_dir: str | Path, *, split: Split = "halves",
              method: Method = "nelder-mead", max_evaluations: int = 120, ridge: float = 0.005,
              objective: Objective = "requests", log: Callable[[str], None] = lambda s: None) -> LogCalibration:
    """Load, mirror, search, cross-validate and write ``profile.json`` + ``report.json`` to ``out_dir``."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = load_logged_run(directory)
    e = run.engine
    log(f"logged run {run.directory}: {len(run.real)} requests, vLLM {e.vllm_version}, {e.model} on {e.gpu} "
        f"(TP{e.tensor_parallel}), block {e.block_size}, {e.num_gpu_blocks} KV blocks logged "
        f"({e.num_gpu_blocks_plan} by the memory plan), budget {e.max_num_batched_tokens}, max seqs {e.max_num_seqs}")
    for note in e.not_mirrored:
        log(f"  not mirrored: {note}")
    simulator = LoggedRunSimulator(run, out / "sim")
    mask = split_mask(len(run.real), split)
    res = search(simulator, mask, method=method, max_evaluations=max_evaluations, ridge=ridge, objective=objective,
                 log=log)
    final = simulator.full_result(res.coefficients)
    sim_df = _aligned(final.requests, run.real)
    start_df = simulator.simulate(LinearStepTime(res.start, source="<roofline start>"))
    parts = {"fit": mask, "heldout": ~mask, "all": np.ones(len(mask), bool)}
    tables = {k: error_table(sim_df, run.real, m) for k, m in parts.items()}
    start_tables = {k: error_table(start_df, run.real, m) for k, m in parts.items()}
    profile = write_profile(out / "profile.json", res.coefficients, run, {
        "split": split, "method": method, "objective": res.objective,
        "heldout_error": tables["heldout"]["error"]})
    plots = _plots(out, run, sim_df, start_df, mask)
    cal = LogCalibration(run, res, split, tables, start_tables, _timeseries_comparison(run, final),
                         int(final.summary.get("preemptions", 0)), final.summary.get("prefix_hit_rate"), profile,
                         time.perf_counter() - t0, sim_requests=sim_df, plots=plots)
    (out / "report.json").write_text(json.dumps(cal.to_json(), indent=1) + "\n")
    sim_df.to_parquet(out / "sim_requests.parquet", index=False)
    run.real.to_parquet(out / "real_requests.parquet", index=False)
    return cal


def _plots(out: Path, run: LoggedRun, sim_df: pd.DataFrame, start_df: pd.DataFrame, mask: np.ndarray) -> list[str]:
    from validation.plots import columns, plot_cdfs

    paths = []
    style = {"roofline start": {"color": "tab:gray", "lw": 1.0, "ls": ":"}}
    for name, m in (("all", None), ("heldout", ~mask)):
        p = plot_cdfs({"real": columns(run.real, m), "sim": columns(sim_df, m),
                       "roofline start": columns(start_df, m)}, out / f"cdf-{name}.png", styles=style,
                      title=f"{run.directory.name}: {name} requests, sim (calibrated from logs) vs real")
        if p is not None:
            paths.append(str(p))
    return paths


def format_table(cal: LogCalibration) -> str:
    """Plain-text error table: fit part, held-out part, all requests; roofline start for contrast."""
    cols = [("fit", cal.tables["fit"]), ("held-out", cal.tables["heldout"]), ("all", cal.tables["all"]),
            ("roofline start, all", cal.start_tables["all"])]
    lines = [f"{'metric':<12}" + "".join(f"{name:>28}" for name, _ in cols),
             f"{'':<12}" + "".join(f"{'real / sim / err':>28}" for _ in cols)]
    for k in REPORT_METRICS:
        row = f"{k:<12}"
        for _, t in cols:
            r, s, e = t["real"][k], t["sim"][k], t["error"][k]
            unit = 1000.0 if k.startswith("tpot") else 1.0
            fmt = (lambda v: f"{v * unit:.1f}") if k.startswith("tpot") else (lambda v: f"{v:.2f}")
            cell = f"{fmt(r)} / {fmt(s)} / " + (f"{e:+.1%}" if e is not None else "-")
            row += f"{cell:>28}"
        lines.append(row)
    lines.append(f"{'(ttft, e2e in s; tpot in ms)':<12}")
    cells = []
    for _, t in cols:
        med = t["request_median_abs_error"]
        cells.append(" / ".join("-" if med[m] is None else f"{med[m]:.0%}" for m in TABLE_METRICS))
    lines.append(f"{'req |err|':<12}" + "".join(f"{c:>28}" for c in cells)
                 + "   (median per-request |error|: ttft / tpot / e2e)")
    return "\n".join(lines)
