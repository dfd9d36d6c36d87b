"""Workloads: one request schema (:mod:`traces.schema`), loaders for the public trace formats
(:mod:`traces.formats`), synthetic generators (:mod:`traces.synthetic`), transforms
(:mod:`traces.transforms`), built-in traces (:mod:`traces.builtin`) and the scenario entry point
:func:`traces.config.build_workload`.
"""

# sim/__init__ imports sim.scenario, which imports traces.config; importing the simulator first
# makes entering through ``traces.config`` (e.g. ``from traces.config import build_workload``)
# non-circular. Harmless when ``sim`` is already being imported.
import sim  # noqa: F401
