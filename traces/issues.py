"""Row-level validation shared by every loader: strict by default, explicit skipping on request.

Why one place: the rule "a malformed row is an error naming file, line and field; with
``skip_invalid`` the rest loads and the skipped rows are counted by reason" must hold the same way
for every format. Checks are vectorised (a boolean mask per check over all rows), so validating a
10M-row file costs a few numpy passes, not a Python loop.

In strict mode the error reports the *first* bad line of the file, whichever check caught it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from sim.errors import TraceError


def trace_error(path: str, line: int | None, field_name: str | None, reason: str) -> TraceError:
    """The one-line error format: ``file:line: field 'x': reason``."""
    where = f"{path}:{line}" if line is not None else str(path)
    fld = f" field '{field_name}':" if field_name else ""
    return TraceError(f"{where}:{fld} {reason}")


@dataclass
class IssueLog:
    """Counts of skipped rows by (field, reason) plus the first line of each, for notes/CLI."""

    path: str
    skip_invalid: bool = False
    counts: Counter = field(default_factory=Counter)
    first_line: dict = field(default_factory=dict)

    def bad(self, line: int | None, field_name: str | None, reason: str, detail: str = "") -> None:
        """One bad row (used by the line-by-line readers): raise, or count it."""
        if not self.skip_invalid:
            raise trace_error(self.path, line, field_name, reason + (f" ({detail})" if detail else ""))
        key = (field_name or "row", reason)
        self.counts[key] += 1
        self.first_line.setdefault(key, line)

    def add(self, key: tuple[str, str], count: int, first_line: int | None) -> None:
        self.counts[key] += count
        if key not in self.first_line or (first_line is not None and (self.first_line[key] or 1 << 62) > first_line):
            self.first_line[key] = first_line

    @property
    def skipped(self) -> int:
        return int(sum(self.counts.values()))

    def notes(self) -> list[str]:
        if not self.counts:
            return []
        parts = [
            f"{n} x {fld}: {why} (first at line {self.first_line[(fld, why)]})"
            for (fld, why), n in sorted(self.counts.items(), key=lambda kv: (-kv[1], self.first_line[kv[0]] or 0))
        ]
        return [f"skipped {self.skipped} invalid row(s) of {self.path}: " + "; ".join(parts)]


class RowValidator:
    """Collects vectorised checks over the rows of one file, then keeps or raises.

    ``lines`` maps row index -> 1-based line number in the file.
    """

    def __init__(self, log: IssueLog, lines: np.ndarray):
        self.log = log
        self.lines = np.asarray(lines, dtype=np.int64)
        self.bad_any = np.zeros(len(self.lines), dtype=bool)
        self._checks: list[tuple[np.ndarray, str, str, list]] = []

    def check(self, bad: np.ndarray, field_name: str, reason: str, values=None) -> None:
        """Register rows where ``bad`` is True as invalid for ``field_name`` because ``reason``.

        ``values`` (optional, aligned with rows) supplies the offending value for the message.
        """
        bad = np.asarray(bad, dtype=bool) & ~self.bad_any  # report each row once, first reason wins
        if bad.any():
            self._checks.append((bad, field_name, reason, values))
            self.bad_any |= bad

    def finish(self) -> np.ndarray:
        """Return the keep-mask; raise the first bad line in strict mode."""
        if not self._checks:
            return np.ones(len(self.lines), dtype=bool)
        if not self.log.skip_invalid:
            best = None
            for bad, fld, why, values in self._checks:
                idx = int(np.flatnonzero(bad)[np.argmin(self.lines[bad])])
                if best is None or self.lines[idx] < self.lines[best[0]]:
                    best = (idx, fld, why, values)
            idx, fld, why, values = best
            if values is not None:
                v = values.iloc[idx] if isinstance(values, pd.Series) else values[idx]
                why = f"{why} (got {_show(v)})"
            raise trace_error(self.log.path, int(self.lines[idx]), fld, why)
        for bad, fld, why, _ in self._checks:
            self.log.add((fld, why), int(bad.sum()), int(self.lines[bad].min()))
        return ~self.bad_any


def _show(v) -> str:
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and v != v) or v is pd.NA:
        return "nothing"
    s = repr(v)
    return s if len(s) <= 40 else s[:37] + "..."


def to_number(col: pd.Series) -> pd.Series:
    """Strings / objects -> float64 (NaN where not a number), without raising. Booleans are
    not numbers (a JSON ``true`` length is an error, not 1)."""
    if pd.api.types.is_bool_dtype(col.dtype):
        return pd.Series(np.full(len(col), np.nan), index=col.index)
    if pd.api.types.is_numeric_dtype(col.dtype):
        return col.astype("float64")
    if col.dtype == object:
        col = col.map(lambda x: np.nan if isinstance(x, bool) or x is None else x).astype("str")
    return pd.to_numeric(col, errors="coerce").astype("float64")


def check_int(v: RowValidator, raw: pd.Series, field_name: str, *, minimum: int) -> np.ndarray:
    """Validate an integer column (>= ``minimum``); returns int64 values (0 where invalid)."""
    num = to_number(raw).to_numpy()
    v.check(blank_where(raw, np.isnan(num)), field_name, "missing")
    v.check(np.isnan(num), field_name, "not a number", raw)
    finite = np.where(np.isfinite(num), num, 0.0)
    v.check(~np.isfinite(num), field_name, "not finite", raw)
    v.check(finite != np.round(finite), field_name, "not an integer", raw)
    what = "positive" if minimum == 1 else f">= {minimum}"
    v.check(finite < minimum, field_name, f"must be {what}", raw)
    return finite.astype(np.int64)


def check_float(v: RowValidator, raw: pd.Series, field_name: str, *, minimum: float | None = None) -> np.ndarray:
    num = to_number(raw).to_numpy()
    v.check(blank_where(raw, np.isnan(num)), field_name, "missing")
    v.check(~np.isfinite(num), field_name, "not a finite number", raw)
    out = np.where(np.isfinite(num), num, 0.0)
    if minimum is not None:
        v.check(out < minimum, field_name, f"must be >= {minimum:g}", raw)
    return out


def check_monotonic(v: RowValidator, t: np.ndarray, field_name: str, raw: pd.Series | None = None) -> None:
    """Arrival order is file order for most formats: a time going backwards is an error.

    Compared against the running maximum of the rows still valid, so one bad row does not
    condemn the rows after it.
    """
    ok = ~v.bad_any
    tt = np.where(ok, t, -np.inf)
    run_max = np.maximum.accumulate(tt)
    prev = np.concatenate([[-np.inf], run_max[:-1]])
    v.check(ok & (t < prev), field_name, "time goes backwards (file order must be arrival order)", raw if raw is not None else pd.Series(t))


def blank_where(raw: pd.Series, candidates: np.ndarray) -> np.ndarray:
    """``is_blank`` evaluated only on the (usually few) ``candidates`` rows."""
    out = np.zeros(len(raw), dtype=bool)
    if candidates.any():
        out[candidates] = is_blank(raw[candidates])
    return out


def is_blank(raw: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(raw.dtype):
        return raw.isna().to_numpy()
    s = raw.astype("str")
    return (raw.isna() | (s.str.strip() == "")).to_numpy()
