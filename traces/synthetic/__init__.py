"""Synthetic workloads (see :mod:`traces.synthetic.generator`)."""

from traces.synthetic.generator import generate, rng_streams
from traces.synthetic.spec import ArrivalSpec, RetimeSpec, SyntheticSpec

__all__ = ["generate", "rng_streams", "ArrivalSpec", "RetimeSpec", "SyntheticSpec"]
