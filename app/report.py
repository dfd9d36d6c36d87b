"""Tables of a run's numbers: the summary against its SLOs, and several runs side by side.

Kept apart from the Streamlit page so notebooks (and tests) get the same tables as the explorer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping

import pandas as pd

from sim.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from sim.api import Result

SLO_KEYS = ("ttft_s", "tpot_s", "e2e_s")
LATENCY_ROWS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E", "queue": "queue wait"}

# Headline summary columns of a comparison, with a label and whether lower is better.
HEADLINE: dict[str, tuple[str, bool]] = {
    "requests_completed": ("completed", False),
    "requests_failed": ("failed", True),
    "requests_rejected": ("rejected", True),
    "ttft_p50_s": ("TTFT p50 (s)", True),
    "ttft_p99_s": ("TTFT p99 (s)", True),
    "tpot_p50_s": ("TPOT p50 (s)", True),
    "tpot_p99_s": ("TPOT p99 (s)", True),
    "e2e_p50_s": ("E2E p50 (s)", True),
    "e2e_p99_s": ("E2E p99 (s)", True),
    "slo_attainment": ("SLO attainment", False),
    "throughput_output_tok_s": ("output tok/s", False),
    "goodput_req_s": ("goodput (req/s)", False),
    "prefix_hit_rate": ("prefix hit rate", False),
    "preemptions": ("preemptions", True),
    "replicas_mean": ("replicas (mean)", True),
    "gpu_hours": ("GPU-hours", True),
    "cost_usd": ("cost (USD)", True),
    "cost_per_million_output_tokens_usd": ("USD / M output tokens", True),
}


def _num(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f


def slo_dict(slo) -> dict[str, float | None]:
    """The scenario's SLO section (pydantic or dict) as ``{ttft_s, tpot_s, e2e_s}``."""
    if slo is None:
        return {k: None for k in SLO_KEYS}
    if hasattr(slo, "model_dump"):
        slo = slo.model_dump()
    return {k: slo.get(k) for k in SLO_KEYS}


def latency_table(summary: Mapping, slo=None) -> pd.DataFrame:
    """p50/p90/p99/mean of each latency, the SLO where one is set, and whether p99 meets it."""
    limits = slo_dict(slo)
    rows = []
    for key, label in LATENCY_ROWS.items():
        limit = limits.get(f"{key}_s")
        p99 = _num(summary.get(f"{key}_p99_s"))
        rows.append({
            "metric": label,
            "p50 (s)": _num(summary.get(f"{key}_p50_s")),
            "p90 (s)": _num(summary.get(f"{key}_p90_s")),
            "p99 (s)": p99,
            "mean (s)": _num(summary.get(f"{key}_mean_s")),
            "SLO (s)": limit if limit is not None else math.nan,
            "p99 within SLO": ("yes" if p99 <= limit else "no") if limit is not None and math.isfinite(p99) else "",
        })
    return pd.DataFrame(rows).set_index("metric")


def compare_table(runs: Mapping[str, "Result"]) -> pd.DataFrame:
    """One row per run (index = label), headline columns with readable names."""
    rows = {}
    for label, r in runs.items():
        rows[label] = {name: r.summary.get(key) for key, (name, _) in HEADLINE.items() if key in r.summary}
    return pd.DataFrame.from_dict(rows, orient="index")


def delta_table(runs: Mapping[str, "Result"]) -> pd.DataFrame:
    """Relative change of each headline number against the first run (the baseline), as
    fractions (+0.25 = 25 % higher). Columns where the baseline is zero or missing are blank."""
    t = compare_table(runs).apply(pd.to_numeric, errors="coerce")
    if t.empty:
        return t
    base = t.iloc[0]
    return (t - base) / base.where(base != 0)


def better_direction(column: str) -> bool | None:
    """True if lower is better for a :func:`compare_table` column, False if higher, None if unknown."""
    for name, lower in HEADLINE.values():
        if name == column:
            return lower
    return None


@dataclass(frozen=True)
class SLOCriterion:
    """When does a run "meet the SLOs"?

    - ``mode="percentile"``: the chosen percentile of every latency with an SLO is within it, and
      no request failed or was rejected.
    - ``mode="attainment"``: at least ``min_attainment`` of all requests completed within every
      SLO at once (the DistServe goodput definition; failed/rejected requests count as misses).
    """

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    mode: Literal["percentile", "attainment"] = "percentile"
    percentile: Literal["p50", "p90", "p99"] = "p99"
    min_attainment: float = 0.99

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("e2e_s", self.e2e_s)) if v}

    def slo_section(self) -> dict[str, float]:
        """The scenario ``slo:`` section this criterion needs (attainment is computed from it)."""
        return self.limits()

    def require_limits(self) -> None:
        if not self.limits():
            raise ConfigError("slo: set at least one SLO (TTFT, TPOT or E2E) to judge runs against")

    def check(self, summary: Mapping) -> tuple[bool, str]:
        """(meets, one-line reason)."""
        self.require_limits()
        if not summary.get("complete", True):
            return False, "requests left unfinished at the horizon"
        total = int(summary.get("requests_total") or 0)
        bad = int(summary.get("requests_failed") or 0) + int(summary.get("requests_rejected") or 0)
        if self.mode == "attainment":
            att = _num(summary.get("slo_attainment"))
            if not math.isfinite(att):
                return False, "no SLO attainment in the summary"
            ok = att >= self.min_attainment
            return ok, f"attainment {att:.1%} {'>=' if ok else '<'} {self.min_attainment:.1%}"
        if bad:
            return False, f"{bad} of {total} requests failed or were rejected"
        worst = []
        for key, limit in self.limits().items():
            v = _num(summary.get(f"{key[:-2]}_{self.percentile}_s"))
            if not math.isfinite(v) or v > limit:
                return False, f"{key[:-2].upper()} {self.percentile} {v:.3g}s > {limit:g}s"
            worst.append(f"{key[:-2].upper()} {self.percentile} {v:.3g}s <= {limit:g}s")
        return True, "; ".join(worst)
