"""A GPU replica: the SimPy process that runs one engine, and its lifecycle.

    starting --(cold start)--> serving --(scale-in)--> draining --(empty)--> stopped
         \\___________________________\\______(failure)_____________________> failed

The process reads like the story of the replica: wait out the cold start, then loop
"plan a step, spend the step's time on the GPU, apply it", sleeping while there is no work.
A failure is a SimPy interrupt: the step in progress is lost and every in-flight request is
handed back to the cluster (which retries or fails it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import simpy

from policies.base import ReplicaState
from sim.engine import Engine, EngineConfig, EngineRequest
from sim.step_time import StepTimeModel

if TYPE_CHECKING:
    from sim.cluster import Cluster


class EngineStalled(RuntimeError):
    """The scheduler had work but could schedule nothing: a bug or an impossible config."""


class Replica:
    """One model server (``num_gpus`` GPUs with tensor parallelism). Implements ``ReplicaView``."""

    def __init__(self, cluster: "Cluster", replica_id: int, engine_cfg: EngineConfig,
                 step_model: StepTimeModel, cold_start_s: float, num_gpus: int, usd_per_gpu_hour: float):
        self.cluster = cluster
        self.env: simpy.Environment = cluster.env
        self.replica_id = replica_id
        self.engine = Engine(engine_cfg, on_itl=cluster.itl.add)
        self.step_model = step_model
        self.cold_start_s = cold_start_s
        self.num_gpus = num_gpus
        self.usd_per_gpu_hour = usd_per_gpu_hour
        self.block_size = engine_cfg.block_size
        self.num_total_blocks = engine_cfg.num_gpu_blocks
        self.state = ReplicaState.STARTING
        self.created_s = self.env.now
        self.serving_s: float | None = None
        self.ended_s: float | None = None
        # Router-tracked counters (exact, maintained by the cluster on route / finish).
        self.inflight_requests = 0
        self.inflight_tokens = 0
        self.busy_s = 0.0
        self._wake = self.env.event()
        self._stop_now = False
        self.process = self.env.process(self._run())

    # -- ReplicaView -------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        return self.engine.num_waiting

    @property
    def kv_usage(self) -> float:
        return self.engine.kv.usage()

    @property
    def num_free_blocks(self) -> int:
        return self.engine.kv.num_free_blocks

    @property
    def num_preemptions(self) -> int:
        return self.engine.num_preemptions

    @property
    def prefix_hit_rate(self) -> float:
        kv = self.engine.kv
        return kv.prefix_hits / kv.prefix_queries if kv.prefix_queries else 0.0

    def cached_prefix_blocks(self, block_hashes: Sequence[int]) -> int:
        return self.engine.kv.cached_prefix_blocks(block_hashes)

    # -- the story ---------------------------------------------------------------------------
    def _run(self):
        env = self.env
        engine = self.engine
        try:
            if self.cold_start_s > 0:
                yield env.timeout(self.cold_start_s)
            if self._stop_now:  # scaled in before it ever served
                self._end(ReplicaState.STOPPED)
                return
            self.state = ReplicaState.SERVING
            self.serving_s = env.now
            self.cluster.on_replica_ready(self)
            step_time = self.step_model.step_time
            while True:
                if not engine.has_work():
                    if self.state == ReplicaState.DRAINING:
                        break
                    self._wake = env.event()
                    yield self._wake
                    continue
                start = env.now
                plan = engine.schedule(start)
                if plan.empty:
                    if plan.preempted:
                        # vLLM too can return an empty step when the only candidate preempted
                        # itself (priority policy); the next schedule() sees the freed blocks.
                        continue
                    raise EngineStalled(
                        f"replica {self.replica_id}: {engine.num_waiting} waiting, {engine.num_running} running "
                        f"but nothing schedulable (free blocks {engine.kv.num_free_blocks})")
                dt = step_time(plan.shape)
                yield env.timeout(dt)
                self.busy_s += dt
                for req in engine.update(plan, env.now):
                    self.cluster.on_request_finished(self, req)
            self._end(ReplicaState.STOPPED)
        except simpy.Interrupt:
            aborted = engine.abort_all()
            self._end(ReplicaState.FAILED)
            self.cluster.on_replica_failed(self, aborted)

    def _end(self, state: ReplicaState) -> None:
        self.state = state
        self.ended_s = self.env.now
        self.cluster.on_replica_ended(self)

    # -- commands from the cluster -------------------------------------------------------------
    def submit(self, req: EngineRequest) -> None:
        self.engine.add_request(req, self.env.now)
        if not self._wake.triggered:
            self._wake.succeed()

    def drain(self) -> None:
        """Stop taking new work; stop once in-flight requests finish (or at once if starting)."""
        if self.state == ReplicaState.STARTING:
            self._stop_now = True
            self.state = ReplicaState.DRAINING
            return
        if self.state != ReplicaState.SERVING:
            return
        self.state = ReplicaState.DRAINING
        if not self._wake.triggered:
            self._wake.succeed()

    def fail(self) -> None:
        if self.state in (ReplicaState.STOPPED, ReplicaState.FAILED):
            return
        self.process.interrupt("failure")

    def gpu_hours(self, now: float) -> float:
        end = self.ended_s if self.ended_s is not None else now
        return (end - self.created_s) / 3600.0 * self.num_gpus

    def cost_usd(self, now: float) -> float:
        return self.gpu_hours(now) * self.usd_per_gpu_hour
