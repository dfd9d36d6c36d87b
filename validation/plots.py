"""Sim-vs-real CDF plots (TTFT, TPOT, E2E) written next to a validation report.

A percentile table compares three points of each distribution; the CDFs show the whole shape, e.g.
whether the simulator's TTFT tail comes from the same requests' queueing or only matches at p90.
matplotlib is imported lazily (Agg backend, no display); without it the plots are skipped with a
message, never the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

PANELS = (("ttft_s", "TTFT (s)"), ("tpot_s", "TPOT (ms)"), ("e2e_s", "E2E (s)"))


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _ecdf(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(v[np.isfinite(v)])
    return v, (np.arange(1, len(v) + 1) / len(v)) if len(v) else np.zeros(0)


def plot_cdfs(series: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *, title: str = "",
              styles: Mapping[str, dict] | None = None) -> Path | None:
    """One PNG with a TTFT / TPOT / E2E panel; ``series`` maps a label (``"real"``, ``"sim"``, ...) to
    ``{"ttft_s": [...], "tpot_s": [...], "e2e_s": [...]}`` in seconds. Returns the path, or None if
    matplotlib is not installed."""
    if not matplotlib_available():
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    default_styles = {"real": {"color": "black", "lw": 2.0}, "sim": {"color": "tab:orange", "lw": 1.6, "ls": "--"}}
    styles = {**default_styles, **(styles or {})}
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (col, label) in zip(axes, PANELS):
        scale = 1000.0 if col == "tpot_s" else 1.0
        for name, data in series.items():
            v = np.asarray(data.get(col, ()), np.float64) * scale
            x, y = _ecdf(v)
            if len(x):
                ax.step(x, y, where="post", label=f"{name} (n={len(x)})", **styles.get(name, {"lw": 1.2}))
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of requests")
    axes[-1].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def columns(df, mask=None) -> dict[str, np.ndarray]:
    """The three latency columns of a per-request table (real replay or simulated), optionally masked."""
    out = {}
    for col, _ in PANELS:
        v = df[col].to_numpy(np.float64)
        out[col] = v[mask] if mask is not None else v
    return out
