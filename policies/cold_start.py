"""Cold start as a distribution: how long a new replica takes from "scale up" to serving.

A cold start is the sum of independent parts (reference-serving-systems.md C.7):

- ``provision_s``: a node to run on (0 when one is free; 60-300 s to provision one; plus pod
  scheduling and image pull),
- ``weights_s``: loading weights (about 10 s from a hot page cache, 100 s and more downloading),
- ``compile_s``: torch.compile + CUDA-graph capture + engine init (20-150 s; much less with a warm
  compile cache),
- ``base_s``: any fixed remainder (a bare number given to :meth:`ColdStartDistribution.from_config`
  sets only this).

Each part is a distribution (:class:`Dist`): a number (constant), ``[low, high]`` (uniform), or
``{dist: fixed|constant|uniform|normal|lognormal, ...}`` with ``value`` / ``low, high`` / ``mean, sd`` /
``median, sigma``, optionally with ``p``, the probability that the part happens at all (e.g.
provisioning only when no warm node is free). Normal draws are clipped at 0. Sampling takes the
caller's ``numpy.random.Generator`` (the cluster's cold-start stream), so runs are reproducible.

Presets (:meth:`ColdStartDistribution.from_config` with a name):

- ``reference``: the reference's suggested distribution: provisioning p=0.5 x U(60, 300), weights
  U(10, 120), compile U(20, 150).
- ``warm``: a free node, hot weights, warm compile cache (vllm#20264: weights 0.9 s, compile 7.5 s,
  graphs 17 s, first response about 59 s): weights U(1, 15), compile U(25, 60).
- ``new-node``: every replica needs a node and a weight download (vllm#19824, 70B TP=8): provisioning
  U(60, 300), weights U(100, 300), compile U(60, 150).
- ``blis``: BLIS's calibrated node-to-serving delay, normal(240, 30) as ``base_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sim.errors import ConfigError


class Dist(BaseModel):
    """One cold-start part: ``dist`` with its parameters, happening with probability ``p``."""

    model_config = ConfigDict(extra="forbid")
    dist: Literal["constant", "fixed", "uniform", "normal", "lognormal"] = "constant"
    value: float | None = Field(None, ge=0)
    low: float | None = Field(None, ge=0)
    high: float | None = Field(None, ge=0)
    mean: float | None = Field(None, ge=0)
    sd: float | None = Field(None, ge=0)
    median: float | None = Field(None, gt=0)
    sigma: float | None = Field(None, ge=0)
    p: float = Field(1.0, ge=0, le=1)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, x: Any):
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return {"dist": "constant", "value": x}
        if isinstance(x, (list, tuple)) and len(x) == 2:
            return {"dist": "uniform", "low": x[0], "high": x[1]}
        if isinstance(x, dict) and x.get("dist") == "fixed":
            return {**x, "dist": "constant"}
        return x

    @model_validator(mode="after")
    def _needs(self):
        need = {
            "constant": ("value",),
            "uniform": ("low", "high"),
            "normal": ("mean", "sd"),
            "lognormal": ("median", "sigma"),
        }[self.dist]
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"dist {self.dist!r} needs {', '.join(need)} (missing {', '.join(missing)})")
        if self.dist == "uniform" and self.high < self.low:  # type: ignore[operator]
            raise ValueError(f"uniform needs low <= high (got {self.low}, {self.high})")
        return self

    def sample(self, rng: np.random.Generator) -> float:
        # Always draw the occurrence first so a part's p never shifts the other parts' draws.
        happens = rng.random() < self.p
        if self.dist == "constant":
            x = float(self.value)  # type: ignore[arg-type]
        elif self.dist == "uniform":
            x = float(rng.uniform(self.low, self.high))
        elif self.dist == "normal":
            x = max(0.0, float(rng.normal(self.mean, self.sd)))
        else:
            x = float(self.median * np.exp(self.sigma * rng.standard_normal()))  # type: ignore[operator]
        return x if happens else 0.0

    def mean_s(self) -> float:
        """Expected value (clipping of the normal at 0 ignored; negligible for sd << mean)."""
        if self.dist == "constant":
            m = float(self.value)  # type: ignore[arg-type]
        elif self.dist == "uniform":
            m = (self.low + self.high) / 2  # type: ignore[operator]
        elif self.dist == "normal":
            m = float(self.mean)  # type: ignore[arg-type]
        else:
            m = float(self.median * np.exp(self.sigma**2 / 2))  # type: ignore[operator]
        return self.p * m


@dataclass(frozen=True, slots=True)
class ColdStartSample:
    provision_s: float
    weights_s: float
    compile_s: float
    base_s: float

    @property
    def total_s(self) -> float:
        return self.provision_s + self.weights_s + self.compile_s + self.base_s


class ColdStartDistribution(BaseModel):
    """The cold-start distribution of one replica type (see module docstring)."""

    model_config = ConfigDict(extra="forbid")
    provision_s: Dist = Field(default_factory=lambda: Dist(value=0))
    weights_s: Dist = Field(default_factory=lambda: Dist(value=0))
    compile_s: Dist = Field(default_factory=lambda: Dist(value=0))
    base_s: Dist = Field(default_factory=lambda: Dist(value=0))

    def sample_parts(self, rng: np.random.Generator) -> ColdStartSample:
        """One draw of every part (always in the same order, so draws are reproducible)."""
        return ColdStartSample(
            self.provision_s.sample(rng), self.weights_s.sample(rng), self.compile_s.sample(rng), self.base_s.sample(rng)
        )

    def sample(self, rng: np.random.Generator) -> float:
        """Total cold-start seconds of one new replica."""
        return self.sample_parts(rng).total_s

    def mean_s(self) -> float:
        return sum(d.mean_s() for d in (self.provision_s, self.weights_s, self.compile_s, self.base_s))

    @classmethod
    def from_spec(cls, spec: dict, where: str = "cold_start_s") -> "ColdStartDistribution":
        """From a mapping of parts (e.g. the scenario's ``ColdStartSpec.model_dump()``)."""
        return cls.from_config(dict(spec), where)

    @classmethod
    def from_config(cls, x: Any, where: str = "cold_start_s") -> "ColdStartDistribution":
        """A number (constant seconds), a preset name, or a mapping of parts."""
        if isinstance(x, ColdStartDistribution):
            return x
        if isinstance(x, bool):
            raise ConfigError(f"{where}: expected seconds, a preset {sorted(PRESETS)} or a mapping (got {x!r})")
        if isinstance(x, (int, float)):
            if x < 0:
                raise ConfigError(f"{where}: must be >= 0 (got {x!r})")
            return cls(base_s=Dist(value=float(x)))
        if isinstance(x, str):
            if x not in PRESETS:
                raise ConfigError(f"{where}: unknown preset {x!r}; known: {sorted(PRESETS)}")
            return cls.model_validate(PRESETS[x])
        try:
            return cls.model_validate(x)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ()))
            msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
            raise ConfigError(f"{where}{'.' + loc if loc else ''}: {msg}") from None


PRESETS: dict[str, dict] = {
    "reference": {"provision_s": {"dist": "uniform", "low": 60, "high": 300, "p": 0.5},
                  "weights_s": [10, 120], "compile_s": [20, 150]},
    "warm": {"weights_s": [1, 15], "compile_s": [25, 60]},
    "new-node": {"provision_s": [60, 300], "weights_s": [100, 300], "compile_s": [60, 150]},
    "blis": {"base_s": {"dist": "normal", "mean": 240, "sd": 30}},
}
