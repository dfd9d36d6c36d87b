"""fleetsim's own trace files: the :mod:`traces.schema` columns as Parquet, CSV or JSONL.

Parquet is the storage format (columnar, typed, compressed; list columns stay Arrow lists, so
a 10M-row trace loads without a Python object per row). The workload's ``hash_block_size``,
name and notes travel in the Parquet schema metadata (key ``fleetsim``); CSV and JSONL carry
``hash_block_size`` as a column. In CSV, list columns are written as ``[1,2,3]``.

Parquet rows have no line numbers: errors name the 1-based row instead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sim.errors import TraceError
from traces.formats.common import assemble, list_column, require_columns, take_options
from traces.issues import IssueLog, RowValidator, blank_where, check_float, check_int, check_monotonic, to_number, trace_error
from traces.readers import read_csv_raw, read_jsonl
from traces.schema import LIST_COLUMNS, NULLABLE_INT_COLUMNS, OPTIONAL_COLUMNS, STRING_COLUMNS, Workload, normalize_frame

META_KEY = b"fleetsim"
NATIVE = ("arrival_s", "prompt_tokens", "output_tokens")


def sniff(keys) -> bool:
    return set(NATIVE) <= set(keys)


# ------------------------------------------------------------------------------------ reading
def load_parquet(path: Path, log: IssueLog, opts: dict) -> Workload:
    take_options("parquet", opts, {})
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise trace_error(str(path), None, None, f"not a readable Parquet file ({e})") from None
    meta = json.loads((table.schema.metadata or {}).get(META_KEY, b"{}"))
    cols = {}
    for name in table.column_names:
        c = table.column(name)
        if pa.types.is_list(c.type) or pa.types.is_large_list(c.type):
            cols[name] = pd.Series(pd.arrays.ArrowExtensionArray(c))
        else:
            cols[name] = c.to_pandas()
    raw = pd.DataFrame(cols, copy=False)
    lines = np.arange(1, len(raw) + 1, dtype=np.int64)
    return _from_columns(path, raw, lines, log, meta.get("hash_block_size"), meta, fmt="parquet")


def load_csv(path: Path, log: IssueLog, opts: dict) -> Workload:
    take_options("csv", opts, {})
    raw, lines = read_csv_raw(path, log)
    for c in LIST_COLUMNS:
        if c in raw.columns:
            raw[c] = _parse_list_strings(path, raw[c], lines, log, c)
    return _from_columns(path, raw, lines, log, _block_size_column(path, raw, lines), {}, fmt="csv")


def load_jsonl(path: Path, log: IssueLog, opts: dict) -> Workload:
    take_options("jsonl", opts, {})
    raw, lines = read_jsonl(path, log)
    return _from_columns(path, raw, lines, log, _block_size_column(path, raw, lines), {}, fmt="jsonl")


def _block_size_column(path: Path, raw: pd.DataFrame, lines: np.ndarray) -> int | None:
    if "hash_block_size" not in raw.columns:
        return None
    num = pd.to_numeric(raw["hash_block_size"].astype("str"), errors="coerce")
    vals = num.dropna().unique()
    if len(vals) != 1 or vals[0] <= 0 or vals[0] != int(vals[0]):
        bad = int(np.flatnonzero((num != num.iloc[0]).to_numpy() | num.isna().to_numpy())[0]) if len(vals) else 0
        raise trace_error(str(path), int(lines[bad]), "hash_block_size", "must be one positive integer for the whole file")
    return int(vals[0])


def _parse_list_strings(path: Path, col: pd.Series, lines: np.ndarray, log: IssueLog, name: str) -> pd.Series:
    """``"[1,2,3]"`` strings -> Arrow list<int64>, vectorised; bad cells become missing here
    and are reported by the column check (with their line)."""
    s = pa.array(col.astype("str").where(col.astype("str").str.strip() != "", None).tolist(), type=pa.string())
    trimmed = pc.utf8_trim(s, "[] \t")
    parts = pc.split_pattern_regex(trimmed, r"\s*,\s*")
    empty = pc.equal(trimmed, "")
    try:
        lists = pc.cast(parts, pa.list_(pa.int64()))
        lists = pc.if_else(empty, pa.scalar([], type=pa.list_(pa.int64())), lists)
        return pd.Series(pd.arrays.ArrowExtensionArray(lists))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        out = []
        for i, (cell, e) in enumerate(zip(parts.to_pylist(), empty.to_pylist())):
            if cell is None:
                out.append(None)
            elif e:
                out.append([])
            else:
                try:
                    out.append([int(x) for x in cell])
                except ValueError:
                    log.bad(int(lines[i]), name, "must be a list of integers like [1,2,3]", str(col.iloc[i]))
                    out.append(None)
        return pd.Series(pd.arrays.ArrowExtensionArray(pa.array(out, type=pa.list_(pa.int64()))))


def _from_columns(path, raw, lines, log, hbs, meta, *, fmt) -> Workload:
    require_columns(path, raw, list(NATIVE), "fleetsim")
    v = RowValidator(log, lines)
    t = check_float(v, raw["arrival_s"], "arrival_s", minimum=None)
    cols: dict = {
        "arrival_s": t,
        "prompt_tokens": check_int(v, raw["prompt_tokens"], "prompt_tokens", minimum=1),
        "output_tokens": check_int(v, raw["output_tokens"], "output_tokens", minimum=1),
    }
    for c in OPTIONAL_COLUMNS:
        if c not in raw.columns:
            continue
        col = raw[c]
        if c in LIST_COLUMNS:
            if col.notna().any():
                cols[c] = list_column(v, col, c, allow_missing=True)
        elif c in NULLABLE_INT_COLUMNS:
            num = to_number(col)
            blank = blank_where(col, num.isna().to_numpy())
            v.check(~blank & num.isna().to_numpy(), c, "not an integer", col)
            v.check((num.fillna(0) != num.fillna(0).round()).to_numpy(), c, "not an integer", col)
            cols[c] = num.round().astype("Int64")
        elif c in STRING_COLUMNS:
            sc = col.astype("str")
            cols[c] = sc.where(col.notna() & (sc != ""), np.nan)
    if "hash_ids" in cols and not hbs:
        raise trace_error(str(path), None, "hash_block_size", "file has hash_ids but no hash_block_size")
    check_monotonic(v, t, "arrival_s", raw["arrival_s"])
    w = assemble(path, log, v, cols, fmt=fmt, hash_block_size=hbs if "hash_ids" in cols else None)
    if meta.get("name"):
        w.name = meta["name"]
    if meta.get("notes"):
        w.notes = [*meta["notes"], *w.notes]
    return w


# ------------------------------------------------------------------------------------ writing
def write(w: Workload, path: Path) -> Path:
    """Write ``w`` as Parquet / CSV / JSONL (optionally ``.gz``) according to ``path``'s suffix."""
    path = Path(path)
    name = path.name.lower()
    df = normalize_frame(w.df)
    if name.endswith(".parquet"):
        table = pa.Table.from_pandas(df, preserve_index=False)
        meta = dict(table.schema.metadata or {})
        meta[META_KEY] = json.dumps({"hash_block_size": w.hash_block_size, "name": w.name, "notes": w.notes}).encode()
        pq.write_table(table.replace_schema_metadata(meta), path, compression="zstd")
    elif name.endswith(".csv") or name.endswith(".csv.gz"):
        out = df.copy()
        for c in LIST_COLUMNS:
            if c in out.columns:
                arr = pa.chunked_array(out[c].array._pa_array)
                txt = pc.binary_join_element_wise("[", pc.binary_join(pc.cast(arr, pa.list_(pa.string())), ","), "]", "")
                out[c] = pd.Series(pd.arrays.ArrowExtensionArray(txt)).astype("str")
        if w.hash_block_size and "hash_ids" in out.columns:
            out["hash_block_size"] = w.hash_block_size
        out.to_csv(path, index=False, float_format="%.9g", compression="infer")
    elif name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        out = df.copy()
        if w.hash_block_size and "hash_ids" in out.columns:
            out["hash_block_size"] = w.hash_block_size
        records = out.to_json(orient="records", lines=True, double_precision=15)
        import gzip

        data = records.encode()
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    else:
        raise TraceError(f"{path}: unknown output format (use .parquet, .csv, .csv.gz, .jsonl or .jsonl.gz)")
    return path
