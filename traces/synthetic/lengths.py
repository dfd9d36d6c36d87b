"""Sampling token lengths and times from the spec's distributions."""

from __future__ import annotations

from typing import Callable

import numpy as np

from traces.synthetic.spec import ExponentialDist, FixedDist, LogNormalDist, TraceDist, UniformDist

# (trace, format) -> (prompt_tokens, output_tokens) arrays; filled by the caller's resolver.
TraceResolver = Callable[[str, str], tuple[np.ndarray, np.ndarray]]


def sample(spec, rng: np.random.Generator, n: int, *, integer: bool, resolve: TraceResolver | None = None, role: str = "") -> np.ndarray:
    """``n`` draws of ``spec`` (a number = fixed value). Integers are rounded and at least 1."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        x = np.full(n, float(spec))
    elif isinstance(spec, FixedDist):
        x = np.full(n, spec.value)
    elif isinstance(spec, UniformDist):
        if integer:
            return rng.integers(int(np.ceil(spec.min)), int(np.floor(spec.max)) + 1, size=n).astype(np.int64)
        x = rng.uniform(spec.min, spec.max, size=n)
    elif isinstance(spec, ExponentialDist):
        x = rng.exponential(spec.mean, size=n)
    elif isinstance(spec, LogNormalDist):
        sigma2 = np.log1p(spec.cv**2)
        mu = np.log(spec.mean) - sigma2 / 2
        x = rng.lognormal(mu, np.sqrt(sigma2), size=n)
        if spec.min is not None or spec.max is not None:
            x = np.clip(x, spec.min if spec.min is not None else -np.inf, spec.max if spec.max is not None else np.inf)
    elif isinstance(spec, TraceDist):
        assert resolve is not None
        prompts, outputs = resolve(spec.trace, spec.format)
        src = {"prompt_tokens": prompts, "output_tokens": outputs}[spec.field or role]
        if spec.fit == "lognormal":
            m, sd = float(np.mean(src)), float(np.std(src))
            fitted = LogNormalDist(dist="lognormal", mean=m, cv=max(sd / m, 1e-9))
            return sample(fitted, rng, n, integer=integer)
        return src[rng.integers(0, len(src), size=n)].astype(np.int64)
    else:  # pragma: no cover - pydantic guarantees the types
        raise TypeError(f"unknown distribution {spec!r}")
    if integer:
        return np.maximum(1, np.rint(x)).astype(np.int64)
    return x


def sample_pairs(
    p_spec, o_spec, rng_p: np.random.Generator, rng_o: np.random.Generator, n: int, resolve: TraceResolver
) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and output lengths; resampled jointly when both come from the same trace."""
    if (
        isinstance(p_spec, TraceDist)
        and isinstance(o_spec, TraceDist)
        and (p_spec.trace, p_spec.format) == (o_spec.trace, o_spec.format)
        and p_spec.fit == o_spec.fit == "empirical"
        and (p_spec.field or "prompt_tokens") == "prompt_tokens"
        and (o_spec.field or "output_tokens") == "output_tokens"
    ):
        prompts, outputs = resolve(p_spec.trace, p_spec.format)
        idx = rng_p.integers(0, len(prompts), size=n)
        return prompts[idx].astype(np.int64), outputs[idx].astype(np.int64)
    p = sample(p_spec, rng_p, n, integer=True, resolve=resolve, role="prompt_tokens")
    o = sample(o_spec, rng_o, n, integer=True, resolve=resolve, role="output_tokens")
    return p, o
