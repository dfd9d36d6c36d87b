"""Scenario ``workload:`` section -> :class:`traces.schema.Workload`.

Minimal first version (built-in Azure traces by name or path, and a Poisson synthetic spec);
the workloads issue extends it with every loader, generator and transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sim.errors import ConfigError
from traces.schema import Workload


class SyntheticSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arrival: Literal["poisson"] = "poisson"
    rate_per_s: float = Field(5.0, gt=0)
    num_requests: int = Field(200, gt=0)
    prompt_tokens: int = Field(1000, gt=0)
    output_tokens: int = Field(100, gt=0)


class WorkloadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trace: str | None = None
    format: str = "auto"
    rate_scale: float = Field(1.0, gt=0)
    window_s: tuple[float, float] | None = None
    max_requests: int | None = Field(None, gt=0)
    synthetic: SyntheticSpec | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.trace is None) == (self.synthetic is None):
            raise ValueError("give exactly one of 'trace' or 'synthetic'")
        return self


_BUILTIN_DIR = Path(__file__).parent / "data"
BUILTIN = {
    "azure2023-conv": "azure2023/AzureLLMInferenceTrace_conv.csv",
    "azure2023-code": "azure2023/AzureLLMInferenceTrace_code.csv",
}


def _load_azure_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    ts = pd.to_datetime(df["TIMESTAMP"], format="mixed")
    t = (ts - ts.iloc[0]).dt.total_seconds().to_numpy()
    return pd.DataFrame({
        "arrival_s": t,
        "prompt_tokens": df["ContextTokens"].astype("int64").clip(lower=1),
        "output_tokens": df["GeneratedTokens"].astype("int64").clip(lower=1),
    })


def build_workload(spec: WorkloadSpec, *, base_dir: Path | None = None, seed: int = 0) -> Workload:
    if spec.synthetic is not None:
        s = spec.synthetic
        rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])
        gaps = rng.exponential(1.0 / s.rate_per_s, size=s.num_requests)
        df = pd.DataFrame({
            "arrival_s": np.cumsum(gaps) - gaps[0],
            "prompt_tokens": np.full(s.num_requests, s.prompt_tokens, dtype=np.int64),
            "output_tokens": np.full(s.num_requests, s.output_tokens, dtype=np.int64),
        })
        w = Workload(df, name="synthetic-poisson", source="synthetic")
    else:
        name = spec.trace
        if name in BUILTIN:
            path = _BUILTIN_DIR / BUILTIN[name]
        else:
            path = Path(name)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
        if not path.exists():
            raise ConfigError(f"workload.trace: {name!r} is neither a built-in trace ({sorted(BUILTIN)}) nor a file")
        w = Workload(_load_azure_csv(path), name=str(name), source=str(path))
    df = w.df
    if spec.window_s is not None:
        a, b = spec.window_s
        df = df[(df["arrival_s"] >= a) & (df["arrival_s"] < b)].copy()
        df["arrival_s"] -= a
    if spec.rate_scale != 1.0:
        df = df.assign(arrival_s=df["arrival_s"] / spec.rate_scale)
    if spec.max_requests is not None:
        df = df.iloc[: spec.max_requests]
    w.df = df.reset_index(drop=True)
    return w
