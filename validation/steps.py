"""Per-step timings from vLLM's iteration log, and the step shapes the step-time model needs.

vLLM (``--enable-logging-iteration-details``; ``vllm/v1/metrics/loggers.py``,
``LoggingStatLogger._log_iteration_details``) logs one line per engine step::

    Engine 000: Iteration(i): X context requests, Y context tokens, Z generation requests,
    W generation tokens, iteration elapsed time: T ms[ (dummy)], CPU KV cache usage: U%

Two timings come out of it:

- ``elapsed_s`` (vLLM's T): measured in the engine core around waiting for the model's output
  (``EngineCore.capture_iteration_details``), i.e. model execution only. It excludes
  ``scheduler.schedule()``, ``update_from_output`` and sending outputs to the API server.
- ``period_s``: the difference of consecutive lines' wall-clock stamps (our logging config adds
  ``t=<unix s>`` to every line). When step i has generation requests, they were already running in
  step i-1, so the engine went straight from step i-1 to step i: the period is one whole engine
  cycle, which is what a simulated step must last. Periods of steps that may follow an idle gap
  are left NaN. The stamps are taken in the API server when it receives a step's outputs, so a
  single period carries that process's jitter; sums over consecutive periods are exact.

The log gives counts only. The attention features of :class:`sim.step_time.BatchShape`
(``prefill_attn`` = sum of chunk x (computed_before + chunk), ``decode_context`` = sum of decode
context lengths) are reconstructed from the replayed requests, see :func:`reconstruct_shapes`.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

ITERATION_RE = re.compile(
    r"(?:t=(?P<t>\d+(?:\.\d+)?)\s.*?)?"
    r"(?:Engine (?P<engine>\d+): )?"
    r"Iteration\((?P<iteration>\d+)\): "
    r"(?P<ctx_requests>\d+) context requests, (?P<ctx_tokens>\d+) context tokens, "
    r"(?P<gen_requests>\d+) generation requests, (?P<gen_tokens>\d+) generation tokens, "
    r"iteration elapsed time: (?P<ms>[\d.]+) ms(?P<dummy> \(dummy\))?"
    r"(?:, (?:\w+ )?KV cache usage: (?P<kv>[\d.]+)%)?"
)

STEP_COLUMNS = ("engine", "iteration", "t_log", "ctx_requests", "ctx_tokens", "gen_requests", "gen_tokens",
                "elapsed_s", "dummy", "kv_usage")


def parse_iteration_log(text: str) -> pd.DataFrame:
    """One row per logged engine step (dummy data-parallel steps are dropped).

    Columns: engine, iteration, t_log (unix s, NaN without our timestamp format), ctx_requests,
    ctx_tokens, gen_requests, gen_tokens, elapsed_s, dummy, kv_usage (fraction, NaN if absent),
    period_s (see module docstring).
    """
    rows = []
    for line in text.splitlines():
        if "Iteration(" not in line:
            continue
        m = ITERATION_RE.search(line)
        if m is None:
            continue
        g = m.groupdict()
        rows.append((
            int(g["engine"] or 0), int(g["iteration"]), float(g["t"]) if g["t"] else np.nan,
            int(g["ctx_requests"]), int(g["ctx_tokens"]), int(g["gen_requests"]), int(g["gen_tokens"]),
            float(g["ms"]) / 1000.0, bool(g["dummy"]), float(g["kv"]) / 100.0 if g["kv"] else np.nan,
        ))
    df = pd.DataFrame(rows, columns=list(STEP_COLUMNS))
    df = df[~df["dummy"]].sort_values(["engine", "iteration"], kind="stable").reset_index(drop=True)
    df["period_s"] = _periods(df)
    return df


def read_iteration_log(path: str | Path) -> pd.DataFrame:
    return parse_iteration_log(Path(path).read_text(errors="replace"))


def _periods(df: pd.DataFrame) -> np.ndarray:
    out = np.full(len(df), np.nan)
    if len(df) < 2:
        return out
    t = df["t_log"].to_numpy()
    it = df["iteration"].to_numpy()
    eng = df["engine"].to_numpy()
    gen = df["gen_requests"].to_numpy()
    # back-to-back: same engine, consecutive iteration numbers, and step i has decodes (which
    # were running in step i-1, so the engine could not have idled in between)
    ok = (eng[1:] == eng[:-1]) & (it[1:] == it[:-1] + 1) & (gen[1:] > 0)
    d = t[1:] - t[:-1]
    out[1:] = np.where(ok, d, np.nan)
    return out


# -- reconstruction ------------------------------------------------------------------------------

def _first_token_steps(t_log: np.ndarray, token_times_wall: list[np.ndarray]) -> np.ndarray:
    """For each request, the index (into ``t_log``) of the step that produced its first token.

    A request's tokens come from consecutive steps (no preemption), so token k was produced by
    step s+k. Token k arrives at the client after that step's log stamp and (normally) before the
    next one's: the naive step of token k is ``searchsorted(t_log, u_k) - 1``, giving a vote for
    ``s = naive_k - k``; the most common vote wins. Using every token, not only the first, makes
    the alignment robust to a few outputs the API server delivered late or merged.
    """
    out = np.full(len(token_times_wall), -1, dtype=np.int64)
    for r, u in enumerate(token_times_wall):
        if len(u) == 0:
            continue
        naive = np.searchsorted(t_log, u, side="right") - 1
        votes = naive - np.arange(len(u))
        votes = votes[votes >= 0]
        if len(votes) == 0:
            continue
        vals, counts = np.unique(votes, return_counts=True)
        out[r] = vals[np.argmax(counts)]
    return out


def reconstruct_shapes(steps: pd.DataFrame, requests: pd.DataFrame, t0_wall: float) -> tuple[pd.DataFrame, dict]:
    """Add reconstructed per-step features to ``steps`` (one engine's steps, in order).

    Inputs: ``steps`` from :func:`parse_iteration_log` (needs ``t_log``), ``requests`` from
    :class:`validation.replay.ReplayResult` (token_times relative to its ``t0``), and ``t0_wall``.

    Method (approximations stated):
    1. Each request's first-token step ``s_r`` by aligning its token arrival times to the steps'
       log stamps (:func:`_first_token_steps`); its decode steps are then ``s_r+1 .. s_r+n-1``
       with context ``P + k`` at its k-th decode (prompt + tokens so far). Assumes no preemption:
       a preempted request recomputes its prompt and breaks this; such steps fail the check below.
    2. Prefill chunks: each request must compute ``P - cached`` prompt tokens (cached from the
       server's usage block; 0 if the server does not report it) and finish them in step ``s_r``.
       vLLM schedules running requests first (a partial prefill continues first), then waiting
       ones in FCFS order, and only the last request of a step can be cut. So, step by step: the
       requests whose first token came from this step take all their remaining prompt, and the
       logged ``ctx_tokens`` left over go to the next request in send (FCFS) order as a partial
       chunk. A chunk of c tokens after b computed ones adds ``c * (b + c)`` to ``prefill_attn``.
       Anchoring on ``s_r`` every step keeps one wrong cached count from shifting later steps.
    3. Check: a step is ``reconstructed`` only if the rebuilt numbers equal the log's exactly:
       decode requests (Z), context requests (X) and all its context tokens (Y) assigned. Only
       such steps should be used for fitting; the rest keep NaN features.

    Returns (steps with columns prefill_seqs, prefill_tokens, prefill_attn, decode_seqs,
    decode_context, num_seqs, reconstructed; and a report dict with match rates).
    """
    st = steps.reset_index(drop=True).copy()
    n = len(st)
    t_log = st["t_log"].to_numpy(np.float64)
    if n == 0 or np.isnan(t_log).any():
        raise ValueError("reconstruct_shapes needs the log's t= timestamps on every step "
                         "(start the server with validation.engine's logging config)")
    req = requests[requests["tokens_received"] > 0].sort_values("send_s", kind="stable")
    tt = [t0_wall + np.asarray(t, dtype=np.float64) for t in req["token_times"]]
    s_first = _first_token_steps(t_log, tt)

    dec_n = np.zeros(n, np.int64)
    dec_ctx = np.zeros(n, np.float64)
    ctx_tok = st["ctx_tokens"].to_numpy(np.int64)
    pre_reqs: list[set] = [set() for _ in range(n)]
    pre_attn = np.zeros(n, np.float64)
    bad = np.zeros(n, bool)
    prompt = req["prompt_tokens"].to_numpy(np.int64)
    cached_raw = pd.to_numeric(req["cached_tokens"], errors="coerce")
    cached = cached_raw.fillna(0).to_numpy(np.int64)
    cached_known = bool(cached_raw.notna().any())
    ntok = np.array([len(t) for t in tt], np.int64)
    unplaced = int((s_first < 0).sum())
    # decodes: request j produces token k in step s_j + k
    for j in np.flatnonzero(s_first >= 0):
        s = int(s_first[j])
        last = min(n, s + int(ntok[j]))
        if last > s + 1:
            dec_n[s + 1:last] += 1
            dec_ctx[s + 1:last] += prompt[j] + np.arange(1, last - s)
    # prefill chunks, forward over steps, anchored on each request's first-token step
    remaining = prompt - np.minimum(cached, prompt - 1)  # a full hit still recomputes one token
    computed = np.minimum(cached, prompt - 1).astype(np.int64)
    fcfs = [j for j in np.argsort(req["send_s"].to_numpy(), kind="stable") if s_first[j] >= 0]
    due_at: dict[int, list[int]] = {}
    for j in fcfs:
        due_at.setdefault(int(s_first[j]), []).append(j)
    pos = 0  # fcfs[pos:] may still be prefilling
    done = np.zeros(len(req), bool)

    def take(i: int, j: int, c: int) -> None:
        pre_reqs[i].add(j)
        pre_attn[i] += c * (computed[j] + c)
        computed[j] += c
        remaining[j] -= c

    for i in range(n):
        cap = int(ctx_tok[i])
        for j in due_at.get(i, ()):  # must finish their prompt in this step
            c = int(remaining[j])
            if c > cap:
                bad[i] = True
            take(i, j, c)
            cap -= c
            done[j] = True
        while pos < len(fcfs) and done[fcfs[pos]]:
            pos += 1
        # leftover capacity: the next request in FCFS order got a chunk and was cut there (vLLM
        # cuts only the last request of a step, so one partial chunk at most)
        k = pos
        while k < len(fcfs) and (done[fcfs[k]] or s_first[fcfs[k]] <= i):
            k += 1
        if cap > 0 and k < len(fcfs):
            j = fcfs[k]
            c = int(min(cap, remaining[j] - 1))  # it does not finish here: its first token came later
            if c > 0:
                take(i, j, c)
                cap -= c
        if cap != 0:
            bad[i] = True
    pre_n = np.array([len(x) for x in pre_reqs], np.int64)
    ok = ((dec_n == st["gen_requests"].to_numpy()) & (pre_n == st["ctx_requests"].to_numpy())
          & ~bad)
    st["prefill_seqs"] = st["ctx_requests"]
    st["prefill_tokens"] = st["ctx_tokens"]
    st["decode_seqs"] = st["gen_requests"]
    st["num_seqs"] = st["ctx_requests"] + st["gen_requests"]
    st["prefill_attn"] = np.where(ok, pre_attn, np.nan)
    st["decode_context"] = np.where(ok, dec_ctx, np.nan)
    st["reconstructed"] = ok
    report = {
        "steps": int(n),
        "steps_reconstructed": int(ok.sum()),
        "reconstructed_frac": float(ok.mean()) if n else float("nan"),
        "decode_count_match_frac": float((dec_n == st["gen_requests"].to_numpy()).mean()) if n else float("nan"),
        "prefill_count_match_frac": float((pre_n == st["ctx_requests"].to_numpy()).mean()) if n else float("nan"),
        "requests_unplaced": int(unplaced),
        "cached_tokens_known": cached_known,
    }
    return st, report
