"""Tie-breaking helpers shared by the routers.

Exact ties are common (an idle fleet has every replica at 0 in-flight requests); breaking them
by lowest id would pile every cold request onto replica 0, so routers that care break them at random
with their own seeded ``rng`` (llm-d's max-score picker shuffles before taking the top-1).
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")

_EPS = 1e-12


def argmin_random(items: Sequence[T], key: Callable[[T], float | tuple], rng: np.random.Generator) -> T:
    """An item with the smallest ``key``; exact ties broken uniformly at random."""
    keys = [key(x) for x in items]
    best = min(keys)
    tied = [x for x, k in zip(items, keys) if k == best]
    return tied[0] if len(tied) == 1 else tied[int(rng.integers(len(tied)))]


def argmax_random_float(items: Sequence[T], scores: Sequence[float], rng: np.random.Generator) -> T:
    """An item with the largest float score; ties within 1e-12 broken uniformly at random."""
    best = max(scores)
    tied = [x for x, s in zip(items, scores) if s >= best - _EPS]
    return tied[0] if len(tied) == 1 else tied[int(rng.integers(len(tied)))]
