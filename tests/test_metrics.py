"""sim.metrics: the columnar time series, label columns and the summary are exactly what the
straightforward pandas constructions give (same values, dtypes, column order)."""

import math

import numpy as np
import pandas as pd
import pytest

from sim.metrics import COMPLETED, FAILED, REJECTED, SLO, LogHistogram, TimeSeries, labelled_column, summarize


def _random_rows(rng, ticks, replicas):
    """Rows as the sampler writes them: per tick, replica rows then a cluster row (replica -1)."""
    states = ["starting", "serving", "draining"]
    rows = []
    for k in range(ticks):
        t = k * 0.5 + float(rng.random())  # any float, not a round number
        for rid in range(replicas):
            rows.append((t, rid, states[int(rng.integers(3))], int(rng.integers(0, 300)), int(rng.integers(0, 50)),
                         float(rng.random()), float(rng.random()), int(rng.integers(0, 9)),
                         int(rng.integers(0, 2**40)), int(rng.integers(0, 400))))
        rows.append((t, -1, f"replicas={int(rng.integers(0, 4))}", 1, 2, float(rng.random()), np.nan, 3,
                     int(rng.integers(0, 2**50)), 5))
    return rows


def _series_from_rows(rows, flush=None):
    ts = TimeSeries()
    if flush is not None:
        ts.FLUSH = flush
    i = 0
    while i < len(rows):
        t = rows[i][0]
        n = 0
        while i < len(rows) and rows[i][0] == t:
            _, rid, state, run, wait, kv, hr, pre, gen, infl = rows[i]
            ts.ints.extend((rid, ts.code(state), run, wait, pre, gen, infl))
            ts.floats.extend((kv, hr))
            i += 1
            n += 1
        ts.end_tick(t, n)
    return ts


@pytest.mark.parametrize("flush", [None, 7, 1])
def test_timeseries_frame_equals_frame_of_row_tuples(flush):
    rows = _random_rows(np.random.default_rng(3), ticks=40, replicas=3)
    got = _series_from_rows(rows, flush).frame()
    want = pd.DataFrame(rows, columns=list(TimeSeries.COLUMNS))
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert list(got.dtypes) == list(want.dtypes)
    assert len(_series_from_rows(rows, flush)) == len(rows)


def test_timeseries_frame_can_be_built_twice_and_empty_frame_matches():
    ts = _series_from_rows(_random_rows(np.random.default_rng(4), ticks=5, replicas=2), flush=4)
    pd.testing.assert_frame_equal(ts.frame(), ts.frame(), check_exact=True)
    empty = TimeSeries().frame()
    pd.testing.assert_frame_equal(empty, pd.DataFrame([], columns=list(TimeSeries.COLUMNS)))


@pytest.mark.parametrize("labels, codes", [
    (["completed", "rejected", "failed"], [0, 2, 1, 0]),
    (["completed", "rejected", "failed"], [0, 0]),  # unused string labels do not change the dtype
    ([None], [0, 0, 0]),  # only None: object column of None
    ([None, "no_replicas"], [0, 1, 0]),  # strings and None: pandas' inferred string column
    ([None, "no_replicas"], [1, 1]),
])
def test_labelled_column_is_what_pandas_infers(labels, codes):
    got = pd.DataFrame({"c": labelled_column(labels, np.array(codes, dtype=np.int16))})
    want = pd.DataFrame({"c": [labels[c] for c in codes]})
    pd.testing.assert_frame_equal(got, want, check_exact=True)
    assert got["c"].dtype == want["c"].dtype


def _reference_summary(requests, duration_s, slo):
    """The summary's request statistics computed the obvious way (a filtered copy of the table)."""
    ok = requests[requests["status"] == COMPLETED]
    s = {"requests_completed": len(ok), "requests_failed": int((requests["status"] == FAILED).sum()),
         "requests_rejected": int((requests["status"] == REJECTED).sum())}
    for name, arr in (("ttft", ok["ttft_s"].to_numpy(dtype=float)), ("tpot", ok["tpot_s"].dropna().to_numpy(dtype=float)),
                      ("e2e", ok["e2e_s"].to_numpy(dtype=float)), ("queue", ok["queue_s"].to_numpy(dtype=float))):
        s[f"{name}_mean_s"] = float(arr.mean()) if len(arr) else float("nan")
        for q in (50, 90, 99):
            s[f"{name}_p{q}_s"] = float(np.percentile(arr, q)) if len(arr) else float("nan")
    s["throughput_output_tok_s"] = int(ok["output_tokens"].sum()) / duration_s
    good = requests["status"] == COMPLETED
    good &= requests["ttft_s"] <= slo.ttft_s
    good &= requests["tpot_s"].fillna(0.0) <= slo.tpot_s
    good &= requests["e2e_s"] <= slo.e2e_s
    s["slo_attainment"] = float(good.sum() / len(requests))
    s["goodput_req_s"] = float(good.sum() / duration_s)
    return s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summarize_equals_filtered_table_reference(seed):
    rng = np.random.default_rng(seed)
    n = 500
    status = rng.choice([COMPLETED, REJECTED, FAILED], n, p=[0.8, 0.15, 0.05])
    done = status == COMPLETED
    out = np.where(done, rng.integers(1, 300, n), 0)
    tpot = np.where(done & (out > 1), rng.random(n) * 0.05, np.nan)
    req = pd.DataFrame({
        "status": status,
        "ttft_s": np.where(done, rng.random(n), np.nan),
        "tpot_s": tpot,
        "e2e_s": np.where(done, rng.random(n) * 10, np.nan),
        "queue_s": np.where(done, rng.random(n) * 0.1, np.nan),
        "output_tokens": out,
    })
    slo = SLO(ttft_s=0.5, tpot_s=0.03, e2e_s=6.0)
    got = summarize(req, LogHistogram(), duration_s=123.4, gpu_hours=1.0, cost_usd=2.0, prefix_queries=0,
                    prefix_hits=0, preemptions=0, slo=slo, sim_wall_s=0.0)
    want = _reference_summary(req, 123.4, slo)
    for k, v in want.items():
        assert type(got[k]) is type(v), k
        assert got[k] == v or (math.isnan(got[k]) and math.isnan(v)), k
    assert got["requests_total"] == n


def test_summarize_with_no_completed_request():
    req = pd.DataFrame({"status": [REJECTED] * 3, "ttft_s": np.nan, "tpot_s": np.nan, "e2e_s": np.nan,
                        "queue_s": np.nan, "output_tokens": 0})
    s = summarize(req, LogHistogram(), duration_s=1.0, gpu_hours=0.0, cost_usd=0.0, prefix_queries=0,
                  prefix_hits=0, preemptions=0, slo=SLO(ttft_s=1.0), sim_wall_s=0.0)
    assert s["requests_completed"] == 0 and s["requests_rejected"] == 3
    assert math.isnan(s["ttft_p99_s"]) and s["slo_attainment"] == 0.0
