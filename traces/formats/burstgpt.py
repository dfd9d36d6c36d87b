"""BurstGPT (HPMLL/BurstGPT) CSV: ``Timestamp`` (s from the first day's midnight), ``Model``,
``Request tokens``, ``Response tokens``, ``Total tokens``, ``Log Type``; v1.2 adds
``Session ID`` and ``Elapsed time``.

Mapping: ``model`` = Model, ``tenant`` = Log Type ("Conversation log" / "API log": how the
client called the service), ``session_id`` = Session ID with ``turn`` = order within the
session. ``Elapsed time`` (the measured service time) is not part of a workload and is ignored.

Failed requests: the BurstGPT README defines rows with ``Response tokens`` = 0 as failures.
They are dropped *and counted in the workload notes* (they never produced tokens to simulate).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from traces.formats.common import assemble, pick, require_columns, take_options
from traces.issues import IssueLog, RowValidator, check_float, check_int, check_monotonic
from traces.readers import read_csv_raw
from traces.schema import Workload, normalize_frame

SESSION_COLUMNS = ("Session ID", "SessionID", "Session Id", "session_id")


def sniff(header: list[str]) -> bool:
    return {"Timestamp", "Request tokens", "Response tokens"} <= set(header)


def load(path: Path, log: IssueLog, opts: dict) -> Workload:
    take_options("burstgpt", opts, {})
    raw, lines = read_csv_raw(path, log)
    require_columns(path, raw, ["Timestamp", "Request tokens", "Response tokens"], "BurstGPT")
    v = RowValidator(log, lines)
    t = check_float(v, raw["Timestamp"], "Timestamp", minimum=0)
    prompt = check_int(v, raw["Request tokens"], "Request tokens", minimum=1)
    output = check_int(v, raw["Response tokens"], "Response tokens", minimum=0)
    check_monotonic(v, t, "Timestamp", raw["Timestamp"])
    notes = []
    failed = (output == 0) & ~v.bad_any
    if failed.any():
        notes.append(f"dropped {int(failed.sum())} failed request(s) (Response tokens = 0, BurstGPT's failure marker)")
    cols = {"arrival_s": t, "prompt_tokens": prompt, "output_tokens": np.maximum(output, 1)}
    if "Model" in raw.columns:
        cols["model"] = raw["Model"].astype("str")
    if "Log Type" in raw.columns:
        lt = raw["Log Type"].astype("str").str.strip()
        cols["tenant"] = lt.str.replace(" log", "", regex=False).str.lower()
    scol = pick(raw, SESSION_COLUMNS)
    if scol is not None:
        sid = raw[scol].astype("str").str.strip()
        cols["session_id"] = sid.where(sid != "", np.nan)
    w = assemble(path, log, v, cols, fmt="burstgpt", notes=notes, drop=failed)
    if scol is not None:
        # turn = order of the request within its session (after dropping failures)
        sid = w.df["session_id"]
        turn = sid.to_frame("s").groupby("s", dropna=True, sort=False).cumcount() + 1
        w.df["turn"] = turn.where(sid.notna()).astype("Int64")
        w.df = normalize_frame(w.df)
    return w
