"""What every format loader shares: options checking, column lookup, and the final assembly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa

from sim.errors import ConfigError
from traces.issues import IssueLog, RowValidator, trace_error
from traces.schema import LIST_DTYPE, Workload, normalize_frame

# A loader: (path, issue log, format options) -> Workload
Loader = Callable[[Path, IssueLog, dict], Workload]


def take_options(fmt: str, opts: dict, allowed: dict[str, Any]) -> dict:
    """Format options with defaults; an unknown option is a config error, never ignored."""
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise ConfigError(
            f"workload.options: unknown option(s) {unknown} for format {fmt!r} (allowed: {sorted(allowed) or 'none'})"
        )
    return {**allowed, **opts}


def require_columns(path: Path, df: pd.DataFrame, needed: list[str], fmt: str) -> None:
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise trace_error(str(path), 1, missing[0], f"column missing from the {fmt} header (have {list(df.columns)})")


def pick(df: pd.DataFrame, names: tuple[str, ...]) -> str | None:
    """First of ``names`` present in ``df`` (formats spell the same field differently)."""
    for n in names:
        if n in df.columns:
            return n
    return None


def list_column(v: RowValidator, raw: pd.Series, field_name: str, *, allow_missing: bool = False) -> pd.Series:
    """Validate a column of integer lists; return it Arrow-backed (``LIST_DTYPE``).

    ``allow_missing``: a missing list means "unknown" (native files) rather than an error."""
    if isinstance(raw.dtype, pd.ArrowDtype):
        t = raw.dtype.pyarrow_dtype
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_integer(t.value_type):
            out = raw.astype(LIST_DTYPE)
            if not allow_missing:
                v.check(out.isna().to_numpy(), field_name, "missing")
            return out
    # Mixed / object column (slow path): check element by element.
    items = raw.to_numpy(dtype=object) if not isinstance(raw.dtype, pd.ArrowDtype) else raw.tolist()
    clean: list = []
    bad_missing = np.zeros(len(items), dtype=bool)
    bad_type = np.zeros(len(items), dtype=bool)
    for i, x in enumerate(items):
        if x is None or x is pd.NA or (isinstance(x, float) and x != x):
            bad_missing[i] = True
            clean.append(None)
            continue
        if isinstance(x, np.ndarray):
            x = x.tolist()
        if not isinstance(x, (list, tuple)) or not all(isinstance(e, (int, np.integer)) and not isinstance(e, bool) for e in x):
            bad_type[i] = True
            clean.append(None)
            continue
        clean.append([int(e) for e in x])
    if not allow_missing:
        v.check(bad_missing, field_name, "missing")
    v.check(bad_type, field_name, "must be a list of integers", pd.Series(items, dtype=object))
    return pd.Series(pd.arrays.ArrowExtensionArray(pa.array(clean, type=pa.list_(pa.int64()))))


def assemble(
    path: Path,
    log: IssueLog,
    v: RowValidator,
    cols: dict[str, Any],
    *,
    fmt: str,
    hash_block_size: int | None = None,
    notes: list[str] | None = None,
    sort: bool = False,
    drop: np.ndarray | None = None,
) -> Workload:
    """Drop invalid rows (or raise), shift time to start at 0, cast, wrap in a Workload.

    ``drop`` removes valid rows the format itself defines as not-requests (e.g. BurstGPT
    failures); the loader must say so in ``notes``.
    """
    keep = v.finish()
    if drop is not None:
        keep = keep & ~np.asarray(drop, dtype=bool)
    df = pd.DataFrame({k: (c.reset_index(drop=True) if isinstance(c, pd.Series) else c) for k, c in cols.items()}, copy=False)
    if not keep.all():
        df = df[keep]
    if len(df) == 0:
        raise trace_error(str(path), None, None, "no valid requests in file")
    if sort:
        df = df.sort_values("arrival_s", kind="stable")
    df["arrival_s"] = df["arrival_s"] - df["arrival_s"].min()
    w = Workload(
        normalize_frame(df),
        name=path.name,
        hash_block_size=hash_block_size,
        source=str(path),
        notes=[f"format: {fmt}", *(notes or []), *log.notes()],
    )
    return w
