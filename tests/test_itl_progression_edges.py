"""The ITL histogram's closed-form progressions (sim.replica._bulk_itl(...).progression) bucket
exactly like adding each value, also on and next to bucket edges, below the lowest bucket, above
the highest, and for decreasing or constant progressions."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.metrics import LogHistogram
from sim.replica import _bulk_itl


def _check(runs):
    bulk, ref = LogHistogram(), LogHistogram()
    prog = _bulk_itl(bulk).progression
    for first, step, n, count in runs:
        prog(first, step, n, count)
        for i in range(n):
            ref.add(first + step * i, count)
    assert bulk.counts == ref.counts
    assert bulk.total == ref.total
    assert bulk.sum == pytest.approx(ref.sum, rel=1e-9, abs=1e-12)


def _edge(h: LogHistogram, b: int) -> float:
    """The smallest float whose bucket (as LogHistogram.add computes it) is >= b."""
    def bucket(x):
        return 0 if x <= h.lo else min(int(math.log(x / h.lo) / h.log_base) + 1, h.n_buckets - 1)
    x = h.lo * math.exp((b - 1) * h.log_base)
    while bucket(x) >= b:
        x = math.nextafter(x, -math.inf)
    while bucket(x) < b:
        x = math.nextafter(x, math.inf)
    return x


@pytest.mark.parametrize("b", [1, 2, 500, 1745, 1746, 3000, 4605])
def test_progressions_on_and_next_to_bucket_edges(b):
    h = LogHistogram()
    e = _edge(h, b)
    below = math.nextafter(e, 0.0)
    runs = [(e, 0.0, 5, 1), (below, 0.0, 3, 2), (below, e - below, 4, 1), (below, (e - below) / 2, 7, 3),
            (e * (1 - 1e-3), e * 1e-4, 40, 1), (e, -e * 1e-4, 40, 1), (below, e * 1e-6, 2, 1)]
    _check(runs)


def test_progressions_below_the_lowest_and_above_the_highest_bucket():
    h = LogHistogram()
    _check([(h.lo / 2, h.lo / 8, 30, 1), (h.lo, 0.0, 3, 1), (h.lo, h.lo * 1e-3, 20, 2), (1e4 * 0.99, 10.0, 50, 1),
            (1e5, 1e3, 10, 1), (1e-9, 0.0, 1, 1)])


@settings(max_examples=150, deadline=None)
@given(runs=st.lists(st.tuples(st.floats(1e-7, 2e4), st.floats(-1e-3, 1e-2), st.integers(0, 2000),
                               st.integers(1, 20)), min_size=1, max_size=8))
def test_random_progressions_bucket_like_one_by_one(runs):
    runs = [(f, s, n, c) for f, s, n, c in runs if f + s * (n - 1) > 0 or n == 0]
    _check(runs)


def test_many_runs_on_one_emitter_reuse_its_edges():
    rng = np.random.default_rng(3)
    runs = [(float(f), float(s), int(n), 1) for f, s, n in
            zip(0.0075 * (1 + rng.normal(0, 0.01, 300)), rng.uniform(0, 2e-7, 300), rng.integers(1, 400, 300))]
    _check(runs)
