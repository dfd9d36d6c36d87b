"""Property tests: native round trips, and a corrupted row is always found at its line."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim  # noqa: F401  (import order: see traces/__init__.py)
from sim.errors import TraceError
from traces.formats import load_file
from traces.formats.native import write
from traces.schema import LIST_DTYPE, Workload, normalize_frame


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 25))
    gaps = draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=n, max_size=n))
    d = {
        "arrival_s": np.cumsum(gaps) - gaps[0],
        "prompt_tokens": draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n)),
        "output_tokens": draw(st.lists(st.integers(1, 10**5), min_size=n, max_size=n)),
    }
    if draw(st.booleans()):
        d["session_id"] = [draw(st.sampled_from(["a", "b", "s 1", None])) for _ in range(n)]
        d["turn"] = [draw(st.one_of(st.none(), st.integers(1, 9))) for _ in range(n)]
    hbs = None
    if draw(st.booleans()):
        ids = [draw(st.lists(st.integers(0, 2**40), max_size=6)) for _ in range(n)]
        d["hash_ids"] = pd.Series(pa.array(ids, type=pa.list_(pa.int64())), dtype=LIST_DTYPE)
        hbs = draw(st.sampled_from([16, 512]))
    return Workload(normalize_frame(pd.DataFrame(d)), name="w", hash_block_size=hbs)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=workloads(), suffix=st.sampled_from([".parquet", ".csv", ".jsonl.gz"]))
def test_native_round_trip_preserves_the_table(tmp_path, w, suffix):
    back = load_file(write(w, tmp_path / f"w{suffix}"))
    assert back.hash_block_size == w.hash_block_size
    np.testing.assert_allclose(back.df["arrival_s"], w.df["arrival_s"], rtol=1e-8, atol=1e-6)
    for c in w.df.columns:
        if c == "arrival_s":
            continue
        a, b = w.df[c].tolist(), back.df[c].tolist()
        norm = lambda xs: [None if (x is None or x is pd.NA or (isinstance(x, float) and x != x)) else x for x in xs]  # noqa: E731
        assert norm(b) == norm(a), c


BAD_CELLS = {
    "TIMESTAMP": ["", "2023-13-45 99:00:00", "tomorrow"],
    "ContextTokens": ["", "-3", "0", "1.5", "x1"],
    "GeneratedTokens": ["", "-1", "0", "2.25", "nan?"],
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, 30), data=st.data())
def test_a_corrupted_azure_row_is_reported_at_its_line(tmp_path, n, data):
    t = pd.Timestamp("2023-11-16 18:00:00") + pd.to_timedelta(np.arange(n), unit="s")
    rows = [[ts.strftime("%Y-%m-%d %H:%M:%S.%f"), str(100 + i), str(10 + i)] for i, ts in enumerate(t)]
    j = data.draw(st.integers(0, n - 1))
    col = data.draw(st.sampled_from(sorted(BAD_CELLS)))
    rows[j][["TIMESTAMP", "ContextTokens", "GeneratedTokens"].index(col)] = data.draw(st.sampled_from(BAD_CELLS[col]))
    p = tmp_path / "az.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(",".join(r) + "\n" for r in rows))
    with pytest.raises(TraceError) as e:
        load_file(p, "azure")
    assert str(e.value).startswith(f"{p}:{j + 2}: field '{col}'")
    w = load_file(p, "azure", skip_invalid=True)
    assert len(w) == n - 1 and f"(first at line {j + 2})" in w.notes[-1]
