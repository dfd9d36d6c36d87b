"""The synthetic workload generator: arrivals x lengths x sessions x shared prefixes.

Determinism: one numpy Generator per purpose, all spawned from ``SeedSequence(seed)`` in the
fixed order of ``PURPOSES`` (append new purposes at the end), so changing, say, the think-time
distribution never shifts the arrival times.

Sessions are generated *open-loop*: turn k+1 arrives at turn k's arrival + an estimated service
time (prompt / prefill rate + output x per-token time) + a think time. True closed loop (next
turn released think time after the simulated completion) needs feedback from the simulator;
see docs/workloads.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.prefix_ids import BlockIdAllocator, SessionStreams, ids_to_column, unique_prompt_ids
from traces.schema import Workload, normalize_frame
from traces.synthetic.arrivals import arrival_times
from traces.synthetic.lengths import TraceResolver, sample, sample_pairs
from traces.synthetic.spec import ServiceEstimate, SharedPrefixSpec, SyntheticSpec

PURPOSES = (
    "arrivals",
    "bursts",
    "prompt_tokens",
    "output_tokens",
    "turns",
    "think_time",
    "user_tokens",
    "tenant",
    "system_prompt",
    "tenant_prefix",
)


def rng_streams(seed: "int | np.random.SeedSequence", purposes=PURPOSES) -> dict[str, np.random.Generator]:
    """One Generator per purpose, spawned from ``seed`` (an int or a SeedSequence)."""
    ss = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(seed)
    seqs = ss.spawn(len(purposes))
    return {p: np.random.default_rng(s) for p, s in zip(purposes, seqs)}


def popularity(kind: str, n: int, s: float) -> np.ndarray:
    if kind == "uniform":
        return np.full(n, 1.0 / n)
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def segmented_cumsum(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Cumulative sums restarting at each segment start (``starts`` = first index of each)."""
    c = np.cumsum(values)
    base = np.repeat(c[starts] - values[starts], np.diff(np.append(starts, len(values))))
    return c - base


def service_estimate_s(est: ServiceEstimate, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    return prompt / est.prefill_tokens_per_s + output * est.s_per_output_token


def generate(spec: SyntheticSpec, *, seed: "int | np.random.SeedSequence" = 0, base_dir: Path | None = None, resolve: TraceResolver | None = None) -> Workload:
    r = rng_streams(seed)
    notes = [_describe(spec)]
    sp: SharedPrefixSpec | None = spec.shared_prefix

    if spec.sessions is None:
        t = arrival_times(spec, r["arrivals"], r["bursts"], n=spec.num_requests, duration_s=spec.duration_s, base_dir=base_dir)
        n = len(t)
        user, output = sample_pairs(spec.prompt_tokens, spec.output_tokens, r["prompt_tokens"], r["output_tokens"], n, resolve)
        unit = np.arange(n)  # the "unit" choosing a tenant/prompt is the request
        session = turn = None
        n_units = n
    else:
        ss = spec.sessions
        if spec.num_requests is not None:
            turns_all = sample(ss.turns, r["turns"], spec.num_requests, integer=True)
            n_units = int(np.searchsorted(np.cumsum(turns_all), spec.num_requests) + 1)
            turns = turns_all[:n_units]
        starts_t = arrival_times(
            spec, r["arrivals"], r["bursts"],
            n=n_units if spec.num_requests is not None else None, duration_s=spec.duration_s, base_dir=base_dir,
        )
        if spec.num_requests is None:
            n_units = len(starts_t)
            turns = sample(ss.turns, r["turns"], n_units, integer=True)
        n_units = len(starts_t)
        turns = turns[:n_units]
        total = int(turns.sum())
        seg = np.concatenate([[0], np.cumsum(turns)[:-1]]).astype(np.int64)
        unit = np.repeat(np.arange(n_units), turns)
        turn = np.arange(total) - seg[unit] + 1
        first_user, output = sample_pairs(spec.prompt_tokens, spec.output_tokens, r["prompt_tokens"], r["output_tokens"], total, resolve)
        user = first_user
        follow = turn > 1
        user_more = sample(ss.user_tokens, r["user_tokens"], int(follow.sum()), integer=True)
        think = sample(ss.think_time_s, r["think_time"], int(follow.sum()), integer=False)
        user = np.where(follow, 0, first_user)
        user[follow] = user_more
        session = unit

    # shared prefixes: a tenant and a system prompt per unit (request, or session)
    prefix_len = np.zeros(n_units, dtype=np.int64)
    tenant_of_unit = prompt_of_unit = None
    tpl = spl = None
    if sp is not None:
        tenant_of_unit = r["tenant"].choice(sp.tenants, size=n_units, p=popularity(sp.tenant_popularity, sp.tenants, sp.zipf_s))
        prompt_of_unit = r["tenant"].choice(
            sp.prompts_per_tenant, size=n_units, p=popularity(sp.prompt_popularity, sp.prompts_per_tenant, sp.zipf_s)
        )
        tpl = (
            np.zeros(sp.tenants, dtype=np.int64)
            if isinstance(sp.tenant_prefix_tokens, int) and sp.tenant_prefix_tokens == 0
            else sample(sp.tenant_prefix_tokens, r["tenant_prefix"], sp.tenants, integer=True, resolve=resolve, role="prompt_tokens")
        )
        spl = sample(sp.system_prompt_tokens, r["system_prompt"], sp.tenants * sp.prompts_per_tenant, integer=True,
                     resolve=resolve, role="prompt_tokens").reshape(sp.tenants, sp.prompts_per_tenant)
        prefix_len = tpl[tenant_of_unit] + spl[tenant_of_unit, prompt_of_unit]

    if spec.sessions is None:
        prompt = prefix_len + user
        arrival = t
    else:
        # prompt_k = prefix + user_1 + sum_{j<k} (output_j + user_{j+1});  arrival_k = start + sum (est_j + think_j)
        prev_out = np.concatenate([[0], output[:-1]])
        inc = np.where(follow, prev_out + user, prefix_len[unit] + user)
        prompt = segmented_cumsum(inc.astype(np.int64), seg)
        prev_prompt = np.concatenate([[0], prompt[:-1]])
        est = service_estimate_s(spec.sessions.service_estimate, prev_prompt, prev_out)
        gap = np.zeros(total)
        gap[follow] = est[follow] + think
        arrival = starts_t[unit] + segmented_cumsum(gap, seg)
        notes.append(
            "sessions are open-loop: turn k+1 arrives at turn k's arrival + estimated service "
            f"(prompt/{spec.sessions.service_estimate.prefill_tokens_per_s:g} tok/s + output x "
            f"{spec.sessions.service_estimate.s_per_output_token:g} s) + think time"
        )

    cols: dict = {"arrival_s": arrival, "prompt_tokens": prompt, "output_tokens": output}
    n = len(prompt)
    if session is not None:
        cols["session_id"] = pd.Series([f"s{u}" for u in session], dtype="str")
        cols["turn"] = turn
        think_col = np.full(n, np.nan)
        think_col[follow] = think
        cols["think_time_s"] = think_col
        cols["_prev_row"] = np.where(follow, np.arange(n) - 1, -1)
    cols["_row"] = np.arange(n)
    if sp is not None:
        cols["tenant"] = pd.Series([f"tenant{k}" for k in tenant_of_unit[unit]], dtype="str")
    hbs = None
    if sp is not None or session is not None:
        hbs = spec.hash_block_size
        alloc = BlockIdAllocator(hbs)
        streams = SessionStreams(alloc)
        per_req = []
        for i in range(n):
            u = unit[i]
            head = None
            if sp is not None:
                tt, mm = int(tenant_of_unit[u]), int(prompt_of_unit[u])
                parent = (("tenant", tt), int(tpl[tt])) if tpl[tt] > 0 else None
                head = alloc.shared_prefix(("prompt", tt, mm), int(prefix_len[u]), parent=parent)
            if session is None:
                per_req.append(unique_prompt_ids(alloc, int(prompt[i]), head))
            else:
                per_req.append(streams.prompt_ids(int(u), int(prompt[i]), head))
        cols["hash_ids"] = ids_to_column(per_req)
    df = pd.DataFrame({k: (v.reset_index(drop=True) if isinstance(v, pd.Series) else v) for k, v in cols.items()})
    df = df.sort_values("arrival_s", kind="stable").reset_index(drop=True)
    if spec.duration_s is not None:
        df = df[df["arrival_s"] < spec.duration_s]
    if spec.num_requests is not None:
        df = df.iloc[: spec.num_requests]
    df = df.reset_index(drop=True)
    if len(df):
        df["arrival_s"] = df["arrival_s"] - df["arrival_s"].iloc[0]
    df.insert(3, "request_id", pd.Series([f"r{i}" for i in range(len(df))], dtype="str"))
    if session is not None:
        rid = pd.Series(df["request_id"].to_numpy(), index=df["_row"].to_numpy())
        df["parent_request_id"] = df["_prev_row"].map(rid).astype("str").where(df["_prev_row"] >= 0, np.nan)
        df = df.drop(columns=["_prev_row"])
    df = df.drop(columns=["_row"])
    return Workload(normalize_frame(df), name=f"synthetic-{spec.arrival}", hash_block_size=hbs, source="synthetic", notes=notes)


def _describe(spec: SyntheticSpec) -> str:
    what = f"synthetic: {spec.arrival}"
    if spec.cv is not None:
        what += f" (cv {spec.cv:g})"
    what += f", mean {spec.rate_per_s:g} req/s" if not (spec.rate_curve and spec.rate_curve.absolute) else ", absolute rate curve"
    if spec.burst:
        what += f", bursts {spec.burst.on_s:g}s on / {spec.burst.off_s:g}s off"
    if spec.rate_curve:
        what += f", rate curve {spec.rate_curve.servegen or 'diurnal'} (speedup {spec.rate_curve.speedup:g})"
    if spec.sessions is not None:
        what += ", multi-turn sessions (arrival rate = session starts)"
    if spec.shared_prefix is not None:
        what += f", shared prefixes {spec.shared_prefix.tenants} tenants x {spec.shared_prefix.prompts_per_tenant} prompts"
    return what
