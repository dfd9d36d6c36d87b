"""Big-trace loading: columnar, no Python object per row (marked slow; minutes at most)."""

import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import sim  # noqa: F401  (import order: see traces/__init__.py)
from traces.formats import load_file
from traces.schema import LIST_DTYPE


def _no_object_columns(df: pd.DataFrame) -> None:
    for c in df.columns:
        assert df[c].dtype != object, c  # numpy numbers, Arrow strings, Arrow lists only


@pytest.mark.slow
def test_10m_row_parquet_loads_columnar(tmp_path):
    n = 10_000_000
    rng = np.random.default_rng(0)
    table = pa.table({
        "arrival_s": np.cumsum(rng.exponential(0.01, n)),
        "prompt_tokens": rng.integers(1, 8000, n),
        "output_tokens": rng.integers(1, 1000, n),
        "session_id": pc.cast(pa.array(np.arange(n) // 4), pa.string()),
        "turn": (np.arange(n) % 4 + 1),
    })
    path = tmp_path / "big.parquet"
    pq.write_table(table, path)
    t = time.perf_counter()
    w = load_file(path)
    elapsed = time.perf_counter() - t
    print(f"10M-row Parquet loaded in {elapsed:.1f} s")
    assert len(w) == n
    _no_object_columns(w.df)
    assert w.df["session_id"].array.__class__.__name__.startswith("Arrow")
    assert elapsed < 120


@pytest.mark.slow
def test_1m_row_parquet_with_prefix_ids_stays_arrow(tmp_path):
    n = 1_000_000
    rng = np.random.default_rng(1)
    lens = rng.integers(1, 8, n)
    off = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    ids = pa.ListArray.from_arrays(pa.array(off), pa.array(rng.integers(0, 10_000, off[-1])))
    table = pa.table({"arrival_s": np.arange(n) * 0.01, "prompt_tokens": lens * 16, "output_tokens": np.ones(n, int), "hash_ids": ids})
    meta = {b"fleetsim": b'{"hash_block_size": 16}'}
    path = tmp_path / "ids.parquet"
    pq.write_table(table.replace_schema_metadata(meta), path)
    t = time.perf_counter()
    w = load_file(path)
    print(f"1M-row Parquet with hash_ids loaded in {time.perf_counter() - t:.1f} s")
    _no_object_columns(w.df)
    assert w.df["hash_ids"].dtype == LIST_DTYPE
    off2, val, present = w.list_csr("hash_ids")
    assert present.all() and off2[-1] == off[-1]
    t = time.perf_counter()
    hoff, _ = w.block_hashes_csr(16)
    print(f"engine block hashes of {hoff[-1]:,} blocks in {time.perf_counter() - t:.1f} s")
    assert hoff[-1] == int(lens.sum())


@pytest.mark.slow
def test_azure_2024_sized_csv_loads_fast(tmp_path):
    n = 2_000_000  # the 2024 week-long files have 16.8M / 27.3M rows of the same shape
    rng = np.random.default_rng(2)
    ts = pd.Timestamp("2024-05-10", tz="UTC") + pd.to_timedelta(np.cumsum(rng.exponential(0.03, n)), unit="s")
    df = pd.DataFrame({"TIMESTAMP": ts.strftime("%Y-%m-%d %H:%M:%S.%f+00:00"),
                       "ContextTokens": rng.integers(1, 8000, n), "GeneratedTokens": rng.integers(1, 1000, n)})
    path = tmp_path / "azure2024.csv"
    df.to_csv(path, index=False)
    t = time.perf_counter()
    w = load_file(path)
    elapsed = time.perf_counter() - t
    print(f"2M-row Azure CSV loaded in {elapsed:.1f} s")
    assert len(w) == n
    _no_object_columns(w.df)
    assert elapsed < 60
