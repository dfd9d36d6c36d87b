"""Open-loop replay of a workload against an OpenAI-compatible vLLM server.

Two parts:

- :func:`build_requests` turns a :class:`traces.schema.Workload` into token-id prompts that carry
  the trace's prefix structure to the real engine. The block-hash chain of
  :func:`traces.schema.engine_block_hashes` (at the *engine's* block size) is mapped to token ids,
  one seeded draw of ``block_size`` ids per distinct chained hash. Two requests that share their
  first k engine blocks in the trace therefore send identical first ``k*block_size`` token ids, so
  vLLM's prefix cache sees exactly the reuse the simulator sees; every other block is unique.
  Traces with real token ids send those (folded into the model's vocabulary, shifted by a
  seed-derived salt). Different seeds give different ids with the same sharing structure, so
  successive runs on one server do not hit each other's prefix cache.
- :func:`replay` is an asyncio open-loop client: each request is sent at its arrival time whether
  or not earlier ones finished, as a streaming ``/v1/completions`` with ``ignore_eos``,
  ``max_tokens = min_tokens = output length``. It records, per request, the send time, the arrival
  time of every token and the end; errors, timeouts and short outputs are kept as rows with a
  status and reason, never dropped. It scrapes ``/metrics`` periodically and measures its own
  overhead (send lag behind schedule, event-loop lag, CPU use), so one can check the client was not
  the bottleneck.

Times are seconds relative to the replay start (``t0``, ``time.perf_counter``); ``t0_wall`` is the
same instant in ``time.time()``, to line the client's clock up with the server log's timestamps.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from traces.schema import Workload

# Token ids below this are left alone (bos/eos/unk of Llama-style vocabularies).
_FIRST_ID = 3


@dataclass(slots=True)
class ReplayRequest:
    request_id: str
    arrival_s: float
    prompt_ids: list[int]
    output_tokens: int

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def _missing(v) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


def _block_ids(key: int, seed: int, n: int, vocab_size: int) -> np.ndarray:
    ss = np.random.SeedSequence([seed & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF, key & 0xFFFFFFFF])
    return np.random.default_rng(ss).integers(_FIRST_ID, vocab_size, size=n, dtype=np.int64)


def prompt_token_ids(workload: Workload, *, block_size: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts for every request (see module docstring for how prefixes are kept)."""
    if vocab_size <= _FIRST_ID + 1:
        raise ValueError(f"vocab_size {vocab_size} too small")
    df = workload.df
    n = len(df)
    prompt_lens = df["prompt_tokens"].to_numpy(np.int64)
    token_col = None
    if workload.has("token_ids"):
        token_col = df["token_ids"].tolist()
    hashes = workload.all_block_hashes(block_size)
    cache: dict[int, np.ndarray] = {}
    out: list[list[int]] = []
    span = vocab_size - _FIRST_ID
    salt = int(np.random.default_rng(seed).integers(0, span)) if seed else 0
    for i in range(n):
        plen = int(prompt_lens[i])
        toks = token_col[i] if token_col is not None else None
        if not _missing(toks):
            arr = np.asarray(toks, dtype=np.int64)[:plen]
            if len(arr) == plen:  # real ids folded into the vocabulary, shifted by a seed-derived salt
                out.append((_FIRST_ID + np.mod(arr + salt, span)).tolist())
                continue
        parts = []
        for h in hashes[i]:
            blk = cache.get(h)
            if blk is None:
                blk = cache[h] = _block_ids(int(h), seed, block_size, vocab_size)
            parts.append(blk)
        tail = plen - len(hashes[i]) * block_size
        if tail > 0:  # the partial last block: unique to the request (vLLM never caches it anyway)
            parts.append(_block_ids((1 << 63) | i, seed ^ 0x7A11, tail, vocab_size))
        out.append(np.concatenate(parts).tolist() if parts else [])
    return out


def build_requests(workload: Workload, *, block_size: int, vocab_size: int, seed: int = 0,
                   max_model_len: int | None = None) -> list[ReplayRequest]:
    """The workload as replayable requests (arrival order kept; ``request_id`` from the trace if any).

    With ``max_model_len``, a request whose prompt + output does not fit raises ``ValueError``
    naming the row, instead of being silently cut (cap the workload before replaying it).
    """
    df = workload.df
    prompts = prompt_token_ids(workload, block_size=block_size, vocab_size=vocab_size, seed=seed)
    ids = df["request_id"].astype(str).tolist() if workload.has("request_id") else [f"r{i}" for i in range(len(df))]
    arr = df["arrival_s"].to_numpy(np.float64)
    outs = df["output_tokens"].to_numpy(np.int64)
    reqs = []
    for i in range(len(df)):
        if max_model_len is not None and len(prompts[i]) + int(outs[i]) > max_model_len:
            raise ValueError(f"{workload.source or workload.name}: row {i}: prompt {len(prompts[i])} + output "
                             f"{int(outs[i])} tokens exceeds max_model_len {max_model_len}")
        reqs.append(ReplayRequest(ids[i], float(arr[i]), prompts[i], int(outs[i])))
    return reqs


# -- /metrics ----------------------------------------------------------------------------------------

SCRAPED_METRICS = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)
_PROM_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str, names: tuple[str, ...] = SCRAPED_METRICS) -> dict[str, float]:
    """Sum of each named sample over its label sets (one engine -> one sample each)."""
    wanted = set(names)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _PROM_LINE.match(line)
        if m and m.group(1) in wanted:
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    return out


# -- the client ------------------------------------------------------------------------------------

@dataclass
class ReplayResult:
    """Per-request table, scraped metrics and the client's own overhead measurements.

    ``requests`` columns: request_id, arrival_s (scheduled), send_s, first_token_s, end_s,
    prompt_tokens, output_tokens (requested), tokens_received, cached_tokens, ttft_s, tpot_s, e2e_s,
    status (ok | error | timeout | short), reason, token_times (list of token arrival times).
    Latencies are measured from ``send_s`` (what the engine saw); ``send_lag_s`` in ``overhead``
    says how far sends slipped behind the schedule.
    """

    requests: pd.DataFrame
    metrics: pd.DataFrame
    overhead: dict
    t0_wall: float
    duration_s: float
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return summarize(self.requests, self.duration_s)


def summarize(df: pd.DataFrame, duration_s: float | None = None) -> dict:
    ok = df[df["status"] == "ok"]
    s: dict = {"requests_total": int(len(df)), "requests_ok": int(len(ok)),
               "requests_failed": int(len(df) - len(ok))}
    for col in ("ttft_s", "tpot_s", "e2e_s"):
        v = ok[col].dropna().to_numpy()
        for q in (50, 90, 99):
            s[f"{col[:-2]}_p{q}_s"] = float(np.percentile(v, q)) if len(v) else float("nan")
    if len(ok):
        span = float(ok["end_s"].max() - df["send_s"].min())
        s["throughput_req_s"] = len(ok) / span if span > 0 else float("nan")
        s["throughput_tok_s"] = float(ok["tokens_received"].sum()) / span if span > 0 else float("nan")
    if duration_s is not None:
        s["duration_s"] = duration_s
    return s


async def _send(session, url: str, model: str, req: ReplayRequest, t0: float, timeout_s: float, row: dict) -> None:
    import aiohttp

    body = {"model": model, "prompt": req.prompt_ids, "max_tokens": req.output_tokens,
            "min_tokens": req.output_tokens, "ignore_eos": True, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}
    times: list[float] = []
    row["token_times"] = times
    pc = time.perf_counter
    row["send_s"] = pc() - t0
    try:
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300].replace("\n", " ")
                row["status"], row["reason"] = "error", f"HTTP {resp.status}: {text}"
                return
            async for raw in resp.content:
                now = pc() - t0
                if not raw.startswith(b"data: "):
                    continue
                payload = raw[6:].strip()
                if payload == b"[DONE]":
                    break
                msg = json.loads(payload)
                if "error" in msg:
                    row["status"], row["reason"] = "error", str(msg["error"])[:300]
                    return
                choices = msg.get("choices") or []
                if choices:
                    ids = choices[0].get("token_ids")
                    k = len(ids) if ids is not None else 1
                    times.extend([now] * k)
                usage = msg.get("usage")
                if usage:
                    row["usage_completion_tokens"] = usage.get("completion_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    row["cached_tokens"] = details.get("cached_tokens")
    except asyncio.TimeoutError:
        row["status"], row["reason"] = "timeout", f"no completion within {timeout_s:g} s"
    except Exception as e:  # connection refused/reset (server died), bad payloads: kept per request
        row["status"], row["reason"] = "error", f"{type(e).__name__}: {e}"[:300]
    else:
        n = len(times)
        if n == req.output_tokens:
            row["status"], row["reason"] = "ok", ""
        else:
            row["status"], row["reason"] = "short", f"received {n} of {req.output_tokens} tokens"
    finally:
        row["end_s"] = (times[-1] if times else pc() - t0)


async def _scrape(session, url: str, t0: float, interval_s: float, rows: list[dict], stop: asyncio.Event) -> None:
    import aiohttp

    while True:  # one last scrape after `stop` is set, so counters cover the whole run
        t = time.perf_counter() - t0
        try:
            async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
                vals = parse_prometheus(await r.text())
            rows.append({"t_s": t, **vals})
        except Exception as e:  # noqa: BLE001 - a missed scrape is recorded, not fatal
            rows.append({"t_s": t, "error": f"{type(e).__name__}: {e}"[:200]})
        if stop.is_set():
            return
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval_s)
        except asyncio.TimeoutError:
            pass


async def _loop_lag(t0: float, period_s: float, lags: list[float], stop: asyncio.Event) -> None:
    """Oversleep of a short periodic timer = how late the event loop runs callbacks."""
    pc = time.perf_counter
    while not stop.is_set():
        a = pc()
        await asyncio.sleep(period_s)
        lags.append(pc() - a - period_s)


async def replay_async(url: str, requests: list[ReplayRequest], *, model: str, rate_scale: float = 1.0,
                       timeout_s: float = 300.0, metrics_interval_s: float = 1.0) -> ReplayResult:
    import aiohttp

    url = url.rstrip("/")
    rows = [{"request_id": r.request_id, "arrival_s": r.arrival_s / rate_scale, "prompt_tokens": r.prompt_tokens,
             "output_tokens": r.output_tokens, "cached_tokens": None, "status": "not_sent", "reason": ""}
            for r in requests]
    metric_rows: list[dict] = []
    lags: list[float] = []
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter()
        t0_wall = time.time()
        scraper = asyncio.create_task(_scrape(session, url, t0, metrics_interval_s, metric_rows, stop))
        ticker = asyncio.create_task(_loop_lag(t0, 0.01, lags, stop))
        tasks = []
        base = requests[0].arrival_s / rate_scale if requests else 0.0
        for req, row in zip(requests, rows):
            target = req.arrival_s / rate_scale - base
            delay = target - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            row["arrival_s"] = target
            tasks.append(asyncio.create_task(_send(session, url, model, req, t0, timeout_s, row)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        stop.set()
        await asyncio.gather(scraper, ticker)
    cpu = time.process_time() - cpu0
    df = latency_columns(pd.DataFrame(rows))
    for col in ("ttft_s", "e2e_s"):  # a failed request has no latency; its row says why
        df.loc[df["status"] != "ok", col] = np.where(df.loc[df["status"] != "ok", "tokens_received"] > 0,
                                                     df.loc[df["status"] != "ok", col], np.nan)
    send_lag = (df["send_s"] - df["arrival_s"]).to_numpy()
    lag_arr = np.asarray(lags) if lags else np.zeros(1)
    chunks = int(df["tokens_received"].sum())
    overhead = {
        "send_lag_p50_s": float(np.percentile(send_lag, 50)),
        "send_lag_p99_s": float(np.percentile(send_lag, 99)),
        "send_lag_max_s": float(send_lag.max()),
        "loop_lag_p50_s": float(np.percentile(lag_arr, 50)),
        "loop_lag_p99_s": float(np.percentile(lag_arr, 99)),
        "loop_lag_max_s": float(lag_arr.max()),
        "client_cpu_s": cpu,
        "client_cpu_util": cpu / duration if duration > 0 else float("nan"),
        "client_cpu_per_token_us": 1e6 * cpu / chunks if chunks else float("nan"),
    }
    order = ["request_id", "arrival_s", "send_s", "first_token_s", "end_s", "prompt_tokens", "output_tokens",
             "tokens_received", "cached_tokens", "ttft_s", "tpot_s", "e2e_s", "status", "reason", "token_times"]
    extra = [c for c in df.columns if c not in order]
    return ReplayResult(df[order + extra], pd.DataFrame(metric_rows), overhead, t0_wall, duration)


def latency_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Add the client-measured latencies of replayed requests (rows with ``send_s``, ``end_s`` and
    the ``token_times`` of each streamed token): tokens_received, first_token_s, ttft_s, e2e_s and
    tpot_s (NaN with fewer than two tokens). Callers decide what a failed request keeps."""
    df["tokens_received"] = df["token_times"].map(len)
    df["first_token_s"] = df["token_times"].map(lambda t: t[0] if t else np.nan)
    df["ttft_s"] = df["first_token_s"] - df["send_s"]
    df["e2e_s"] = df["end_s"] - df["send_s"]
    df["tpot_s"] = [(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else np.nan for t in df["token_times"]]
    return df


def replay(url: str, requests: list[ReplayRequest], *, model: str, rate_scale: float = 1.0,
           timeout_s: float = 300.0, metrics_interval_s: float = 1.0, client_cpus: set[int] | None = None) -> ReplayResult:
    """Blocking wrapper of :func:`replay_async`; pins this thread to ``client_cpus`` meanwhile
    (so the engine keeps its core) and restores the previous affinity afterwards."""
    prev = None
    if client_cpus and hasattr(os, "sched_setaffinity"):
        prev = os.sched_getaffinity(0)
        os.sched_setaffinity(0, client_cpus)
    try:
        return _run_coroutine(lambda: replay_async(url, requests, model=model, rate_scale=rate_scale,
                                                   timeout_s=timeout_s, metrics_interval_s=metrics_interval_s))
    finally:
        if prev is not None:
            os.sched_setaffinity(0, prev)


def _run_coroutine(make_coro):
    """Run a coroutine to completion from sync code, even where an event loop is already running
    in this thread (Jupyter, or a library that left one running): then it gets its own thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()
