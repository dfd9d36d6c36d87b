"""Arrival processes: renewal processes modulated by piecewise-constant rate functions.

Method (time rescaling): draw the points of a unit-rate renewal process (Poisson: exponential
gaps; Gamma: gaps with the requested CV) in "operational time" u, then map each point through
the inverse cumulative intensity, t = Lambda^{-1}(u). For a constant rate this is plain
gaps / rate; with bursts or a rate curve the arrivals follow the rate while keeping the
renewal process' burstiness. An off period with rate 0 gets no arrivals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import ConfigError
from traces.synthetic.spec import ArrivalSpec, BurstSpec, RateCurveSpec


def unit_gaps(rng: np.random.Generator, n: int, cv: float | None) -> np.ndarray:
    """``n`` mean-1 inter-arrival gaps: exponential (CV 1) or Gamma with the given CV."""
    if cv is None or cv == 1.0:
        return rng.exponential(1.0, size=n)
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, 1.0 / shape, size=n)


# ----------------------------------------------------------------------------- rate curves
def load_servegen(name_or_path: str, base_dir: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(window starts in s, req/s) of a ServeGen aggregate curve (built-in name or CSV path)."""
    from traces.builtin import DATA_DIR, RATE_CURVES, curve_names

    if name_or_path in RATE_CURVES:
        path = DATA_DIR / RATE_CURVES[name_or_path]
    else:
        path = Path(name_or_path)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.exists():
            raise ConfigError(
                f"rate_curve.servegen: {name_or_path!r} is neither a built-in curve ({', '.join(curve_names())}) nor a file"
            )
    df = pd.read_csv(path)
    if not {"window_start_s", "aggregate_rate_req_per_s"} <= set(df.columns):
        raise ConfigError(f"{path}: a rate curve needs columns window_start_s, aggregate_rate_req_per_s")
    t = df["window_start_s"].to_numpy(np.float64)
    r = df["aggregate_rate_req_per_s"].to_numpy(np.float64)
    if len(t) < 2 or np.any(np.diff(t) <= 0) or np.any(~np.isfinite(r)) or np.any(r < 0):
        raise ConfigError(f"{path}: rate curve must have increasing window_start_s and rates >= 0")
    return t, r


class PiecewiseRate:
    """A piecewise-constant rate ``rate[k]`` on ``[edges[k], edges[k+1])``, extendable in time.

    ``extend(horizon)`` must make the function cover ``[0, horizon)``; subclasses build edges
    lazily so random patterns stay reproducible however far they are extended.
    """

    def __init__(self):
        self.edges = np.zeros(1)
        self.rates = np.zeros(0)

    def extend(self, horizon: float) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def cumulative(self) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(self.rates * np.diff(self.edges))])


class ConstantShape(PiecewiseRate):
    def extend(self, horizon: float) -> None:
        self.edges = np.array([0.0, max(horizon, 1.0)])
        self.rates = np.array([1.0])


class PeriodicShape(PiecewiseRate):
    """One period of steps (``period_edges`` from 0 to the period), repeated forever."""

    def __init__(self, period_edges: np.ndarray, period_rates: np.ndarray):
        super().__init__()
        self.p_edges = period_edges
        self.p_rates = period_rates
        self.period = float(period_edges[-1])

    def extend(self, horizon: float) -> None:
        k = int(np.ceil(horizon / self.period)) + 1
        starts = np.arange(k)[:, None] * self.period
        self.edges = np.concatenate([(starts + self.p_edges[:-1][None, :]).ravel(), [k * self.period]])
        self.rates = np.tile(self.p_rates, k)


class RandomOnOff(PiecewiseRate):
    """Alternating on/off periods with exponential durations (drawn lazily, reproducibly)."""

    def __init__(self, b: BurstSpec, on_rate: float, off_rate: float, rng: np.random.Generator):
        super().__init__()
        self.b, self.on_rate, self.off_rate, self.rng = b, on_rate, off_rate, rng
        self._e = [0.0]
        self._r: list[float] = []

    def extend(self, horizon: float) -> None:
        while self._e[-1] < horizon:
            on = self.rng.exponential(self.b.on_s)
            off = self.rng.exponential(self.b.off_s)
            self._e += [self._e[-1] + on, self._e[-1] + on + off]
            self._r += [self.on_rate, self.off_rate]
        self.edges = np.array(self._e)
        self.rates = np.array(self._r)


def burst_shape(b: BurstSpec, rng: np.random.Generator) -> PiecewiseRate:
    """On/off shape with long-run mean 1."""
    f_on = b.on_s / (b.on_s + b.off_s)
    on = 1.0 / (f_on + (1 - f_on) * b.off_rate_fraction)
    off = on * b.off_rate_fraction
    if b.random:
        return RandomOnOff(b, on, off, rng)
    return PeriodicShape(np.array([0.0, b.on_s, b.on_s + b.off_s]), np.array([on, off]))


def curve_shape(c: RateCurveSpec, rate_per_s: float, base_dir: Path | None) -> tuple[PiecewiseRate, float]:
    """(shape, scale): rate(t) = scale * shape(t); shape is periodic in simulated time."""
    if c.diurnal is not None:
        d = c.diurnal
        steps = 1440
        p = d.period_s / c.speedup
        edges = np.linspace(0.0, p, steps + 1)
        mid_curve_t = c.start_s + (edges[:-1] + edges[1:]) / 2 * c.speedup
        rates = 1.0 + d.amplitude * np.cos(2 * np.pi * (mid_curve_t - d.peak_s) / d.period_s)
        return PeriodicShape(edges, rates / rates.mean()), rate_per_s
    t, r = load_servegen(c.servegen, base_dir)
    width = np.diff(t)
    span_edges = np.concatenate([t, [t[-1] + width[-1]]]) - t[0]  # curve time from its start
    span = span_edges[-1]
    # rotate the curve so simulated time 0 is curve time start_s, then compress by speedup
    shift = c.start_s % span
    k = np.searchsorted(span_edges, shift, side="right") - 1
    e = np.concatenate([[shift], span_edges[k + 1 :], span + span_edges[1 : k + 1], [span + shift]])
    rr = np.concatenate([r[k:], r[: k + 1]])
    e = e - shift
    keep = np.diff(e) > 0
    edges = np.concatenate([[0.0], e[1:][keep]]) / c.speedup
    rates = rr[keep]
    if c.absolute:
        return PeriodicShape(edges, rates), 1.0
    mean = float(np.sum(rates * np.diff(edges)) / edges[-1])
    if mean <= 0:
        raise ConfigError(f"rate_curve.servegen {c.servegen!r}: curve is zero everywhere")
    return PeriodicShape(edges, rates / mean), rate_per_s


class ProductRate(PiecewiseRate):
    def __init__(self, parts: list[PiecewiseRate], scale: float):
        super().__init__()
        self.parts, self.scale = parts, scale

    def extend(self, horizon: float) -> None:
        for p in self.parts:
            p.extend(horizon)
        edges = np.unique(np.concatenate([p.edges for p in self.parts]))
        edges = edges[edges <= min(p.edges[-1] for p in self.parts)]
        mids = (edges[:-1] + edges[1:]) / 2
        rates = np.full(len(mids), self.scale)
        for p in self.parts:
            idx = np.clip(np.searchsorted(p.edges, mids, side="right") - 1, 0, len(p.rates) - 1)
            rates = rates * p.rates[idx]
        self.edges, self.rates = edges, rates


def build_rate(spec: ArrivalSpec, rng_burst: np.random.Generator, base_dir: Path | None) -> ProductRate:
    parts: list[PiecewiseRate] = []
    scale = spec.rate_per_s
    if spec.burst is not None:
        parts.append(burst_shape(spec.burst, rng_burst))
    if spec.rate_curve is not None:
        shape, scale = curve_shape(spec.rate_curve, spec.rate_per_s, base_dir)
        parts.append(shape)
    if not parts:
        parts.append(ConstantShape())
    return ProductRate(parts, scale)


def arrival_times(
    spec: ArrivalSpec,
    rng_arrivals: np.random.Generator,
    rng_burst: np.random.Generator,
    *,
    n: int | None,
    duration_s: float | None,
    base_dir: Path | None = None,
) -> np.ndarray:
    """Arrival times (s, increasing, first at 0) of ``n`` points and/or within ``duration_s``."""
    rate = build_rate(spec, rng_burst, base_dir)
    cv = spec.cv if spec.arrival == "gamma" else None
    if n is None:
        assert duration_s is not None
        rate.extend(duration_s)
        lam = rate.cumulative()
        target = float(np.interp(duration_s, rate.edges, lam))
        u = np.zeros(0)
        while not len(u) or u[-1] <= target:
            last = u[-1] if len(u) else 0.0
            more = max(1024, int(1.2 * (target - last)) + 16)
            u = np.concatenate([u, last + np.cumsum(unit_gaps(rng_arrivals, more, cv))])
        u = u[u <= target]
    else:
        u = np.cumsum(unit_gaps(rng_arrivals, n, cv))
        horizon = u[-1] / spec.rate_per_s * 1.5 + 1.0
        for _ in range(64):
            rate.extend(horizon)
            lam = rate.cumulative()
            if lam[-1] >= u[-1]:
                break
            horizon *= 2
        else:
            raise ConfigError("synthetic arrivals: the rate is (almost) zero; no arrivals can be generated")
    if len(u) == 0:
        return u
    k = np.clip(np.searchsorted(lam, u, side="right") - 1, 0, len(rate.rates) - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = rate.edges[k] + (u - lam[k]) / rate.rates[k]
    t = np.maximum.accumulate(np.nan_to_num(t, nan=0.0))
    if duration_s is not None:
        t = t[t < duration_s]
    return t - t[0] if len(t) else t
