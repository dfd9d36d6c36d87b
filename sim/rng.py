"""One random stream per subsystem, all derived from the scenario seed.

``stream(seed, "router")`` always gives the same generator for the same (seed, name), and streams
of different names are statistically independent (``SeedSequence`` with a name-derived spawn key),
so adding draws to one subsystem never shifts another's.

Names in use: ``workload`` (and ``workload.<part>`` sub-streams), ``router``, ``cold_start``,
``failures``, ``autoscaler``, ``admission``.
"""

from __future__ import annotations

import zlib

import numpy as np


def stream(seed: int, name: str) -> np.random.Generator:
    key = zlib.crc32(name.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence(entropy=int(seed), spawn_key=(key,)))
