"""Policy studies: scripts that run the simulator over a grid of scenarios and tabulate the outcome.

- :mod:`studies.routing_study`: every router on a shared-prefix trace (Mooncake conversation) and
  on multi-turn session workloads, at two load levels.
- :mod:`studies.autoscaling_study`: every autoscaler against fixed fleets on a bursty trace (Azure
  code) and, in full mode, a compressed diurnal curve (ServeGen), with cold starts.

Each is runnable as ``python -m studies.<name> [--quick] [--out DIR] [--jobs N]``. It prints
markdown tables and writes CSV and PNG files into ``--out``. docs/policy-study.md records the
measured tables and what they show.
"""
