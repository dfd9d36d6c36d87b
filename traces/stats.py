"""Summary statistics of a workload (what ``fleetsim trace info`` prints).

Prefix reuse is defined as in the traces MANIFEST: walk the requests in arrival order with an
*unbounded* cache; a prompt block is reusable if the same prefix up to and including that block
appeared in an earlier request. The ratio is reusable blocks / all blocks, counted at the
trace's own granularity: its ``hash_block_size`` for traces with ``hash_ids`` (512 tokens for
Mooncake; the last, partial block counts like the others, as the trace lists it), or vLLM's
16-token engine blocks (full blocks only) for traces with full token ids.
"""

from __future__ import annotations

import numpy as np

from traces.hashing import as_u64, chain_ragged
from traces.schema import Workload

PERCENTILES = (50, 90, 99)
ENGINE_BLOCK = 16
_SEED = 0x243F6A8885A308D3


def reusable_fraction(offsets: np.ndarray, chain_keys: np.ndarray) -> tuple[int, int]:
    """(reusable, total) blocks for chained prefix keys in CSR layout (requests in order)."""
    total = int(chain_keys.size)
    if total == 0:
        return 0, 0
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    _, first, inv = np.unique(chain_keys, return_index=True, return_inverse=True)
    first_req = rows[first][inv]
    return int(np.count_nonzero(first_req < rows)), total


def prefix_reuse(w: Workload) -> dict | None:
    """Reusable-block ratio with an unbounded cache, or None without prefix identity."""
    if w.has("hash_ids") and w.hash_block_size:
        off, val, _ = w.list_csr("hash_ids")
        keys = chain_ragged(as_u64(val), off, _SEED)  # prefix identity, even if ids repeat at other depths
        basis, bs = "hash_ids", int(w.hash_block_size)
    elif w.has("token_ids"):
        off, keys = w.block_hashes_csr(ENGINE_BLOCK)
        basis, bs = "token_ids", ENGINE_BLOCK
    else:
        return None
    hit, total = reusable_fraction(off, keys)
    return {
        "basis": basis,
        "block_size": bs,
        "blocks_total": total,
        "blocks_reusable": hit,
        "ratio": hit / total if total else 0.0,
    }


def _dist(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    out = {"mean": float(np.mean(x)), "min": int(np.min(x))}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(x, p))
    out["max"] = int(np.max(x))
    return out


def trace_stats(w: Workload) -> dict:
    df = w.df
    n = len(df)
    t = df["arrival_s"].to_numpy(np.float64)
    duration = float(t[-1] - t[0]) if n else 0.0
    gaps = np.diff(t)
    cv = float(np.std(gaps) / np.mean(gaps)) if len(gaps) > 1 and np.mean(gaps) > 0 else None
    out: dict = {
        "name": w.name,
        "source": w.source,
        "requests": n,
        "duration_s": duration,
        "mean_rate_per_s": n / duration if duration > 0 else None,
        "interarrival_cv": cv,
        "prompt_tokens": _dist(df["prompt_tokens"].to_numpy()),
        "output_tokens": _dist(df["output_tokens"].to_numpy()),
        "sessions": None,
        "tenants": None,
        "prefix_reuse": prefix_reuse(w),
        "notes": list(w.notes),
    }
    if w.has("session_id"):
        s = df["session_id"].dropna()
        per = s.value_counts()
        out["sessions"] = {
            "count": int(len(per)),
            "requests_in_sessions": int(len(s)),
            "mean_turns": float(per.mean()),
            "max_turns": int(per.max()),
        }
    if w.has("tenant"):
        out["tenants"] = {str(k): int(v) for k, v in df["tenant"].value_counts().items()}
    return out


def format_stats(s: dict) -> str:
    """Human-readable multi-line summary."""

    def num(x, fmt="{:,.2f}"):
        return "n/a" if x is None else fmt.format(x)

    def dist(d):
        if not d:
            return "n/a"
        return (
            f"mean {d['mean']:,.0f}  p50 {d['p50']:,.0f}  p90 {d['p90']:,.0f}  p99 {d['p99']:,.0f}"
            f"  min {d['min']:,}  max {d['max']:,}"
        )

    lines = [
        f"trace            {s['name']}  ({s['source']})",
        f"requests         {s['requests']:,}",
        f"duration         {num(s['duration_s'])} s",
        f"mean rate        {num(s['mean_rate_per_s'], '{:,.3f}')} req/s",
        f"inter-arrival CV {num(s['interarrival_cv'])}",
        f"prompt tokens    {dist(s['prompt_tokens'])}",
        f"output tokens    {dist(s['output_tokens'])}",
    ]
    ss = s["sessions"]
    lines.append(
        "sessions         none"
        if ss is None
        else f"sessions         {ss['count']:,} ({ss['requests_in_sessions']:,} requests, mean {ss['mean_turns']:.2f} turns, max {ss['max_turns']})"
    )
    if s["tenants"]:
        lines.append("tenants          " + ", ".join(f"{k}: {v:,}" for k, v in s["tenants"].items()))
    pr = s["prefix_reuse"]
    lines.append(
        "prefix reuse     n/a (no prefix identity in this trace)"
        if pr is None
        else f"prefix reuse     {100 * pr['ratio']:.1f}% of {pr['blocks_total']:,} blocks reusable with an unbounded cache"
        f" ({pr['block_size']}-token blocks, from {pr['basis']})"
    )
    for note in s["notes"]:
        lines.append(f"note             {note}")
    return "\n".join(lines)
