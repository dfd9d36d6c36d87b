"""Scenario ``workload:`` section -> :class:`traces.schema.Workload`.

One of three sources, then transforms in a fixed order (documented in docs/workloads.md)::

    workload:
      trace: mooncake-conversation      # built-in name or file path (relative to the scenario)
      format: auto                      # or azure, mooncake, bailian, burstgpt, lmbench, ...
      options: {}                       # format options (e.g. system_prompt_tokens for lmbench)
      skip_invalid: false               # skip malformed rows (counted in the notes) instead of failing
      # -- or --
      synthetic: {arrival: poisson, rate_per_s: 5, num_requests: 200, prompt_tokens: 1000, output_tokens: 100}
      # -- or --
      merge: [{trace: azure2023-conv, tenant: chat}, {trace: azure2023-code, tenant: code}]
      # transforms, applied in this order:
      session_prefix: false             # infer hash_ids from sessions (true or {block_size, shared_tokens})
      retime: null                      # {arrival: poisson, rate_per_s: 2, ...}: replace arrival times
      window_s: [0, 600]                # keep [start, end) of trace time, shifted to 0
      sample_fraction: null             # keep a random fraction (of sessions when there are sessions)
      rate_scale: 1.0                   # x2 = twice the rate (time compressed)
      cap_to_context: null              # N, or true for the model's max_model_len
      max_requests: null                # keep the first N
      tenant: null                      # label every request with this tenant

Seeds: ``build_workload(seed=...)`` spawns one SeedSequence child per purpose (source, retime,
sample, merge parts), so e.g. enabling sampling never changes the synthetic arrivals.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sim.errors import ConfigError
from traces import transforms
from traces.builtin import TRACES, trace_names
from traces.formats import canonical_format, load_file
from traces.schema import Workload, normalize_frame
from traces.synthetic import RetimeSpec, SyntheticSpec, generate


class SessionPrefixSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(16, gt=0)
    shared_tokens: int = Field(0, ge=0)


class WorkloadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trace: str | None = None
    format: str = "auto"
    options: dict = Field(default_factory=dict)
    skip_invalid: bool = False
    synthetic: SyntheticSpec | None = None
    merge: list["WorkloadSpec"] | None = None
    session_prefix: Union[bool, SessionPrefixSpec] = False
    retime: RetimeSpec | None = None
    window_s: tuple[float, float] | None = None
    sample_fraction: float | None = Field(None, gt=0, le=1)
    rate_scale: float = Field(1.0, gt=0)
    cap_to_context: Union[bool, int, None] = None
    max_requests: int | None = Field(None, gt=0)
    tenant: str | None = None
    # Closed-loop sessions: a turn is sent think_time_s after its parent turn *finishes in the
    # simulation* (instead of at the table's open-loop estimate). Applied by the cluster.
    closed_loop: bool = False

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("trace", "synthetic", "merge") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of 'trace', 'synthetic' or 'merge' (got {given or 'none'})")
        if self.trace is None and (self.options or self.format != "auto" or self.skip_invalid):
            raise ValueError("'format', 'options' and 'skip_invalid' apply to 'trace' only")
        if isinstance(self.cap_to_context, int) and not isinstance(self.cap_to_context, bool) and self.cap_to_context < 2:
            raise ValueError("cap_to_context must be a context length >= 2 (or true)")
        if self.window_s is not None and not self.window_s[1] > self.window_s[0]:
            raise ValueError("window_s: end must be after start")
        canonical_format(self.format)
        return self


def resolve_trace_path(name: str, base_dir: Path | None = None) -> tuple[Path, str | None, dict]:
    """(path, built-in format or None, built-in options) for a built-in name or a file path."""
    if name in TRACES:
        b = TRACES[name]
        return b.path, b.format, dict(b.options)
    path = Path(name).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if not path.exists():
        raise ConfigError(f"workload.trace: {name!r} is neither a built-in trace ({', '.join(trace_names())}) nor a file")
    return path, None, {}


@lru_cache(maxsize=16)
def _load_cached(path: str, mtime: float, fmt: str, skip_invalid: bool, options_json: str) -> Workload:
    return load_file(path, fmt, skip_invalid=skip_invalid, options=json.loads(options_json))


def load_trace(name: str, fmt: str = "auto", *, base_dir: Path | None = None, skip_invalid: bool = False,
               options: dict | None = None) -> Workload:
    """Load a built-in trace or file (memoised per file/format/options; returns a fresh copy)."""
    path, b_fmt, b_opts = resolve_trace_path(name, base_dir)
    f = b_fmt if fmt == "auto" and b_fmt else fmt
    opts = {**b_opts, **(options or {})}
    w = _load_cached(str(path), path.stat().st_mtime, f, skip_invalid, json.dumps(opts, sort_keys=True, default=str))
    label = name if name in TRACES else w.name
    return Workload(w.df.copy(), name=label, hash_block_size=w.hash_block_size, source=w.source, notes=list(w.notes))


def _resolver(base_dir: Path | None):
    def resolve(trace: str, fmt: str) -> tuple[np.ndarray, np.ndarray]:
        w = load_trace(trace, fmt, base_dir=base_dir)
        return w.df["prompt_tokens"].to_numpy(np.int64), w.df["output_tokens"].to_numpy(np.int64)

    return resolve


def build_workload(
    spec: WorkloadSpec,
    *,
    base_dir: Path | None = None,
    seed: "int | np.random.SeedSequence" = 0,
    max_model_len: int | None = None,
) -> Workload:
    """Build the workload a scenario describes (errors: ConfigError / TraceError, one line).

    ``max_model_len`` is only needed for ``cap_to_context: true``.
    """
    if isinstance(spec, dict):
        spec = WorkloadSpec.model_validate(spec)
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    s_source, s_retime, s_sample, s_merge = ss.spawn(4)

    if spec.synthetic is not None:
        w = generate(spec.synthetic, seed=s_source, base_dir=base_dir, resolve=_resolver(base_dir))
    elif spec.merge is not None:
        children = s_merge.spawn(len(spec.merge))
        parts = [
            (build_workload(item, base_dir=base_dir, seed=child, max_model_len=max_model_len), item.tenant)
            for item, child in zip(spec.merge, children)
        ]
        w = transforms.merge(parts)
    else:
        w = load_trace(spec.trace, spec.format, base_dir=base_dir, skip_invalid=spec.skip_invalid, options=spec.options)

    if spec.session_prefix:
        sp = spec.session_prefix if isinstance(spec.session_prefix, SessionPrefixSpec) else SessionPrefixSpec()
        w = transforms.infer_session_prefixes(w, sp.block_size, sp.shared_tokens)
    if spec.retime is not None:
        w = transforms.retime(w, spec.retime, s_retime, base_dir)
    if spec.window_s is not None:
        w = transforms.window(w, *spec.window_s)
    if spec.sample_fraction is not None:
        w = transforms.sample(w, spec.sample_fraction, np.random.default_rng(s_sample))
    if spec.rate_scale != 1.0:
        w = transforms.scale_rate(w, spec.rate_scale)
    if spec.cap_to_context is not None and spec.cap_to_context is not False:
        if spec.cap_to_context is True:
            if max_model_len is None:
                raise ConfigError("workload.cap_to_context: true needs the model's max_model_len; give a number instead")
            limit = int(max_model_len)
        else:
            limit = int(spec.cap_to_context)
        w = transforms.cap_to_context(w, limit)
    if spec.max_requests is not None:
        w = transforms.head(w, spec.max_requests)
    if spec.tenant is not None:
        df = w.df.copy()
        df["tenant"] = spec.tenant
        w = Workload(normalize_frame(df), name=w.name, hash_block_size=w.hash_block_size, source=w.source, notes=w.notes)
    return w


WorkloadSpec.model_rebuild()
