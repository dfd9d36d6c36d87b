"""Scenario -> runnable cluster: resolve the catalog, plan KV memory, pick step-time models and policies."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sim.cluster import ClusterConfig, FailureConfig
from sim.engine import EngineConfig
from sim.errors import ConfigError
from sim.metrics import SLO
from sim.scenario import ColdStartSpec, Scenario
from sim.step_time import LinearStepTime


@dataclass
class Deployment:
    """The resolved per-replica deployment: what the summary reports about the hardware."""

    gpu: Any
    model: Any
    kv_plan: Any
    engine: EngineConfig
    usd_per_gpu_hour: float
    num_gpus: int


def _resolve_path(p: str, base_dir: str | None) -> Path:
    path = Path(p)
    if not path.is_absolute() and base_dir is not None and not path.exists():
        path = Path(base_dir) / path
    return path


def resolve_deployment(sc: Scenario) -> Deployment:
    from sim.catalog import load_catalog
    from sim.memory import default_engine_limits, plan_kv

    c = sc.cluster
    cat = load_catalog([_resolve_path(f, sc.base_dir) for f in sc.catalog.files])
    gpu = cat.gpu(c.gpu)
    model = cat.model(c.model)
    e = c.engine
    d_tokens, d_seqs = default_engine_limits(gpu)
    max_batched = e.max_num_batched_tokens or d_tokens
    max_seqs = e.max_num_seqs or d_seqs
    plan = plan_kv(model, gpu, tensor_parallel=c.tensor_parallel, weight_dtype=c.weight_dtype,
                   kv_cache_dtype=c.kv_cache_dtype, block_size=e.block_size,
                   gpu_memory_utilization=e.gpu_memory_utilization, max_num_batched_tokens=max_batched,
                   max_num_seqs=max_seqs, num_gpu_blocks_override=e.num_gpu_blocks, max_model_len=e.max_model_len)
    if not e.enable_chunked_prefill and max_batched < plan.max_model_len:
        # vLLM refuses this combination too: a prompt longer than the budget could never be scheduled.
        raise ConfigError(
            f"cluster.engine.max_num_batched_tokens ({max_batched}) is smaller than max_model_len "
            f"({plan.max_model_len}) with chunked prefill disabled; raise it or lower max_model_len")
    engine = EngineConfig(
        num_gpu_blocks=plan.num_gpu_blocks, block_size=e.block_size, max_num_batched_tokens=max_batched,
        max_num_seqs=max_seqs, max_model_len=plan.max_model_len, enable_chunked_prefill=e.enable_chunked_prefill,
        enable_prefix_caching=e.enable_prefix_caching, scheduling_policy=e.scheduling_policy,
        watermark=e.watermark, long_prefill_token_threshold=e.long_prefill_token_threshold,
        scheduler_reserve_full_isl=e.scheduler_reserve_full_isl)
    price = c.usd_per_gpu_hour if c.usd_per_gpu_hour is not None else gpu.usd_per_hour
    return Deployment(gpu, model, plan, engine, float(price), c.tensor_parallel)


def make_step_model_factory(sc: Scenario, dep: Deployment):
    st = sc.cluster.step_time
    c = sc.cluster
    if st.model == "linear":
        if st.profile and st.coefficients:
            raise ConfigError("cluster.step_time: give either 'profile' or 'coefficients', not both")
        if st.profile:
            model = LinearStepTime.from_file(_resolve_path(st.profile, sc.base_dir))
        elif st.coefficients:
            model = LinearStepTime(st.coefficients, source="cluster.step_time.coefficients",
                                   tensor_parallel=c.tensor_parallel)
        else:
            raise ConfigError("cluster.step_time: model 'linear' needs 'profile' (a JSON file) or 'coefficients'")
        if model.tensor_parallel != c.tensor_parallel:
            raise ConfigError(f"cluster.step_time.profile: measured at tensor_parallel={model.tensor_parallel} "
                              f"but the cluster uses tensor_parallel={c.tensor_parallel}")
        if st.params:
            raise ConfigError("cluster.step_time.params: only the roofline model takes params")
        return lambda: model  # stateless: safe to share across replicas
    from sim.roofline import RooflineStepTime

    try:
        model = RooflineStepTime(dep.model, dep.gpu, tensor_parallel=c.tensor_parallel,
                                 weight_dtype=c.weight_dtype, kv_cache_dtype=c.kv_cache_dtype, **st.params)
    except TypeError as e:
        raise ConfigError(f"cluster.step_time.params: {e}") from None
    return lambda: model


def make_cold_start(spec, where: str = "cluster.cold_start_s") -> Any:
    """A sampler ``rng -> seconds`` from a number, a preset name or a :class:`ColdStartSpec`."""
    if spec is None:
        return lambda rng: 0.0
    if isinstance(spec, (int, float)):
        if spec < 0:
            raise ConfigError(f"{where}: must be >= 0")
        v = float(spec)
        return lambda rng: v
    from policies.cold_start import ColdStartDistribution

    if isinstance(spec, ColdStartSpec):
        spec = spec.model_dump()
    return ColdStartDistribution.from_config(spec, where=where).sample


def build_cluster_config(sc: Scenario, *, progress: bool = False) -> tuple[ClusterConfig, Deployment]:
    from policies.registry import make_autoscaler, make_router
    from traces.config import build_workload

    dep = resolve_deployment(sc)
    workload = build_workload(sc.workload, base_dir=Path(sc.base_dir) if sc.base_dir else None, seed=sc.seed,
                              max_model_len=dep.engine.max_model_len)
    router = make_router(sc.router.policy, **sc.router.params)
    a = sc.autoscaler
    autoscaler = None
    min_r, max_r = 0, 1_000_000
    if a.policy != "none":
        params = dict(a.params)
        autoscaler = make_autoscaler(a.policy, min_replicas=a.min_replicas if a.min_replicas is not None else 1,
                                     max_replicas=a.max_replicas if a.max_replicas is not None else max(sc.cluster.replicas, 1) * 4,
                                     **params)
        min_r = a.min_replicas if a.min_replicas is not None else 1
        max_r = a.max_replicas if a.max_replicas is not None else max(sc.cluster.replicas, 1) * 4
        if min_r > max_r:
            raise ConfigError(f"autoscaler: min_replicas ({min_r}) > max_replicas ({max_r})")
    elif a.params or a.min_replicas is not None or a.max_replicas is not None:
        raise ConfigError("autoscaler: policy 'none' takes no parameters (set autoscaler.policy first)")
    cold, cold_where = ((a.cold_start_s, "autoscaler.cold_start_s") if a.cold_start_s is not None
                        else (sc.cluster.cold_start_s, "cluster.cold_start_s"))
    admission = None
    if sc.admission:
        from policies.admission import make_admission

        admission = make_admission(**sc.admission)
    f = sc.cluster.failures
    inject = []
    for k, item in enumerate(f.inject):
        if set(item) != {"replica", "at_s"}:
            raise ConfigError(f"cluster.failures.inject[{k}]: expected keys replica and at_s")
        inject.append((int(item["replica"]), float(item["at_s"])))
    slo = SLO(sc.slo.ttft_s, sc.slo.tpot_s, sc.slo.e2e_s)
    cfg = ClusterConfig(
        workload=workload, engine=dep.engine, make_step_model=make_step_model_factory(sc, dep), router=router,
        replicas=sc.cluster.replicas, num_gpus_per_replica=dep.num_gpus, usd_per_gpu_hour=dep.usd_per_gpu_hour,
        staleness_s=sc.router.staleness_s, autoscaler=autoscaler, min_replicas=min_r, max_replicas=max_r,
        cold_start=make_cold_start(cold, cold_where), initial_cold_start=sc.cluster.initial_cold_start, admission=admission,
        failures=FailureConfig(mtbf_s=f.mtbf_s, inject=inject, on_failure=f.on_failure,
                               max_retries=f.max_retries, replace=f.replace),
        sample_interval_s=sc.metrics.sample_interval_s, slo=slo, seed=sc.seed, progress=progress,
        closed_loop=sc.workload.closed_loop, engine_fast_forward=sc.cluster.engine_fast_forward)
    return cfg, dep
