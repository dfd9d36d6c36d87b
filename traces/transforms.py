"""Workload transforms: time window, sampling, rate scaling, re-timing, context capping,
truncation, merging tenants, and prefix identity inferred from sessions.

Every transform returns a new :class:`Workload` and appends a note saying what it did (how many
requests it dropped or changed), so nothing changes silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sim.errors import ConfigError
from traces.prefix_ids import (
    densify_ids,
    link_sessions,
    max_id,
    offset_ids,
    reblock,
    session_prefix_ids,
    token_ids_to_hash_ids,
)
from traces.schema import LIST_COLUMNS, Workload, csr_to_list_array, list_column_csr, normalize_frame


def _with(w: Workload, df: pd.DataFrame, note: str | None, **changes) -> Workload:
    notes = list(w.notes) + ([note] if note else [])
    kw = dict(name=w.name, hash_block_size=w.hash_block_size, source=w.source, notes=notes)
    kw.update(changes)
    return Workload(df.reset_index(drop=True), **kw)


def window(w: Workload, start_s: float, end_s: float) -> Workload:
    """Keep arrivals in ``[start_s, end_s)`` (trace time) and shift them to start at 0."""
    if not end_s > start_s:
        raise ConfigError(f"workload.window_s: end ({end_s}) must be after start ({start_s})")
    t = w.df["arrival_s"]
    df = w.df[(t >= start_s) & (t < end_s)].copy()
    df["arrival_s"] = df["arrival_s"] - start_s
    if len(df) == 0:
        raise ConfigError(f"workload.window_s: no request arrives in [{start_s}, {end_s}) s (trace spans 0..{w.duration_s:.1f} s)")
    return _with(w, df, f"window [{start_s:g}, {end_s:g}) s: kept {len(df):,} of {len(w):,} requests")


def sample(w: Workload, fraction: float, rng: np.random.Generator) -> Workload:
    """Keep a random ``fraction`` of the requests; of whole *sessions* when the trace has them
    (so kept sessions stay complete and their prefixes meaningful)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"workload.sample_fraction: must be in (0, 1], got {fraction}")
    if w.has("session_id"):
        sid = w.df["session_id"]
        codes, uniq = pd.factorize(sid, use_na_sentinel=True)
        keep_sess = rng.random(len(uniq)) < fraction
        lone = codes < 0  # requests outside any session are sampled one by one
        keep = np.where(lone, rng.random(len(codes)) < fraction, keep_sess[np.maximum(codes, 0)])
        what = f"sessions ({int(keep_sess.sum()):,} of {len(uniq):,})"
    else:
        keep = rng.random(len(w)) < fraction
        what = "requests"
    df = w.df[keep]
    if len(df) == 0:
        raise ConfigError(f"workload.sample_fraction: sampling {fraction} left no request")
    df = df.copy()
    df["arrival_s"] = df["arrival_s"] - df["arrival_s"].iloc[0]
    return _with(w, df, f"sampled {fraction:g} of {what}: kept {len(df):,} of {len(w):,} requests")


def scale_rate(w: Workload, factor: float) -> Workload:
    """Compress time by ``factor`` (rate x factor; think times and gaps shrink alike)."""
    if factor == 1.0:
        return w
    df = w.df.copy()
    df["arrival_s"] = df["arrival_s"] / factor
    note = f"rate scaled x{factor:g} (arrival times divided by {factor:g})"
    if "think_time_s" in df.columns:
        # Closed-loop sessions release turns think_time_s after their parent: compress it too.
        df["think_time_s"] = df["think_time_s"] / factor
        note = f"rate scaled x{factor:g} (arrival and think times divided by {factor:g})"
    return _with(w, df, note)


def cap_to_context(w: Workload, max_model_len: int) -> Workload:
    """Fit every request in the model's context: prompt <= max_model_len - 1 (at least one
    output token) and prompt + output <= max_model_len. Reports how many were capped."""
    if max_model_len < 2:
        raise ConfigError(f"workload.cap_to_context: context length must be >= 2, got {max_model_len}")
    p = w.df["prompt_tokens"].to_numpy(np.int64)
    o = w.df["output_tokens"].to_numpy(np.int64)
    p2 = np.minimum(p, max_model_len - 1)
    o2 = np.minimum(o, max_model_len - p2)
    n_p, n_o = int((p2 < p).sum()), int((o2 < o).sum())
    if n_p == 0 and n_o == 0:
        return _with(w, w.df, f"cap_to_context {max_model_len}: no request needed capping")
    df = w.df.copy()
    df["prompt_tokens"] = p2
    df["output_tokens"] = o2
    if n_p:
        for c in LIST_COLUMNS:
            if c in df.columns and df[c].notna().any():
                unit = 1 if c == "token_ids" else (w.hash_block_size or 1)
                df[c] = _truncate_lists(df[c], -(-p2 // unit))
    return _with(w, df, f"cap_to_context {max_model_len}: capped {n_p:,} prompt(s) and {n_o:,} output(s) of {len(w):,} requests")


def _fill_empty_lists(col: pd.Series) -> pd.Series:
    off, val, present = list_column_csr(col)
    return pd.Series(csr_to_list_array(off, val), index=col.index)


def _truncate_lists(col: pd.Series, max_len: np.ndarray) -> pd.Series:
    off, val, present = list_column_csr(col)
    lens = np.minimum(np.diff(off), max_len)
    new_off = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    rows = np.repeat(np.arange(len(lens)), lens)
    pos = np.arange(new_off[-1]) - new_off[rows]
    return pd.Series(csr_to_list_array(new_off, val[off[:-1][rows] + pos], present), index=col.index)


def head(w: Workload, n: int) -> Workload:
    if n >= len(w):
        return w
    return _with(w, w.df.iloc[:n], f"max_requests {n:,}: kept the first {n:,} of {len(w):,} requests")


def infer_session_prefixes(w: Workload, block_size: int = 16, shared_tokens: int = 0) -> Workload:
    """Give a sessioned trace without prefix identity ``hash_ids`` assuming each turn's prompt
    extends the previous turn's prompt and answer (true of chat logs that resend history)."""
    if not w.has("session_id"):
        raise ConfigError("workload.session_prefix: the trace has no sessions to infer prefixes from")
    if w.has("hash_ids") or w.has("token_ids"):
        raise ConfigError("workload.session_prefix: the trace already has prefix identity (hash_ids/token_ids)")
    df = w.df.copy()
    ids = session_prefix_ids(df, block_size, head_tokens=shared_tokens)
    ids.index = df.index
    df["hash_ids"] = ids
    share = f"; first {shared_tokens} tokens shared by all sessions" if shared_tokens else ""
    return _with(w, normalize_frame(df), f"prefix identity inferred from sessions ({block_size}-token blocks{share})",
                 hash_block_size=block_size)


def retime(w: Workload, spec, seed, base_dir: Path | None = None) -> Workload:
    """Replace arrival times by a synthetic process (order of first appearance kept).

    Requests outside sessions each take the next point of the process. A session takes one
    point for its first turn; each later turn arrives at the previous turn's arrival + estimated
    service + think time (open-loop, like the synthetic sessions).
    """
    from traces.synthetic.arrivals import arrival_times
    from traces.synthetic.generator import rng_streams, segmented_cumsum, service_estimate_s
    from traces.synthetic.lengths import sample as sample_dist

    r = rng_streams(seed)
    df = w.df
    n = len(df)
    if w.has("session_id"):
        codes, _ = pd.factorize(df["session_id"], use_na_sentinel=True)
        lone = codes < 0
        unit_key = np.where(lone, -1 - np.arange(n), codes)
    else:
        unit_key = -1 - np.arange(n)
    _, first_idx, unit = np.unique(unit_key, return_index=True, return_inverse=True)
    # units in order of first appearance
    order_units = np.argsort(first_idx, kind="stable")
    rank = np.empty_like(order_units)
    rank[order_units] = np.arange(len(order_units))
    unit = rank[unit]
    starts = arrival_times(spec, r["arrivals"], r["bursts"], n=len(order_units), duration_s=None, base_dir=base_dir)
    order = np.lexsort((np.arange(n), unit))  # rows grouped by unit, original order inside
    u_sorted = unit[order]
    seg = np.flatnonzero(np.concatenate([[True], u_sorted[1:] != u_sorted[:-1]]))
    follow = np.ones(n, dtype=bool)
    follow[seg] = False
    p = df["prompt_tokens"].to_numpy(np.int64)[order]
    o = df["output_tokens"].to_numpy(np.int64)[order]
    gap = np.zeros(n)
    if follow.any():
        prev_p = np.concatenate([[0], p[:-1]])
        prev_o = np.concatenate([[0], o[:-1]])
        think = sample_dist(spec.think_time_s, r["think_time"], int(follow.sum()), integer=False)
        gap[follow] = service_estimate_s(spec.service_estimate, prev_p, prev_o)[follow] + think
    t_sorted = starts[u_sorted] + segmented_cumsum(gap, seg)
    t = np.empty(n)
    t[order] = t_sorted
    out = df.copy()
    out["arrival_s"] = t
    if follow.any():
        th = np.full(n, np.nan)
        th_sorted = np.full(n, np.nan)
        th_sorted[follow] = think
        th[order] = th_sorted
        out["think_time_s"] = th
    out = out.sort_values("arrival_s", kind="stable")
    if w.has("session_id"):
        out = link_sessions(out)
    out["arrival_s"] = out["arrival_s"] - out["arrival_s"].iloc[0]
    what = "session starts" if w.has("session_id") else "requests"
    return _with(w, out, f"re-timed: {spec.arrival} arrivals at {spec.rate_per_s:g}/s for {what}")


def merge(parts: list[tuple[Workload, str | None]]) -> Workload:
    """Merge workloads (e.g. tenants) into one stream ordered by arrival.

    Each part keeps its own time axis (all start at 0). ``tenant`` labels a part's requests
    (else its own tenant column, else its name). Session and request ids are prefixed by the
    tenant to stay distinct; ``hash_ids`` id spaces are made disjoint and brought to one block
    size (the gcd: a 512-token block is 32 exact 16-token blocks); ``token_ids`` become 16-token
    ``hash_ids``; parts without prefix identity get empty id lists (nothing shared).
    """
    if not parts:
        raise ConfigError("workload.merge: needs at least one workload")
    # one kind of prefix identity: token ids become 16-token hash_ids (exact at that granularity)
    parts = [(token_ids_to_hash_ids(w) if w.has("token_ids") and not w.has("hash_ids") else w, t) for w, t in parts]
    sizes = [w.hash_block_size for w, _ in parts if w.has("hash_ids") and w.hash_block_size]
    bs = int(np.gcd.reduce(sizes)) if sizes else None
    frames = []
    offset = 0
    notes = []
    for k, (w, tenant) in enumerate(parts):
        label = tenant or w.name or f"part{k}"
        if w.has("hash_ids"):
            w = densify_ids(w)
            if bs and w.hash_block_size != bs:
                w = reblock(w, bs)
            w = offset_ids(w, offset)
            offset = max_id(w) + 1
        df = w.df.copy()
        if tenant is not None or "tenant" not in df.columns:
            df["tenant"] = label
        for c in ("session_id", "request_id"):
            if c in df.columns:
                df[c] = (label + "/" + df[c].astype("str")).where(df[c].notna(), np.nan)
        frames.append(df)
        notes.append(f"merged {label}: {len(df):,} requests ({'; '.join(w.notes) if w.notes else w.source})")
    df = pd.concat(frames, ignore_index=True, sort=False)
    if bs is not None:
        # parts without prefix identity share nothing: an empty id list says so without NA
        df["hash_ids"] = _fill_empty_lists(df["hash_ids"])
    df = df.sort_values("arrival_s", kind="stable")
    return Workload(normalize_frame(df.reset_index(drop=True)), name="merged", hash_block_size=bs, source="merge", notes=notes)
