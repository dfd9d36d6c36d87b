"""Step-time models: how long one engine step takes, given the batch's shape.

One interface, :class:`StepTimeModel`, chosen per replica (scenario key ``cluster.step_time``):

- ``roofline`` (:class:`RooflineStepTime`, in :mod:`sim.roofline`): analytic from the catalog, so
  any GPU x model works out of the box.
- ``linear`` (:class:`LinearStepTime`): coefficients from a JSON profile file written by the
  validation module's fitter (``fleetsim validate``).

A step's shape (:class:`BatchShape`) is what vLLM's iteration log reports (context / generation
requests and tokens) plus the attention features the scheduler knows exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sim.errors import ConfigError


@dataclass(slots=True)
class BatchShape:
    """The composition of one engine step.

    Attributes:
        prefill_seqs: requests that are (re)computing prompt tokens this step ("context requests").
        prefill_tokens: prompt tokens computed this step over those requests ("context tokens").
        prefill_attn: sum over prefill requests of ``chunk * (computed_before + chunk)``: the number
            of query x key pairs of the chunk's attention (x2 for causal), the quadratic term.
        decode_seqs: requests generating one token this step ("generation requests").
        decode_context: sum over decode requests of their context length (tokens whose KV is read).
    """

    prefill_seqs: int = 0
    prefill_tokens: int = 0
    prefill_attn: float = 0.0
    decode_seqs: int = 0
    decode_context: int = 0

    @property
    def num_seqs(self) -> int:
        return self.prefill_seqs + self.decode_seqs

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs


class StepTimeModel(Protocol):
    """Maps a step's shape to its duration in seconds. Must be deterministic and > 0.

    Optional, for the engine's exact fast-forward of decode runs (sim.engine): ``decode_run_affine(
    num_seqs) -> (T, g) | None`` if a pure-decode step takes ``T + g * decode_context`` (closed-form
    run ends, cheapest), else ``decode_run_times(num_seqs, context_sum_start, k, out)`` (vectorised
    durations), else the engine calls ``step_time`` per step of a run.
    """

    name: str

    def step_time(self, shape: BatchShape) -> float: ...


# Feature names of the linear form, in the order of the coefficient vector. The profile JSON uses
# these names so files stay readable and forward compatible.
LINEAR_FEATURES = ("const", "prefill_tokens", "prefill_attn", "decode_seqs", "decode_context", "num_seqs")


def linear_features(shape: BatchShape) -> tuple[float, ...]:
    return (
        1.0,
        float(shape.prefill_tokens),
        float(shape.prefill_attn),
        float(shape.decode_seqs),
        float(shape.decode_context),
        float(shape.num_seqs),
    )


class LinearStepTime:
    """``T = c0 + c1*prefill_tokens + c2*prefill_attn + c3*decode_seqs + c4*decode_context + c5*num_seqs``.

    Tensor parallelism is already inside a fitted profile (it was measured at some TP); a profile
    records the TP it was measured at, and using it at another TP is an error rather than a guess.

    Profile JSON::

        {"form": "linear", "tensor_parallel": 1,
         "coefficients": {"const": 0.004, "prefill_tokens": 6.1e-5, "prefill_attn": 1e-9,
                          "decode_seqs": 2e-4, "decode_context": 1.5e-7, "num_seqs": 0.0},
         "engine": {...the engine config it was measured on...}, "fit": {"heldout_mape": 0.03}}
    """

    name = "linear"

    def __init__(self, coefficients: dict[str, float], *, source: str = "<inline>", tensor_parallel: int = 1):
        unknown = set(coefficients) - set(LINEAR_FEATURES)
        if unknown:
            raise ConfigError(f"{source}: unknown linear step-time coefficient(s) {sorted(unknown)}; "
                              f"known: {list(LINEAR_FEATURES)}")
        for k, v in coefficients.items():
            if not isinstance(v, (int, float)) or v < 0 or v != v:
                raise ConfigError(f"{source}: coefficient {k!r} must be a non-negative number, got {v!r}")
        self.coef = tuple(float(coefficients.get(k, 0.0)) for k in LINEAR_FEATURES)
        if self.coef[0] <= 0:
            raise ConfigError(f"{source}: coefficient 'const' (per-step overhead) must be > 0")
        self.source = source
        self.tensor_parallel = tensor_parallel

    @classmethod
    def from_file(cls, path: str | Path) -> "LinearStepTime":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: step-time profile not found") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}:{e.lineno}: invalid JSON in step-time profile: {e.msg}") from None
        if not isinstance(data, dict) or data.get("form") != "linear" or "coefficients" not in data:
            raise ConfigError(f"{p}: not a linear step-time profile (needs form: linear and coefficients)")
        return cls(data["coefficients"], source=str(p), tensor_parallel=int(data.get("tensor_parallel", 1)))

    def step_time(self, shape: BatchShape) -> float:
        c = self.coef
        return (
            c[0]
            + c[1] * shape.prefill_tokens
            + c[2] * shape.prefill_attn
            + c[3] * shape.decode_seqs
            + c[4] * shape.decode_context
            + c[5] * (shape.prefill_seqs + shape.decode_seqs)
        )

    # decode_run_times() is nondecreasing: every term is a monotone float function of the context.
    decode_run_monotone = True

    def decode_run_affine(self, num_seqs: int) -> tuple[float, float]:
        """``(T, g)`` with ``step_time(decode_seqs=num_seqs, decode_context=dc) == T + g * dc`` (to
        round-off): a pure-decode step is affine in its context sum, so the engine's fast-forward
        can compute the end of any step of a run in closed form (sim.engine.AffineDecodeRun)."""
        c = self.coef
        return c[0] + c[3] * num_seqs + c[5] * num_seqs, c[4]

    def decode_run_times(self, num_seqs: int, context_sum_start: int, k: int, out=None):
        """Durations of ``k`` consecutive decode-only steps of ``num_seqs`` sequences whose context
        sum is ``context_sum_start`` at the first step and grows by ``num_seqs`` per step (into
        ``out`` if given).

        Used by the engine's exact fast-forward: element ``j`` is bit-identical to
        ``step_time(BatchShape(decode_seqs=num_seqs, decode_context=context_sum_start + j*num_seqs))``
        (same float operations, element-wise; ``+`` and ``*`` commute exactly in IEEE arithmetic).
        """
        import numpy as np

        c = self.coef
        head = c[0] + c[1] * 0 + c[2] * 0.0 + c[3] * num_seqs
        out = np.arange(context_sum_start, context_sum_start + k * num_seqs, num_seqs, dtype=np.float64)[:k] \
            if out is None else _arange_into(out, context_sum_start, num_seqs, k)
        out *= c[4]
        out += head
        out += c[5] * num_seqs
        return out

    def to_dict(self) -> dict:
        return {"form": "linear", "tensor_parallel": self.tensor_parallel,
                "coefficients": dict(zip(LINEAR_FEATURES, self.coef))}


def _arange_into(out, start: int, step: int, k: int):
    """``out[:] = start + step * arange(k)`` as exact floats (integers below 2**53), in place."""
    import numpy as np

    out[:] = np.arange(start, start + k * step, step, dtype=np.float64)[:k]
    return out
