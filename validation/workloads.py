"""Workloads for validation runs: real traces made to fit a small engine, and retimed to a load.

The tiny dummy model on one CPU core serves a few requests per second, so real traces are used for
their *shape* (arrival pattern, length mix, prefix structure) with lengths scaled down and capped,
and their arrivals rescaled to a chosen request rate. Scaling keeps prefix structure: a trace with
``hash_ids`` of ``H``-token source blocks scaled by ``f`` gets ``f*H``-token blocks (Mooncake's
512-token blocks at f = 1/16 become 32-token blocks, exactly the CPU engine's block size).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sim.errors import ConfigError
from traces.schema import Workload


def shrink(w: Workload, *, length_scale: float = 1.0, output_scale: float = 1.0, max_prompt: int | None = None,
           max_output: int | None = None, start: int = 0, max_requests: int | None = None) -> Workload:
    """Rows ``start .. start+max_requests`` with scaled, capped lengths; arrivals rebased to 0."""
    df = w.df.iloc[start: start + max_requests if max_requests else None].copy()
    if len(df) == 0:
        raise ConfigError(f"{w.name}: no requests left after start={start}, max_requests={max_requests}")
    df["arrival_s"] = df["arrival_s"] - df["arrival_s"].iloc[0]
    p = np.maximum(1, np.round(df["prompt_tokens"].to_numpy(np.float64) * length_scale)).astype(np.int64)
    o = np.maximum(1, np.round(df["output_tokens"].to_numpy(np.float64) * output_scale)).astype(np.int64)
    if max_prompt is not None:
        p = np.minimum(p, max_prompt)
    if max_output is not None:
        o = np.minimum(o, max_output)
    df["prompt_tokens"], df["output_tokens"] = p, o
    hbs = w.hash_block_size
    if w.has("hash_ids") and hbs and length_scale != 1.0:
        new = hbs * length_scale
        if abs(new - round(new)) > 1e-9 or round(new) < 1:
            raise ConfigError(f"{w.name}: length_scale {length_scale} turns {hbs}-token hash blocks into "
                              f"{new:g} tokens; pick a scale that keeps them whole")
        hbs = int(round(new))
    if w.has("token_ids"):
        if length_scale != 1.0:
            raise ConfigError(f"{w.name}: a trace with token ids can be capped (max_prompt) but not length-scaled")
        df["token_ids"] = [t if t is None or t is pd.NA else list(t)[:n] for t, n in zip(df["token_ids"], p)]
    return Workload(df.reset_index(drop=True), name=w.name, hash_block_size=hbs, source=w.source,
                    notes=[*w.notes, f"validation: lengths x{length_scale:g} (prompt cap {max_prompt}), "
                                     f"outputs x{output_scale:g} (cap {max_output})"])


def at_rate(w: Workload, rate_per_s: float) -> Workload:
    """Rescale arrivals so the mean request rate is ``rate_per_s`` (the arrival pattern is kept)."""
    if rate_per_s <= 0:
        raise ConfigError(f"rate must be > 0, got {rate_per_s}")
    df = w.df.copy()
    n = len(df)
    span = float(df["arrival_s"].iloc[-1] - df["arrival_s"].iloc[0]) if n > 1 else 0.0
    if span <= 0:
        df["arrival_s"] = np.arange(n) / rate_per_s
    else:
        df["arrival_s"] = (df["arrival_s"] - df["arrival_s"].iloc[0]) * ((n - 1) / rate_per_s) / span
    return Workload(df, name=w.name, hash_block_size=w.hash_block_size, source=w.source, notes=list(w.notes))


def burst(w: Workload) -> Workload:
    """All requests at t = 0 (a closed burst: measures the engine's saturated throughput)."""
    df = w.df.copy()
    df["arrival_s"] = 0.0
    return Workload(df, name=w.name, hash_block_size=w.hash_block_size, source=w.source, notes=list(w.notes))


def with_arrivals(w: Workload, arrival_s: np.ndarray) -> Workload:
    """The same requests arriving at the given times (e.g. the real run's actual send times)."""
    df = w.df.copy()
    df["arrival_s"] = np.asarray(arrival_s, np.float64)
    df = df.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    return Workload(df, name=w.name, hash_block_size=w.hash_block_size, source=w.source, notes=list(w.notes))
