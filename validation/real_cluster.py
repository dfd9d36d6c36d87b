"""Cluster mode: N real vLLM servers behind fleetsim's *own* router objects, against the simulator.

``fleetsim validate --cluster N --routers round-robin,prefix-aware``. The question it answers is
the one a capacity planner asks the simulator: *which policy is better here?* So the same policy
objects (``policies.registry.make_router``) route a shared-prefix trace over real servers and over
simulated replicas, and the report says whether the simulator ranks the policies as reality does
(TTFT p50 / p90, prefix-cache hit rate), next to each router's real and simulated numbers.

Pieces:

- :class:`RealReplicaView` implements :class:`policies.base.ReplicaView` for a real server:
  ``num_running`` / ``num_waiting`` / ``kv_usage`` are scraped from its ``/metrics``
  (``vllm:num_requests_running``, ``vllm:num_requests_waiting``, ``vllm:kv_cache_usage_perc``)
  every ``scrape_period_s`` (so they are as stale as a real gateway's; the simulation mirrors
  that with ``router.staleness_s``); ``inflight_requests`` / ``inflight_tokens`` are client-side
  counters (exact, as in the simulator); ``cached_prefix_blocks`` answers from the client's record
  of the block hashes it sent to that server (an LRU the size of the server's KV cache). That is an
  approximation: vLLM evicts by its own LRU of free blocks, and a router that needs the *true*
  cache content ("precise" prefix routing) would have to subscribe to vLLM's KV-cache events
  (``--kv-events-config``, ZMQ ``BlockStored`` / ``BlockRemoved``), which this client does not do.
  The ``prefix-aware`` router's default ``approximate`` mode keeps its own index and does not ask.
- :func:`replay_cluster`: an asyncio open-loop client like :mod:`validation.replay`, but each
  request is routed at its send time by the router (``route`` -> ``on_routed``; ``on_finished``
  when its stream ends), and every server's ``/metrics`` is scraped.
- :func:`validate_cluster`: starts the servers (each pinned to its own core; the first compiles the
  model, the rest start from its compile cache), runs every router on the same workload (fresh
  token-id salt per run, so no run hits another's cache), reconstructs each server's steps from its
  own log, fits *one* linear profile on all of them, simulates each run (N replicas, the same router
  policy, actual send times as arrivals, mirrored engine config), and compares. Repeats
  (``repeats > 1``, interleaved A B A B) measure the real runs' noise, which the report states next
  to the gap between the routers; a diagnostic also simulates each run with a profile fitted on its
  own steps (the machine's speed during that run taken out). :func:`reanalyse_cluster` redoes the
  analysis from the saved runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from policies.base import ReplicaState, Router, RoutingRequest
from policies.routers.prefix_index import BlockLRU
from sim.errors import ConfigError, FleetsimError
from traces.schema import Workload
from validation.engine import EngineError, EngineInfo, EngineSpec, VllmServer, vllm_python
from validation.replay import (ReplayRequest, _run_coroutine, _send, build_requests, latency_columns,
                               parse_prometheus)

RANK_METRICS = ("ttft_p50", "ttft_p90", "prefix_hit_rate")  # hit rate: higher is better


# -- the view ----------------------------------------------------------------------------------------

class RealReplicaView:
    """A real vLLM server as a router sees it (see module docstring for what is exact and what not)."""

    def __init__(self, replica_id: int, url: str, *, num_total_blocks: int, block_size: int):
        self.replica_id = replica_id
        self.url = url
        self.state = ReplicaState.SERVING
        self.num_running = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.num_total_blocks = int(num_total_blocks)
        self.block_size = int(block_size)
        self.inflight_requests = 0
        self.inflight_tokens = 0
        self.scraped_at_s: float | None = None
        self.scrape_errors = 0
        self._sent = BlockLRU(self.num_total_blocks)

    @property
    def num_free_blocks(self) -> int:
        return int(round((1.0 - self.kv_usage) * self.num_total_blocks))

    def cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        """Leading ``block_hashes`` this client sent to the server recently enough that an LRU of the
        server's size would still hold them (not the server's true cache: that needs KV events)."""
        return self._sent.leading_match(block_hashes)

    # -- updates ----------------------------------------------------------------------------------
    def update_metrics(self, values: dict[str, float], t_s: float) -> None:
        self.num_running = int(values.get("vllm:num_requests_running", self.num_running))
        self.num_waiting = int(values.get("vllm:num_requests_waiting", self.num_waiting))
        self.kv_usage = float(values.get("vllm:kv_cache_usage_perc", self.kv_usage))
        self.scraped_at_s = t_s

    def on_sent(self, block_hashes: Sequence[int], tokens: int) -> None:
        self.inflight_requests += 1
        self.inflight_tokens += tokens
        self._sent.insert(block_hashes)

    def on_done(self, tokens: int) -> None:
        self.inflight_requests -= 1
        self.inflight_tokens -= tokens


# -- the client ----------------------------------------------------------------------------------------

@dataclass
class ClusterReplay:
    """``requests``: the columns of :class:`validation.replay.ReplayResult` plus ``replica``;
    ``metrics``: one row per scrape (t_s, replica, scraped values)."""

    requests: pd.DataFrame
    metrics: pd.DataFrame
    overhead: dict
    t0_wall: float
    duration_s: float


async def _scrape_loop(session, view: RealReplicaView, t0: float, period_s: float, rows: list[dict],
                       stop: asyncio.Event) -> None:
    import aiohttp

    while True:
        t = time.perf_counter() - t0
        try:
            async with session.get(view.url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                vals = parse_prometheus(await r.text())
            view.update_metrics(vals, t)
            rows.append({"t_s": t, "replica": view.replica_id, **vals})
        except Exception as e:  # noqa: BLE001 - a missed scrape is recorded, the view keeps old values
            view.scrape_errors += 1
            rows.append({"t_s": t, "replica": view.replica_id, "error": f"{type(e).__name__}: {e}"[:200]})
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=period_s)
        except asyncio.TimeoutError:
            pass


async def replay_cluster_async(views: list[RealReplicaView], requests: list[ReplayRequest],
                               routing: list[RoutingRequest], router: Router, *, model: str,
                               timeout_s: float = 300.0, scrape_period_s: float = 0.5) -> ClusterReplay:
    import aiohttp

    if len(routing) != len(requests):
        raise ValueError("one RoutingRequest per request")
    by_id = {v.replica_id: v for v in views}
    rows = [{"request_id": r.request_id, "arrival_s": r.arrival_s, "prompt_tokens": r.prompt_tokens,
             "output_tokens": r.output_tokens, "cached_tokens": None, "status": "not_sent", "reason": "",
             "replica": -1} for r in requests]
    metric_rows: list[dict] = []
    stop = asyncio.Event()
    cpu0 = time.process_time()
    lags = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        t0_wall = time.time()
        # one scrape of every server before the first request, so no router sees unset gauges
        scrapers = [asyncio.create_task(_scrape_loop(session, v, t0, scrape_period_s, metric_rows, stop))
                    for v in views]
        await asyncio.sleep(min(0.2, scrape_period_s))

        async def one(i: int) -> None:
            req, rreq, row = requests[i], routing[i], rows[i]
            now = time.perf_counter() - t0
            rid = router.route(rreq, [v for v in views if v.state == ReplicaState.SERVING], now)
            view = by_id.get(rid)
            if view is None:
                raise FleetsimError(f"router {router.name!r} chose replica {rid}, which does not exist")
            tokens = req.prompt_tokens + req.output_tokens
            view.on_sent(rreq.block_hashes, tokens)
            router.on_routed(rreq, rid, now)
            row["replica"] = rid
            try:
                await _send(session, view.url, model, req, t0, timeout_s, row)
            finally:
                view.on_done(tokens)
                router.on_finished(rreq, rid, time.perf_counter() - t0)

        tasks = []
        base = time.perf_counter()
        start_at = requests[0].arrival_s if requests else 0.0
        for i, req in enumerate(requests):
            target = req.arrival_s - start_at
            delay = target - (time.perf_counter() - base)
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append((time.perf_counter() - base) - target)
            rows[i]["arrival_s"] = target + (base - t0)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(*scrapers)
    cpu = time.process_time() - cpu0
    df = latency_columns(pd.DataFrame(rows))
    bad = df["status"] != "ok"
    df.loc[bad, ["ttft_s", "e2e_s", "tpot_s"]] = np.nan
    lag = np.asarray(lags) if lags else np.zeros(1)
    overhead = {"send_lag_p50_s": float(np.percentile(lag, 50)), "send_lag_p99_s": float(np.percentile(lag, 99)),
                "send_lag_max_s": float(lag.max()), "client_cpu_s": cpu,
                "client_cpu_util": cpu / duration if duration > 0 else float("nan"),
                "scrape_errors": int(sum(v.scrape_errors for v in views))}
    return ClusterReplay(df, pd.DataFrame(metric_rows), overhead, t0_wall, duration)


def replay_cluster(views, requests, routing, router, *, model: str, timeout_s: float = 300.0,
                   scrape_period_s: float = 0.5) -> ClusterReplay:
    """Blocking wrapper of :func:`replay_cluster_async` (works inside a running event loop too)."""
    return _run_coroutine(lambda: replay_cluster_async(views, requests, routing, router, model=model,
                                                       timeout_s=timeout_s, scrape_period_s=scrape_period_s))


def routing_requests(workload: Workload, block_size: int) -> list[RoutingRequest]:
    """What the simulator's cluster hands its router for each row (``sim.cluster._routing_request``):
    the prompt's full-block engine hashes (the simulator's own, ``sim.kv_cache.PromptBlockHashes``),
    tenant and session."""
    from sim.kv_cache import PromptBlockHashes

    ph = PromptBlockHashes(workload, block_size)
    df = workload.df
    pt = df["prompt_tokens"].to_numpy(np.int64)
    out = df["output_tokens"].to_numpy(np.int64)
    arr = df["arrival_s"].to_numpy(np.float64)
    tenant = df["tenant"].tolist() if workload.has("tenant") else [None] * len(df)
    session = df["session_id"].tolist() if workload.has("session_id") else [None] * len(df)
    opt = lambda v: None if v is None or (isinstance(v, float) and v != v) or v is pd.NA else str(v)  # noqa: E731
    return [RoutingRequest(request_id=i, arrival_s=float(arr[i]), prompt_tokens=int(pt[i]),
                           output_tokens=int(out[i]), block_hashes=ph(i)[0][: int(pt[i]) // block_size],
                           session_id=opt(session[i]), tenant=opt(tenant[i]))
            for i in range(len(df))]


# -- the plan --------------------------------------------------------------------------------------------

@dataclass
class ClusterPlan:
    """N tiny CPU engines and a shared-prefix workload where the router's choice matters.

    The default workload: ``system_prompts`` shared system prompts of ``system_prompt_tokens``
    tokens (uniform popularity) + a unique user part, so the prefix working set
    (``system_prompts * system_prompt_tokens``) is ~1.6x one server's KV cache and ~0.8x of two:
    round-robin sends every prompt everywhere and each server's LRU thrashes; a prefix-aware router
    can keep each prompt on one server.
    """

    replicas: int
    routers: list[str]
    engine: EngineSpec
    requests: int = 120
    rate_per_s: float = 4.0
    system_prompts: int = 20
    system_prompt_tokens: int = 640
    user_tokens: tuple[int, int] = (64, 128)
    output_tokens: tuple[int, int] = (16, 32)
    repeats: int = 1
    warmup_requests: int = 4
    scrape_period_s: float = 0.5
    timeout_s: float = 300.0
    seed: int = 0
    router_params: dict[str, dict] = field(default_factory=dict)

    @classmethod
    def quick(cls, replicas: int, routers: list[str], *, model: str = "tiny-llama", seed: int = 0) -> "ClusterPlan":
        """CI size: 120 requests per run, every router twice (A B A B): ~2.5 min of replays."""
        return cls(replicas=replicas, routers=list(routers), engine=_cluster_engine(model), requests=120, repeats=2,
                   seed=seed)

    @classmethod
    def full(cls, replicas: int, routers: list[str], *, model: str = "tiny-llama", seed: int = 0) -> "ClusterPlan":
        return cls(replicas=replicas, routers=list(routers), engine=_cluster_engine(model), requests=240,
                   repeats=3, seed=seed)

    def workload(self) -> Workload:
        from traces.config import WorkloadSpec, build_workload

        spec = {"synthetic": {
            "arrival": "poisson", "rate_per_s": self.rate_per_s, "num_requests": self.requests,
            "prompt_tokens": {"dist": "uniform", "min": self.user_tokens[0], "max": self.user_tokens[1]},
            "output_tokens": {"dist": "uniform", "min": self.output_tokens[0], "max": self.output_tokens[1]},
            "shared_prefix": {"prompts_per_tenant": self.system_prompts,
                              "system_prompt_tokens": self.system_prompt_tokens},
            "hash_block_size": self.engine.block_size}}
        w = build_workload(WorkloadSpec.model_validate(spec), seed=self.seed)
        return Workload(w.df, name="shared-system-prompts", hash_block_size=w.hash_block_size, source="synthetic",
                        notes=list(w.notes))


def _cluster_engine(model: str) -> EngineSpec:
    # 256 blocks of 32 tokens (8,192 tokens) per server: small enough that the shared prompts do not
    # all fit on one server (see ClusterPlan), large enough that running requests never run out.
    return EngineSpec(model=model, num_gpu_blocks_override=256, max_num_batched_tokens=512, max_num_seqs=32)


# -- the loop ----------------------------------------------------------------------------------------------

@dataclass
class RouterRun:
    router: str
    repeat: int
    replay: ClusterReplay
    steps: dict[int, pd.DataFrame]  # replica -> reconstructed steps
    steps_report: dict[int, dict]
    sim: dict | None = None
    real: dict | None = None
    sim_requests: pd.DataFrame | None = None


# A line the server logs once its model is compiled (and the compile cache written).
_COMPILED_MARK = "Warming up done"


def _launch_all(spec: EngineSpec, n: int, workdir: Path, log) -> list[VllmServer]:
    """Start ``n`` servers, server i pinned to core ``i % cpus`` (its OpenMP thread too).

    The first compiles the model and writes vLLM's torch.compile cache; the others start once that
    is done (they then load the cache instead of racing to write the same files) and in parallel.
    Every server started is shut down if any fails."""
    cpus = os.cpu_count() or 1
    specs = [spec.model_copy(update={"engine_cpus": str(i % cpus), "omp_threads_bind": str(i % cpus)})
             for i in range(n)]
    log(f"starting {n} vLLM servers ({spec.model}, {spec.num_gpu_blocks_override} blocks of {spec.block_size}, "
        f"budget {spec.max_num_batched_tokens}) on cores {', '.join(str(s.engine_cpus) for s in specs)} ...")
    servers: list[VllmServer] = []
    try:
        first = VllmServer.start(specs[0], workdir / "engine-0")
        servers.append(first)
        deadline = time.monotonic() + spec.startup_timeout_s
        while _COMPILED_MARK not in first.log_text() and first.alive() and time.monotonic() < deadline:
            time.sleep(1.0)
        for i, s in enumerate(specs[1:], 1):
            servers.append(VllmServer.start(s, workdir / f"engine-{i}"))
        for s in servers:
            s.wait_ready()
    except BaseException:
        for s in servers:
            s.shutdown()
        raise
    return servers


def _pcts(v: np.ndarray, prefix: str) -> dict:
    v = v[np.isfinite(v)]
    return {f"{prefix}_p{q}": (float(np.percentile(v, q)) if len(v) else float("nan")) for q in (50, 90, 99)}


def real_cluster_metrics(r: ClusterReplay, n: int) -> dict:
    df = r.requests
    ok = df[df["status"] == "ok"]
    out: dict = {}
    for col in ("ttft", "tpot", "e2e"):
        out.update(_pcts(ok[f"{col}_s"].to_numpy(np.float64), col))
    cached = pd.to_numeric(ok["cached_tokens"], errors="coerce")
    out["prefix_hit_rate"] = float(cached.sum() / ok["prompt_tokens"].sum()) if len(ok) else float("nan")
    out["share"] = [float((df["replica"] == i).mean()) for i in range(n)]
    out["requests"], out["failed"] = int(len(df)), int((df["status"] != "ok").sum())
    return out


def sim_cluster_metrics(res, n: int) -> dict:
    df = res.requests
    ok = df[df["status"] == "completed"]
    out: dict = {}
    for col in ("ttft", "tpot", "e2e"):
        out.update(_pcts(ok[f"{col}_s"].to_numpy(np.float64), col))
    out["prefix_hit_rate"] = float(ok["cached_tokens"].sum() / ok["prompt_tokens"].sum()) if len(ok) else float("nan")
    out["share"] = [float((df["replica"] == i).mean()) for i in range(n)]
    out["requests"], out["failed"] = int(len(df)), int((df["status"] != "completed").sum())
    return out


def ranking(values: dict[str, float], higher_is_better: bool = False) -> list[str]:
    """Router names from best to worst (ties keep input order)."""
    return sorted(values, key=lambda k: (-values[k] if higher_is_better else values[k]))


@dataclass
class ClusterReport:
    plan: dict
    engines: list[dict]
    runs: list[dict]  # per run: router, repeat, real, sim, error
    by_router: dict  # router -> {"real": mean over repeats, "sim": ..., "real_spread": ...}
    ranking: dict  # metric -> {"real": [...], "sim": [...], "match": bool, "real_gap": ..., "noise": ...}
    fit: dict
    profile: str
    overhead: dict
    wall_s: dict
    plots: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        from sim.api import json_safe

        err = {}
        for m in ("ttft_p50", "ttft_p90"):
            vals = [r["error"].get(m) for r in self.runs if r["error"].get(m) is not None]
            err[m] = max(vals, key=abs) if vals else None
        return json_safe({
            "engine": "vllm-cpu-cluster", "vllm_version": self.engines[0].get("vllm_version") if self.engines else None,
            "replicas": len(self.engines), "requests": int(sum(r["real"]["requests"] for r in self.runs)),
            "routers": list(self.by_router), "ranking": self.ranking,
            "ranking_matches": all(v["match"] for v in self.ranking.values()),
            "by_router": self.by_router, "runs": self.runs, "fit": self.fit, "error": err,
            "engine_config": self.engines, "plan": self.plan, "profile": self.profile,
            "client_overhead": self.overhead, "wall_s": self.wall_s, "plots": self.plots, "machine": self.machine,
        })


def simulate_cluster_run(run: RouterRun, workload: Workload, plan: ClusterPlan, info: EngineInfo, profile: Path,
                         workdir: Path):
    """Simulate one real run: N replicas, the same router policy, the actual send times as arrivals."""
    import sim
    from traces.formats import native
    from validation.workloads import with_arrivals

    req = run.replay.requests
    sent = req.set_index("request_id")["send_s"]
    ids = workload.df["request_id"].astype(str)
    arrivals = sent.reindex(ids).to_numpy(np.float64)
    arrivals = np.where(np.isnan(arrivals), workload.df["arrival_s"].to_numpy(), arrivals)
    w = with_arrivals(workload, arrivals - np.nanmin(arrivals))
    path = workdir / f"{run.router}-{run.repeat}.workload.parquet"
    native.write(w, path)
    scenario = {
        "name": f"validate-cluster:{run.router}", "seed": plan.seed,
        "workload": {"trace": str(path)},
        "cluster": {"replicas": plan.replicas, "gpu": "H100-80GB", "model": plan.engine.model, "tensor_parallel": 1,
                    "engine": {"max_num_seqs": info.max_num_seqs, "max_num_batched_tokens": info.max_num_batched_tokens,
                               "block_size": info.block_size, "enable_prefix_caching": bool(info.enable_prefix_caching),
                               "enable_chunked_prefill": bool(info.enable_chunked_prefill),
                               "num_gpu_blocks": info.num_gpu_blocks, "max_model_len": info.max_model_len},
                    "step_time": {"model": "linear", "profile": str(profile)}},
        "router": {"policy": run.router, "staleness_s": plan.scrape_period_s, **plan.router_params.get(run.router, {})},
    }
    return sim.run(scenario)


def validate_cluster(plan: ClusterPlan, out_dir: str | Path, *, log: Callable[[str], None] = print) -> ClusterReport:
    """The whole cluster-mode loop (module docstring). Artifacts go to ``out_dir``; the runs are saved
    so that :func:`reanalyse_cluster` can fit and simulate again without engines."""
    from policies.registry import make_router
    from sim.rng import stream
    from validation.measure import vocab_size_of
    from validation.steps import parse_iteration_log, reconstruct_shapes

    if plan.replicas < 1:
        raise ConfigError(f"--cluster: need at least 1 server, got {plan.replicas}")
    if not plan.routers:
        raise ConfigError("--routers: give at least one router policy")
    if Path(plan.engine.model).is_dir():
        raise ConfigError(f"--model: cluster mode needs a catalog model (the simulator mirrors it), got the "
                          f"directory {plan.engine.model}")
    for name in plan.routers:  # fail on a typo before starting engines
        make_router(name, **plan.router_params.get(name, {}))
    vllm_python()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    walls: dict = {}
    t_all = time.monotonic()
    machine = {"cpus": os.cpu_count(), "loadavg_start": _loadavg()}
    workload = plan.workload()
    vocab = vocab_size_of(plan.engine.model)
    servers = _launch_all(plan.engine, plan.replicas, out, log)
    runs: list[RouterRun] = []
    try:
        infos = [s.info for s in servers]
        walls["engine_start"] = [i.start_s for i in infos]
        log("engines ready: " + "; ".join(f"{i.url} ({i.num_gpu_blocks} blocks, start {i.start_s:.0f} s)"
                                          for i in infos))
        bs = infos[0].block_size
        for i in infos[1:]:
            if (i.block_size, i.num_gpu_blocks) != (bs, infos[0].num_gpu_blocks):
                raise EngineError("servers started with different block sizes or KV sizes; cannot mirror them")
        (out / "engines.json").write_text(json.dumps([i.to_dict() for i in infos], indent=1, default=str) + "\n")
        routing = routing_requests(workload, bs)
        # interleaved (A B A B ...): a slow spell of the machine then hits every router, and the
        # repeats show the run-to-run noise
        order = [(rep, name) for rep in range(plan.repeats) for name in plan.routers]
        warm = Workload(workload.df.iloc[: plan.warmup_requests].copy(), name="warmup",
                        hash_block_size=workload.hash_block_size)
        for rep, name in [(-1, "round-robin")] + order:
            label = "warmup" if rep < 0 else f"{name}-{rep}"
            w = warm if rep < 0 else workload
            seed = (plan.seed * 1_000_003 + zlib.crc32(label.encode())) & 0xFFFFFFFF  # fresh prefix cache per run
            reqs = build_requests(w, block_size=bs, vocab_size=vocab, seed=seed, max_model_len=infos[0].max_model_len)
            if rep < 0:
                reqs = [dataclasses.replace(r, arrival_s=0.0) for r in reqs]
            router = make_router(name, **plan.router_params.get(name, {}))
            router.rng = stream(plan.seed, "router")
            views = [RealReplicaView(k, s.url, num_total_blocks=int(s.info.num_gpu_blocks), block_size=bs)
                     for k, s in enumerate(servers)]
            offsets = [len(s.log_text()) for s in servers]
            t = time.monotonic()
            rr = replay_cluster(views, reqs, routing[: len(reqs)], router, model=infos[0].model,
                                timeout_s=plan.timeout_s, scrape_period_s=plan.scrape_period_s)
            time.sleep(0.5)  # let the API servers flush the last steps' log lines
            walls[label] = time.monotonic() - t
            dead = [k for k, s in enumerate(servers) if not s.alive()]
            if dead:
                raise EngineError(f"server(s) {dead} died during run {label}; logs "
                                  + ", ".join(servers[k].info.log_path or "?" for k in dead))
            if rep < 0:
                continue
            steps, reports = {}, {}
            for k, s in enumerate(servers):
                st = parse_iteration_log(s.log_text()[offsets[k]:])
                mine = rr.requests[rr.requests["replica"] == k]
                if len(st) and st["t_log"].notna().all() and len(mine):
                    st, rep_k = reconstruct_shapes(st, mine, rr.t0_wall)
                else:
                    rep_k = {"steps": int(len(st)), "steps_reconstructed": 0}
                steps[k], reports[k] = st, rep_k
            ok = int((rr.requests["status"] == "ok").sum())
            log(f"  {label}: {ok}/{len(rr.requests)} ok in {rr.duration_s:.1f} s; requests per server "
                + "/".join(str(int((rr.requests['replica'] == k).sum())) for k in range(plan.replicas)))
            run = RouterRun(name, rep, rr, steps, reports)
            _save_run(out / "runs" / label, run)
            runs.append(run)
    finally:
        for s in servers:
            s.shutdown()
    walls["engine_total"] = time.monotonic() - t_all
    machine["loadavg_end"] = _loadavg()
    return analyse_cluster(plan, out, infos, runs, workload=workload, walls=walls, machine=machine, log=log)


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None


def _save_run(d: Path, run: RouterRun) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rr = run.replay
    q = rr.requests.copy()
    q["token_times"] = q["token_times"].map(list)
    q.to_parquet(d / "requests.parquet", index=False)
    rr.metrics.to_csv(d / "metrics.csv", index=False)
    for k, st in run.steps.items():
        st.to_csv(d / f"steps-{k}.csv", index=False)
    (d / "run.json").write_text(json.dumps({
        "router": run.router, "repeat": run.repeat, "t0_wall": rr.t0_wall, "duration_s": rr.duration_s,
        "overhead": rr.overhead, "steps_report": {str(k): v for k, v in run.steps_report.items()}},
        indent=1, default=str) + "\n")


def _load_run(d: Path) -> RouterRun:
    meta = json.loads((d / "run.json").read_text())
    q = pd.read_parquet(d / "requests.parquet")
    q["token_times"] = q["token_times"].map(list)
    metrics = pd.read_csv(d / "metrics.csv") if (d / "metrics.csv").stat().st_size > 1 else pd.DataFrame()
    steps = {int(p.stem.split("-")[-1]): pd.read_csv(p) for p in sorted(d.glob("steps-*.csv"))}
    rr = ClusterReplay(q, metrics, meta["overhead"], meta["t0_wall"], meta["duration_s"])
    return RouterRun(meta["router"], int(meta["repeat"]), rr, steps,
                     {int(k): v for k, v in meta["steps_report"].items()})


def reanalyse_cluster(out_dir: str | Path, plan: ClusterPlan, *, log: Callable[[str], None] = print) -> ClusterReport:
    """Fit and simulate again from the runs :func:`validate_cluster` saved (no engines needed).
    ``plan`` must be the one the runs were made with."""
    out = Path(out_dir)
    infos = [EngineInfo(**d) for d in json.loads((out / "engines.json").read_text())]
    runs = [_load_run(out / "runs" / f"{name}-{rep}") for rep in range(plan.repeats) for name in plan.routers]
    prev = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return analyse_cluster(plan, out, infos, runs, walls=prev.get("wall_s", {}), machine=prev.get("machine", {}),
                           log=log)


def _fit_profile(runs: list[RouterRun], path: Path, engine: dict, seed: int):
    from validation.fit import fit_step_time, write_profile

    train = pd.concat([st for r in runs for st in r.steps.values() if "reconstructed" in st], ignore_index=True)
    if not len(train):
        raise FleetsimError("no reconstructed engine steps in any run: cannot fit a profile")
    fit = fit_step_time(train, target="cycle", seed=seed)
    return fit, write_profile(path, fit, engine)


def _decode_step_ms(run: RouterRun) -> float | None:
    """Median period of single-sequence decode steps over the run's servers: the machine's speed."""
    parts = [st[(st["prefill_tokens"] == 0) & (st["decode_seqs"] == 1)]["period_s"].dropna()
             for st in run.steps.values() if "prefill_tokens" in st]
    v = pd.concat(parts) if parts else pd.Series(dtype=float)
    return float(v.median() * 1000) if len(v) else None


def analyse_cluster(plan: ClusterPlan, out: Path, infos: list[EngineInfo], runs: list[RouterRun], *,
                    workload: Workload | None = None, walls: dict | None = None, machine: dict | None = None,
                    log: Callable[[str], None] = print) -> ClusterReport:
    """Fit the shared profile, simulate every run, rank the routers (module docstring)."""
    from validation.fit import feature_matrix, usable_steps

    t0 = time.monotonic()
    walls = dict(walls or {})
    workload = workload if workload is not None else plan.workload()
    # one profile from every server's steps of every run (the profile does not depend on the router)
    fit, profile = _fit_profile(runs, out / "profile.json", infos[0].to_dict(), plan.seed)
    coef = np.array(list(fit.coefficients.values()))
    per_replica = {}
    for k in range(plan.replicas):  # how different are the servers? (one core each, shared with the client)
        parts = [r.steps[k] for r in runs if k in r.steps and "reconstructed" in r.steps[k]]
        u = usable_steps(pd.concat(parts, ignore_index=True)) if parts else pd.DataFrame()
        if len(u):
            per_replica[k] = float(u["period_s"].sum() / (feature_matrix(u) @ coef).sum() - 1.0)
    log(f"fit on {fit.n_train} steps of {plan.replicas} servers: held-out step MAPE {fit.heldout_mape:.1%} "
        f"(10-step windows {fit.heldout_mape_window:.1%}); per-server bias "
        + ", ".join(f"{k}: {v:+.1%}" for k, v in per_replica.items()))

    simdir = out / "sim"
    simdir.mkdir(exist_ok=True)
    run_docs = []
    for r in runs:
        res = simulate_cluster_run(r, workload, plan, infos[0], profile, simdir)
        r.real, r.sim = real_cluster_metrics(r.replay, plan.replicas), sim_cluster_metrics(res, plan.replicas)
        r.sim_requests = res.requests
        # diagnostic: the same simulation with a profile fitted on this run's own steps, which takes
        # the machine's speed during this run out of the comparison (what is left is the policy and
        # engine dynamics); never the headline
        _, own = _fit_profile([r], simdir / f"profile-{r.router}-{r.repeat}.json", infos[0].to_dict(), plan.seed)
        sim_own = sim_cluster_metrics(simulate_cluster_run(r, workload, plan, infos[0], own, simdir), plan.replicas)
        u = usable_steps(pd.concat([st for st in r.steps.values() if "reconstructed" in st], ignore_index=True))
        bias = float(u["period_s"].sum() / (feature_matrix(u) @ coef).sum() - 1.0) if len(u) else None
        err = {k: (r.sim[k] / r.real[k] - 1.0 if r.real.get(k) and math.isfinite(r.real[k]) and r.real[k] > 0
                   else None) for k in ("ttft_p50", "ttft_p90", "tpot_p50", "e2e_p50", "e2e_p90")}
        run_docs.append({"router": r.router, "repeat": r.repeat, "real": r.real, "sim": r.sim, "error": err,
                         "sim_own_profile": sim_own, "decode_step_ms": _decode_step_ms(r),
                         "step_time_bias": bias, "steps": r.steps_report, "overhead": r.replay.overhead})

    by_router: dict = {}
    for name in plan.routers:
        mine = [d for d in run_docs if d["router"] == name]
        agg: dict = {"real": {}, "sim": {}, "sim_own_profile": {}, "real_spread": {}}
        for k in (*RANK_METRICS, "tpot_p50", "e2e_p50"):
            rv = [d["real"][k] for d in mine]
            agg["real"][k] = float(np.mean(rv))
            agg["sim"][k] = float(np.mean([d["sim"][k] for d in mine]))
            agg["sim_own_profile"][k] = float(np.mean([d["sim_own_profile"][k] for d in mine]))
            agg["real_spread"][k] = float(max(rv) - min(rv)) if len(rv) > 1 else None
        by_router[name] = agg
    ranks = {}
    for k in RANK_METRICS:
        hib = k == "prefix_hit_rate"
        real_v = {n: by_router[n]["real"][k] for n in plan.routers}
        sim_v = {n: by_router[n]["sim"][k] for n in plan.routers}
        own_v = {n: by_router[n]["sim_own_profile"][k] for n in plan.routers}
        rr_, sr_, or_ = ranking(real_v, hib), ranking(sim_v, hib), ranking(own_v, hib)
        gap = (max(real_v.values()) - min(real_v.values())) if len(real_v) > 1 else 0.0
        spreads = [by_router[n]["real_spread"][k] for n in plan.routers if by_router[n]["real_spread"][k] is not None]
        ranks[k] = {"real": rr_, "sim": sr_, "match": rr_ == sr_, "sim_own_profile": or_,
                    "match_own_profile": rr_ == or_, "real_values": real_v, "sim_values": sim_v,
                    "real_gap": gap, "real_noise": max(spreads) if spreads else None}
    plots = _cluster_plots(out, runs)
    walls["analysis"] = time.monotonic() - t0
    walls["total"] = walls.get("engine_total", 0.0) + walls["analysis"]
    report = ClusterReport(
        plan={"replicas": plan.replicas, "routers": plan.routers, "requests": plan.requests,
              "rate_per_s": plan.rate_per_s, "system_prompts": plan.system_prompts,
              "system_prompt_tokens": plan.system_prompt_tokens, "user_tokens": list(plan.user_tokens),
              "output_tokens": list(plan.output_tokens), "repeats": plan.repeats,
              "scrape_period_s": plan.scrape_period_s, "engine": plan.engine.model_dump()},
        engines=[i.to_dict() for i in infos], runs=run_docs, by_router=by_router, ranking=ranks,
        fit={"heldout_mape": fit.heldout_mape, "heldout_mape_window": fit.heldout_mape_window,
             "heldout_bias": fit.heldout_bias, "n_train": fit.n_train, "coefficients": fit.coefficients,
             "per_server_bias": per_replica},
        profile=str(profile), overhead={d["router"] + f"-{d['repeat']}": d["overhead"] for d in run_docs},
        wall_s=walls, plots=plots, machine=dict(machine or {}))
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=1, default=str) + "\n")
    return report


def _cluster_plots(out: Path, runs: list[RouterRun]) -> list[str]:
    from validation.plots import columns, plot_cdfs

    paths = []
    for r in runs:
        real = r.replay.requests[r.replay.requests["status"] == "ok"]
        simr = r.sim_requests[r.sim_requests["status"] == "completed"]
        p = plot_cdfs({"real": columns(real), "sim": columns(simr)}, out / f"cdf-{r.router}-{r.repeat}.png",
                      title=f"cluster: {r.router} (run {r.repeat}), sim vs real")
        if p is not None:
            paths.append(str(p))
    return paths


def format_cluster_table(report: ClusterReport) -> str:
    names = list(report.by_router)
    lines = [f"{'metric':<18}" + "".join(f"{n:>30}" for n in names),
             f"{'':<18}" + "".join(f"{'real / sim':>30}" for _ in names)]
    for k in ("ttft_p50", "ttft_p90", "tpot_p50", "e2e_p50", "prefix_hit_rate"):
        row = f"{k:<18}"
        for n in names:
            r, s = report.by_router[n]["real"][k], report.by_router[n]["sim"][k]
            cell = f"{r:.0%} / {s:.0%}" if k == "prefix_hit_rate" else f"{r * 1000:.0f} / {s * 1000:.0f} ms"
            row += f"{cell:>30}"
        lines.append(row)
    row = f"{'sim, own profile':<18}"
    for n in names:
        o = report.by_router[n]["sim_own_profile"]
        cell = "ttft p50 {:.0f} ms, hit {:.0%}".format(o["ttft_p50"] * 1000, o["prefix_hit_rate"])
        row += f"{cell:>30}"
    lines.append(row + "   (diagnostic: each run simulated with a profile fitted on its own steps)")
    lines.append("")
    for k, v in report.ranking.items():
        noise = v["real_noise"]
        lines.append(f"ranking by {k}: real {' > '.join(v['real'])}; sim {' > '.join(v['sim'])} -> "
                     f"{'SAME' if v['match'] else 'DIFFERENT'} (real gap {v['real_gap']:.3g}"
                     + (f", run-to-run noise {noise:.3g})" if noise is not None else ", noise not measured: 1 repeat)"))
    return "\n".join(lines)
