"""Reading raw trace files (CSV, JSONL, JSON arrays; optionally gzip) with line numbers.

Why: every error must name the file *line*, so readers return, next to the raw records, the
1-based line number each record came from. Fast columnar paths (pandas' C CSV parser,
pyarrow's JSON reader) are used first; the slow line-by-line path runs only when a file is
broken, to find and name the broken line (or skip it with ``skip_invalid``).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pajson

from traces.issues import IssueLog, trace_error


def is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


def open_text(path: Path) -> io.TextIOBase:
    if is_gzip(path):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def head_text(path: Path, max_bytes: int = 65536) -> str:
    """The first bytes of a (possibly gzipped) file, for format detection."""
    if is_gzip(path):
        with gzip.open(path, "rb") as f:
            raw = f.read(max_bytes)
    else:
        with open(path, "rb") as f:
            raw = f.read(max_bytes)
    return raw.decode("utf-8", errors="replace")


def nonblank_line_numbers(data: bytes) -> np.ndarray:
    """1-based numbers of the lines that contain anything but whitespace (vectorised)."""
    if not data:
        return np.zeros(0, dtype=np.int64)
    b = np.frombuffer(data, dtype=np.uint8)
    nl = np.flatnonzero(b == 10)
    starts = np.concatenate([[0], nl + 1])
    ends = np.concatenate([nl, [len(b)]])
    ws = (b == 32) | (b == 9) | (b == 13) | (b == 10)
    cum = np.concatenate([[0], np.cumsum(~ws, dtype=np.int64)])
    nonblank = cum[ends] - cum[starts] > 0
    return np.flatnonzero(nonblank).astype(np.int64) + 1


# --------------------------------------------------------------------------------------- CSV
def read_csv_raw(path: Path, log: IssueLog) -> tuple[pd.DataFrame, np.ndarray]:
    """Columns (numeric where the whole column parses, else text) plus the line number of
    every row (header = line 1). Type inference by pandas' C parser keeps clean files fast;
    columns with a bad cell come back as text and the loaders' checks name the cell.

    Blank lines are kept as all-missing rows so that row -> line stays exact and a blank line
    is reported like any other malformed row. A row with too many fields is an error (or is
    skipped and counted with ``skip_invalid``).
    """
    bad_lines: list[int] = []
    kw = dict(skip_blank_lines=False, low_memory=False)
    try:
        if log.skip_invalid:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                df = pd.read_csv(path, on_bad_lines="warn", **kw)
            for w in caught:
                for part in str(w.message).splitlines():
                    if part.startswith("Skipping line"):
                        ln = int(part.split()[2].rstrip(":"))
                        bad_lines.append(ln)
                        log.add(("row", "wrong number of fields"), 1, ln)
        else:
            df = pd.read_csv(path, **kw)
    except pd.errors.ParserError as e:
        msg = str(e)
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", msg)
        if m:
            raise trace_error(str(path), int(m.group(2)), None, f"row has {m.group(3)} fields, the header has {m.group(1)}") from None
        m = re.search(r"line (\d+)", msg)
        line = int(m.group(1)) if m else None
        raise trace_error(str(path), line, None, "malformed CSV: " + msg.split("C error: ")[-1].strip()) from None
    except pd.errors.EmptyDataError:
        raise trace_error(str(path), None, None, "file is empty") from None
    except UnicodeDecodeError as e:
        raise trace_error(str(path), None, None, f"not UTF-8 text ({e.reason})") from None
    df.columns = [str(c).strip() for c in df.columns]
    total = len(df) + len(bad_lines)
    lines = np.arange(2, 2 + total, dtype=np.int64)
    if bad_lines:
        lines = lines[~np.isin(lines, np.array(bad_lines, dtype=np.int64))]
    # A trailing blank line is the usual end of a file, not a record.
    while len(df) and _row_blank(df.iloc[-1]) and lines[len(df) - 1] == lines[-1]:
        df = df.iloc[:-1]
        lines = lines[:-1]
    return df.reset_index(drop=True), lines


def _row_blank(row: pd.Series) -> bool:
    return all((v is None) or (isinstance(v, float) and v != v) or (str(v).strip() == "") for v in row.tolist())


# ------------------------------------------------------------------------------------- JSONL
def read_jsonl(path: Path, log: IssueLog) -> tuple[pd.DataFrame, np.ndarray]:
    """One JSON object per line -> DataFrame (list fields become Arrow lists), line numbers.

    Fast path: pyarrow's JSON reader. If it refuses the file (bad JSON, a field whose type
    changes between lines), fall back to ``json.loads`` per line to name the offending line.
    """
    data = read_bytes(path)
    lines = nonblank_line_numbers(data)
    try:
        table = pajson.read_json(
            io.BytesIO(data), read_options=pajson.ReadOptions(block_size=1 << 24)
        )
        if table.num_rows == len(lines):
            return _table_to_frame(table), lines
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    return _read_jsonl_slow(path, data, log)


def _read_jsonl_slow(path: Path, data: bytes, log: IssueLog) -> tuple[pd.DataFrame, np.ndarray]:
    records: list[dict] = []
    lines: list[int] = []
    text = data.decode("utf-8", errors="strict") if isinstance(data, bytes) else data
    for i, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            log.bad(i, None, "bad JSON", e.msg)
            continue
        if not isinstance(obj, dict):
            log.bad(i, None, "not a JSON object", type(obj).__name__)
            continue
        records.append(obj)
        lines.append(i)
    return records_to_frame(records), np.asarray(lines, dtype=np.int64)


def records_to_frame(records: list[dict]) -> pd.DataFrame:
    """dicts -> DataFrame; list-valued fields stay object columns (validated by the loader)."""
    if not records:
        return pd.DataFrame()
    df = pd.DataFrame.from_records(records)
    return df


def _table_to_frame(table: pa.Table) -> pd.DataFrame:
    """Arrow table -> pandas without a Python object per row for list columns."""
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_struct(col.type):
            cols[name] = pd.Series(pd.arrays.ArrowExtensionArray(col))
        else:
            cols[name] = col.to_pandas()
    return pd.DataFrame(cols, copy=False)


# --------------------------------------------------------------------------------- JSON array
def read_json_records(path: Path, log: IssueLog) -> tuple[list, np.ndarray]:
    """A JSON array of objects (ShareGPT, vLLM custom datasets) -> (records, line of each).

    Objects are decoded one at a time with ``raw_decode`` so each knows its starting line;
    a syntax error is reported at its line.
    """
    data = read_bytes(path).decode("utf-8")
    dec = json.JSONDecoder()
    n = len(data)
    i = _skip_ws(data, 0)
    if i >= n or data[i] != "[":
        raise trace_error(str(path), 1, None, "expected a JSON array of records")
    i += 1
    records, lines = [], []
    line, pos = 1, 0
    while True:
        i = _skip_ws(data, i)
        if i < n and data[i] == "]":
            break
        if i >= n:
            raise trace_error(str(path), data.count("\n") + 1, None, "bad JSON: unterminated array")
        line += data.count("\n", pos, i)
        pos = i
        try:
            obj, end = dec.raw_decode(data, i)
        except json.JSONDecodeError as e:
            raise trace_error(str(path), e.lineno, None, f"bad JSON: {e.msg}") from None
        records.append(obj)
        lines.append(line)
        i = _skip_ws(data, end)
        if i < n and data[i] == ",":
            i += 1
        elif i < n and data[i] == "]":
            break
        else:
            raise trace_error(str(path), line + data.count("\n", pos, i), None, "bad JSON: expected ',' or ']'")
    return records, np.asarray(lines, dtype=np.int64)


def _skip_ws(s: str, i: int) -> int:
    n = len(s)
    while i < n and s[i] in " \t\r\n":
        i += 1
    return i
