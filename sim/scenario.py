"""Scenario files: YAML validated with pydantic. Unknown keys are errors.

A scenario names a workload, a cluster (GPU, model, TP, engine knobs, step-time model), a router,
an autoscaler, SLOs and a seed. ``--set a.b.c=value`` overrides any key from the command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sim.errors import ConfigError
from traces.config import WorkloadSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EngineSpec(_Strict):
    """vLLM engine knobs (names as in vLLM's EngineArgs). ``None`` = vLLM's default for the GPU."""

    max_num_seqs: int | None = Field(None, gt=0)
    max_num_batched_tokens: int | None = Field(None, gt=0)
    block_size: int = Field(16, gt=0)
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_gpu_blocks: int | None = Field(None, ge=2)
    gpu_memory_utilization: float = Field(0.92, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0)
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    watermark: float = Field(0.0, ge=0, lt=1)
    long_prefill_token_threshold: int = Field(0, ge=0)
    # Admit a waiting request only if its whole prompt fits in free KV blocks (vLLM 0.32 default).
    scheduler_reserve_full_isl: bool = True


class StepTimeSpec(_Strict):
    model: Literal["roofline", "linear"] = "roofline"
    profile: str | None = None  # linear: path of the profile JSON
    coefficients: dict[str, float] | None = None  # linear: inline coefficients instead of a file
    params: dict[str, float] = Field(default_factory=dict)  # roofline: efficiency overrides


class ColdStartSpec(_Strict):
    """Cold start = provisioning + weight load + compile/graph capture (seconds, each >= 0).

    Each part is ``{dist: fixed|uniform|normal|lognormal, ...}`` or a number.
    """

    provision_s: float | dict[str, Any] = 0.0
    weights_s: float | dict[str, Any] = 0.0
    compile_s: float | dict[str, Any] = 0.0


class FailureSpec(_Strict):
    mtbf_s: float | None = Field(None, gt=0)
    inject: list[dict[str, float]] = Field(default_factory=list)  # [{replica: 0, at_s: 30}]
    on_failure: Literal["retry", "fail"] = "retry"
    max_retries: int = Field(2, ge=0)
    replace: bool = True


class ClusterSpec(_Strict):
    replicas: int = Field(2, ge=0)
    gpu: str = "H100-80GB"
    model: str = "llama-3.1-8b"
    tensor_parallel: int = Field(1, ge=1)
    weight_dtype: str = "bf16"
    kv_cache_dtype: str = "auto"
    engine: EngineSpec = Field(default_factory=EngineSpec)
    step_time: StepTimeSpec = Field(default_factory=StepTimeSpec)
    cold_start_s: float | str | ColdStartSpec = 0.0  # seconds, a preset name, or parts
    initial_cold_start: bool = False
    failures: FailureSpec = Field(default_factory=FailureSpec)
    usd_per_gpu_hour: float | None = Field(None, ge=0)  # override the catalog price
    # Exact fast-forward of steady decode runs (docs/performance.md); false = one event per step.
    engine_fast_forward: bool = True


class RouterSpec(BaseModel):
    """``policy`` plus that policy's own parameters inline (checked by the policy)."""

    model_config = ConfigDict(extra="allow")
    policy: str = "round-robin"
    staleness_s: float = Field(0.0, ge=0)

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class AutoscalerSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    policy: str = "none"
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    cold_start_s: float | str | ColdStartSpec | None = None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class SLOSpec(_Strict):
    ttft_s: float | None = Field(None, gt=0)
    tpot_s: float | None = Field(None, gt=0)
    e2e_s: float | None = Field(None, gt=0)


class MetricsSpec(_Strict):
    sample_interval_s: float = Field(1.0, gt=0)


class CatalogSpec(_Strict):
    files: list[str] = Field(default_factory=list)


class Scenario(_Strict):
    name: str = "scenario"
    seed: int = 0
    workload: WorkloadSpec = Field(default_factory=lambda: WorkloadSpec(trace="azure2023-conv"))
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    router: RouterSpec = Field(default_factory=RouterSpec)
    autoscaler: AutoscalerSpec = Field(default_factory=AutoscalerSpec)
    admission: dict[str, Any] | None = None
    slo: SLOSpec = Field(default_factory=SLOSpec)
    metrics: MetricsSpec = Field(default_factory=MetricsSpec)
    catalog: CatalogSpec = Field(default_factory=CatalogSpec)
    base_dir: str | None = Field(None, exclude=True)  # where relative paths resolve (the file's dir)

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if v < 0:
            raise ValueError("seed must be >= 0")
        return v

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


DEFAULT_SCENARIO: dict[str, Any] = {
    "name": "default: Azure 2023 conversation trace on 4x H100 / Llama-3.1-8B",
    "seed": 0,
    "workload": {"trace": "azure2023-conv"},
    "cluster": {"replicas": 4, "gpu": "H100-80GB", "model": "llama-3.1-8b", "tensor_parallel": 1},
    "router": {"policy": "round-robin"},
    "slo": {"ttft_s": 1.0, "tpot_s": 0.1},
}


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML: numbers, bools, lists...)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r}: expected KEY=VALUE with a dotted key, e.g. cluster.replicas=8")
        key, _, raw = ov.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {ov!r}: empty key")
        node = data
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {ov!r}: {p!r} is not a section")
            node = nxt
        val = _parse_value(raw)
        # Switching workload source: trace and synthetic are exclusive.
        wl = data.get("workload")
        if isinstance(wl, dict) and len(parts) >= 2 and parts[0] == "workload":
            if parts[1] == "trace":
                wl.pop("synthetic", None)
            elif parts[1] == "synthetic":
                wl.pop("trace", None)
        node[parts[-1]] = val
    return data


def _format_error(source: str, e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def load_scenario(source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None) -> Scenario:
    """Load and validate a scenario from a YAML path, a dict, or ``None`` (the built-in default)."""
    base_dir = None
    if source is None:
        import copy

        data = copy.deepcopy(DEFAULT_SCENARIO)
        label = "default scenario"
    elif isinstance(source, dict):
        import copy

        data = copy.deepcopy(source)
        label = "scenario"
    else:
        path = Path(source)
        label = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: scenario file not found") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read scenario: {e.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}{where}: invalid YAML: {problem}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a scenario must be a YAML mapping, got {type(data).__name__}")
        base_dir = str(path.resolve().parent)
    data = apply_overrides(data, list(overrides or []))
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(label, e)) from None
    sc.base_dir = base_dir
    return sc
