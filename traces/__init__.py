"""Workloads: one request schema (:mod:`traces.schema`), loaders for the public trace formats
(:mod:`traces.formats`), synthetic generators (:mod:`traces.synthetic`), transforms
(:mod:`traces.transforms`), built-in traces (:mod:`traces.builtin`) and the scenario entry point
:func:`traces.config.build_workload`.
"""
