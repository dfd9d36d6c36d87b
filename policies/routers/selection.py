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
_U32 = 0xFFFFFFFF


def argmin_random(items: Sequence[T], key: Callable[[T], float | tuple], rng: np.random.Generator) -> T:
    """An item with the smallest ``key``; exact ties broken uniformly at random."""
    keys = [key(x) for x in items]
    best = min(keys)
    tied = [x for x, k in zip(items, keys) if k == best]
    return tied[0] if len(tied) == 1 else tied[randbelow(rng, len(tied))]


def argmax_random_float(items: Sequence[T], scores: Sequence[float], rng: np.random.Generator) -> T:
    """An item with the largest float score; ties within 1e-12 broken uniformly at random."""
    best = max(scores)
    tied = [x for x, s in zip(items, scores) if s >= best - _EPS]
    return tied[0] if len(tied) == 1 else tied[randbelow(rng, len(tied))]


def _lemire(rng: np.random.Generator) -> Callable[[int], int]:
    """``f(n) == int(rng.integers(n))``, drawn as numpy draws it, ~3x cheaper for ``2 <= n < 2**32``.

    Why: a router breaks a tie on nearly every request, and ``Generator.integers`` costs ~2 us of
    argument handling for one number. numpy draws a bounded integer below 2**32 with Lemire's
    method on the bit generator's ``next_uint32`` (``random_bounded_uint64`` ->
    ``buffered_bounded_lemire_uint32`` in numpy/random/src/distributions); calling that same
    ``next_uint32`` through the bit generator's ctypes interface gives the same values *and* the same
    generator state (including its buffered half word), so draws through numpy and through this
    interleave exactly. :func:`_lemire_matches_numpy` checks that on first use; if it does not hold
    (another numpy), :func:`randbelow` and :func:`drawer` use ``rng.integers``. Other ``n`` go to
    ``rng.integers`` too.
    """
    ct = rng.bit_generator.ctypes
    next32, state = ct.next_uint32, ct.state
    keep = rng  # the closure keeps the bit generator (and the state pointer) alive

    def draw(n: int) -> int:
        if n < 2 or n > _U32:
            return int(keep.integers(n))
        m = next32(state) * n
        if (m & 0xFFFFFFFF) < n:
            threshold = (0x100000000 - n) % n
            while (m & 0xFFFFFFFF) < threshold:
                m = next32(state) * n
        return m >> 32

    return draw


def _lemire_matches_numpy() -> bool:
    """Whether :func:`_lemire` reproduces ``Generator.integers`` (values and state) here."""
    try:
        ref, mine = np.random.default_rng(20261122), np.random.default_rng(20261122)
        draw = _lemire(mine)
        for i in range(400):
            n = (2, 3, 5, 16, 1000, 2**31 + 7, 3_000_000_019, _U32)[i % 8]
            if int(ref.integers(n)) != draw(n):
                return False
            if i % 7 == 0 and ref.random() != mine.random():  # interleaved numpy draws stay in step
                return False
        return ref.bit_generator.state == mine.bit_generator.state
    except Exception:  # no ctypes interface: use numpy
        return False


_fast: bool | None = None  # _lemire_matches_numpy(), computed on first use
_last: tuple = (None, None)  # (rng, its _lemire draw): a run draws from one router rng


def _lemire_ok(rng) -> bool:
    """Whether draws for ``rng`` may go through :func:`_lemire` (a plain numpy Generator, and the
    check passed on this numpy)."""
    global _fast
    if _fast is None:
        _fast = _lemire_matches_numpy()
    return _fast and type(rng) is np.random.Generator


def randbelow(rng: np.random.Generator, n: int) -> int:
    """``int(rng.integers(n))`` (same value, same generator state), cheaper; ``n >= 1``."""
    global _last
    if n < 2 or n > _U32:
        return int(rng.integers(n))
    cached_rng, draw = _last
    if cached_rng is not rng:
        if not _lemire_ok(rng):
            return int(rng.integers(n))
        draw = _lemire(rng)
        _last = (rng, draw)
    return draw(n)


def drawer(rng: np.random.Generator) -> Callable[[int], int]:
    """A function ``f`` with ``f(n) == randbelow(rng, n)`` (same value, same generator state).

    Why: a router that draws on most requests can look it up once per rng and skip
    :func:`randbelow`'s cache lookup.
    """
    if not _lemire_ok(rng):
        return lambda n: int(rng.integers(n))
    return _lemire(rng)
