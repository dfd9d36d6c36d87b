"""Azure LLM inference traces, 2023 (Splitwise) and 2024 (week-long): one CSV schema.

``TIMESTAMP,ContextTokens,GeneratedTokens``; TIMESTAMP is a wall-clock datetime (2023: naive
with 7 fractional digits; 2024: may carry a UTC offset), rows in arrival order. No sessions or
prefix identity. Column-wise parsing (pandas C parser + vectorised datetime parsing), so the
16.8M/27.3M-row 2024 files load without a Python loop over rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from traces.formats.common import assemble, require_columns, take_options
from traces.issues import IssueLog, RowValidator, check_int, check_monotonic, blank_where
from traces.readers import read_csv_raw
from traces.schema import Workload

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def sniff(header: list[str]) -> bool:
    return all(c in header for c in COLUMNS)


def load(path: Path, log: IssueLog, opts: dict) -> Workload:
    take_options("azure", opts, {})
    raw, lines = read_csv_raw(path, log)
    require_columns(path, raw, list(COLUMNS), "Azure")
    v = RowValidator(log, lines)
    ts = pd.to_datetime(raw["TIMESTAMP"], format="ISO8601", errors="coerce", utc=True)
    nat = ts.isna().to_numpy()
    v.check(blank_where(raw["TIMESTAMP"], nat), "TIMESTAMP", "missing")
    v.check(nat, "TIMESTAMP", "not a date-time", raw["TIMESTAMP"])
    t_ns = ts.to_numpy(dtype="datetime64[ns]").view("int64")
    base = t_ns[~nat].min() if (~nat).any() else 0
    t = np.where(nat, 0.0, (t_ns - base) / 1e9)
    prompt = check_int(v, raw["ContextTokens"], "ContextTokens", minimum=1)
    output = check_int(v, raw["GeneratedTokens"], "GeneratedTokens", minimum=1)
    check_monotonic(v, t, "TIMESTAMP", raw["TIMESTAMP"])
    return assemble(path, log, v, {"arrival_s": t, "prompt_tokens": prompt, "output_tokens": output}, fmt="azure")
