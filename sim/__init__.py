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
from sim.run import Result, run  # noqa: F401
from sim.scenario import DEFAULT_SCENARIO, Scenario, load_scenario  # noqa: F401
from sim.step_time import BatchShape, LinearStepTime, StepTimeModel  # noqa: F401

__version__ = "0.1.0"
