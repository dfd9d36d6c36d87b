"""fleetsim: a discrete-event simulator of LLM serving clusters with vLLM-V1-faithful replicas.

Quick start::

    import sim
    result = sim.run()                                   # built-in default scenario
    result = sim.run("scenario.yaml", overrides=["cluster.replicas=8"])
    result.summary["ttft_p99_s"]; result.requests.head(); result.save("out/")

The data path: ``traces`` (Workload) -> :class:`sim.cluster.Cluster` (arrivals, admission,
``policies`` router) -> :class:`sim.replica.Replica` (SimPy process) -> :class:`sim.engine.Engine`
(vLLM V1 scheduler + :mod:`sim.kv_cache`) timed by a :mod:`sim.step_time` model -> :mod:`sim.metrics`.
"""

from sim.errors import ConfigError, DoesNotFitError, FleetsimError, TraceError  # noqa: F401

__version__ = "0.1.0"

# The public API is imported lazily so that ``import sim.errors`` (used by every package) does not
# pull in the whole simulator, which in turn imports ``traces`` and ``policies``.
_LAZY = {
    "run": "sim.api", "Result": "sim.api", "json_safe": "sim.api",
    "Scenario": "sim.scenario", "load_scenario": "sim.scenario", "DEFAULT_SCENARIO": "sim.scenario",
    "BatchShape": "sim.step_time", "LinearStepTime": "sim.step_time", "StepTimeModel": "sim.step_time",
}
__all__ = ["run", "Result", "Scenario", "load_scenario", "DEFAULT_SCENARIO", "BatchShape", "LinearStepTime",
           "StepTimeModel", "ConfigError", "DoesNotFitError", "FleetsimError", "TraceError"]


def __getattr__(name: str):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'sim' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
