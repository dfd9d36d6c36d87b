"""Pydantic specs of the synthetic generators (the ``workload.synthetic`` scenario section).

The simple form ``{arrival: poisson, rate_per_s: 5, num_requests: 200, prompt_tokens: 1000,
output_tokens: 100}`` is a valid SyntheticSpec; every extension is an optional key. Lengths are
an int (fixed) or a ``{dist: ...}`` mapping. See docs/workloads.md for the full reference.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------ distributions
class FixedDist(_Spec):
    dist: Literal["fixed"]
    value: float = Field(gt=0)


class UniformDist(_Spec):
    dist: Literal["uniform"]
    min: float = Field(gt=0)
    max: float = Field(gt=0)

    @model_validator(mode="after")
    def _order(self):
        if self.max < self.min:
            raise ValueError("uniform: max must be >= min")
        return self


class LogNormalDist(_Spec):
    """Log-normal with the given mean and coefficient of variation (std/mean), optionally clipped."""

    dist: Literal["lognormal"]
    mean: float = Field(gt=0)
    cv: float = Field(gt=0)
    min: float | None = Field(None, gt=0)
    max: float | None = Field(None, gt=0)


class ExponentialDist(_Spec):
    dist: Literal["exponential"]
    mean: float = Field(gt=0)


class TraceDist(_Spec):
    """Lengths from a real trace (built-in name or file).

    ``fit: empirical`` (default) resamples the trace's values; ``fit: lognormal`` draws from a
    log-normal with the trace's mean and CV (smooth, and it extrapolates past the sample).
    ``field`` defaults to the role (prompt_tokens for prompts, output_tokens for outputs). When
    prompts and outputs resample the same trace empirically, (prompt, output) pairs are drawn
    jointly, keeping their correlation.
    """

    dist: Literal["trace"]
    trace: str
    format: str = "auto"
    field: Literal["prompt_tokens", "output_tokens"] | None = None
    fit: Literal["empirical", "lognormal"] = "empirical"


Dist = Annotated[Union[FixedDist, UniformDist, LogNormalDist, ExponentialDist, TraceDist], Field(discriminator="dist")]
TimeDist = Annotated[Union[FixedDist, UniformDist, LogNormalDist, ExponentialDist], Field(discriminator="dist")]
LengthSpec = Union[Annotated[int, Field(gt=0)], Dist]
TimeSpec = Union[Annotated[float, Field(ge=0)], TimeDist]


# ------------------------------------------------------------------------------- modulation
class BurstSpec(_Spec):
    """On/off bursts: ``on_s`` seconds at a high rate, ``off_s`` at ``off_rate_fraction`` of it.

    The long-run mean stays ``rate_per_s``. ``random: true`` draws each on/off duration from an
    exponential with these means (a two-state Markov-modulated Poisson process) instead.
    """

    on_s: float = Field(gt=0)
    off_s: float = Field(gt=0)
    off_rate_fraction: float = Field(0.0, ge=0, le=1)
    random: bool = False


class DiurnalSpec(_Spec):
    """Rate shape ``1 + amplitude * cos(2 pi (t - peak_s) / period_s)`` (mean 1)."""

    period_s: float = Field(86400.0, gt=0)
    amplitude: float = Field(0.5, ge=0, le=1)
    peak_s: float = 0.0


class RateCurveSpec(_Spec):
    """A time-varying rate: a ServeGen curve (built-in name or CSV path) or a diurnal sine.

    The curve is a *shape*: it is normalised to mean 1 over its span and multiplied by
    ``rate_per_s``, unless ``absolute: true`` (ServeGen only) uses its req/s at face value.
    ``speedup`` compresses curve time (speedup 60: one simulated second = one curve minute);
    ``start_s`` is the curve time at which the workload starts. Curves repeat past their end.
    """

    servegen: str | None = None
    diurnal: DiurnalSpec | None = None
    speedup: float = Field(1.0, gt=0)
    start_s: float = Field(0.0, ge=0)
    absolute: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.servegen is None) == (self.diurnal is None):
            raise ValueError("rate_curve: give exactly one of 'servegen' or 'diurnal'")
        if self.absolute and self.servegen is None:
            raise ValueError("rate_curve.absolute applies to servegen curves only")
        return self


class ArrivalSpec(_Spec):
    """An arrival process: a renewal process (Poisson, or Gamma with a CV) whose rate may be
    modulated by on/off bursts and/or a rate curve (time-rescaling of the renewal process)."""

    arrival: Literal["poisson", "gamma", "onoff"] = "poisson"
    rate_per_s: float = Field(5.0, gt=0)
    cv: float | None = Field(None, gt=0)
    burst: BurstSpec | None = None
    rate_curve: RateCurveSpec | None = None

    @model_validator(mode="after")
    def _arrival(self):
        if self.arrival == "gamma" and self.cv is None:
            raise ValueError("arrival: gamma needs cv (inter-arrival coefficient of variation)")
        if self.arrival != "gamma" and self.cv is not None:
            raise ValueError(f"cv applies to arrival: gamma, not {self.arrival}")
        if self.arrival == "onoff" and self.burst is None:
            raise ValueError("arrival: onoff needs a burst: {on_s, off_s} section")
        return self


class ServiceEstimate(_Spec):
    """Rough service time used to place follow-up turns open-loop (see docs: sessions)."""

    prefill_tokens_per_s: float = Field(8000.0, gt=0)
    s_per_output_token: float = Field(0.03, ge=0)


class SessionSpec(_Spec):
    """Multi-turn sessions: turn k+1 = turn k's prompt + its answer + a new user message,
    arriving think time after turn k's (estimated) completion."""

    turns: LengthSpec = 3
    think_time_s: TimeSpec = Field(default_factory=lambda: ExponentialDist(dist="exponential", mean=10.0))
    user_tokens: LengthSpec = 200
    service_estimate: ServiceEstimate = Field(default_factory=ServiceEstimate)


class SharedPrefixSpec(_Spec):
    """Shared system prompts as a prefix tree: tenants x prompts per tenant x user suffixes.

    A request picks a tenant, then one of its prompts; its prompt is the tenant prefix, then
    the system prompt, then a unique user part of ``prompt_tokens`` tokens.
    """

    tenants: int = Field(1, gt=0)
    prompts_per_tenant: int = Field(1, gt=0)
    tenant_prefix_tokens: Union[Annotated[int, Field(ge=0)], Dist] = 0
    system_prompt_tokens: LengthSpec = 1000
    tenant_popularity: Literal["uniform", "zipf"] = "uniform"
    prompt_popularity: Literal["uniform", "zipf"] = "uniform"
    zipf_s: float = Field(1.0, gt=0)


class SyntheticSpec(ArrivalSpec):
    """``workload.synthetic``: arrivals + lengths (+ sessions, shared prefixes)."""

    num_requests: int | None = Field(None, gt=0)
    duration_s: float | None = Field(None, gt=0)
    prompt_tokens: LengthSpec = 1000
    output_tokens: LengthSpec = 100
    sessions: SessionSpec | None = None
    shared_prefix: SharedPrefixSpec | None = None
    hash_block_size: int = Field(16, gt=0)

    @model_validator(mode="after")
    def _stop(self):
        if self.num_requests is None and self.duration_s is None:
            self.num_requests = 200
        return self


class RetimeSpec(ArrivalSpec):
    """``workload.retime``: replace a trace's arrival times by a synthetic process (kept order).

    With sessions in the trace, the process gives session starts and later turns follow
    think time after the previous turn's estimated completion.
    """

    think_time_s: TimeSpec = Field(default_factory=lambda: ExponentialDist(dist="exponential", mean=10.0))
    service_estimate: ServiceEstimate = Field(default_factory=ServiceEstimate)
