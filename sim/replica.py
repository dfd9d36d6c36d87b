"""A GPU replica: the SimPy process that runs one engine, and its lifecycle.

    starting --(cold start)--> serving --(scale-in)--> draining --(empty)--> stopped
         \\___________________________\\______(failure)_____________________> failed

The process reads like the story of the replica: wait out the cold start, serve until drained,
stop. Serving is a loop "plan a step, spend the step's time on the GPU, apply it", sleeping while
there is no work. It runs as event callbacks rather than one generator resume per step (a step is
the simulator's innermost event), with two ways to advance:

- **one step at a time** (the reference): ``plan = engine.schedule()``, an event at
  ``now + step_time(plan.shape)``, then ``engine.update(plan, now)``;
- **fast-forward** (default): when the batch is a steady decode run, one event at the end of the
  whole run (:meth:`sim.engine.Engine.plan_decode_run`), and when a scheduled step (a prefill on
  an idle replica, say) leaves the batch decoding, the step and the run after it are one event
  (``head=``). An arrival truncates the run to the step in flight (the event moves earlier);
  views read in between see the exact state at that time.

Both give identical results (tests/test_fast_forward.py; to round-off with the roofline step time,
whose vectorised durations may differ by an ulp). Step-end events are URGENT: at a time where a
step ends and something else happens, the step's update comes first in both modes.

A failure is a SimPy interrupt of the process: the step in progress is lost and every in-flight
request is handed back to the cluster (which retries or fails it).
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Sequence

import numpy as np
import simpy
from simpy.core import URGENT

from policies.base import ReplicaState
from sim.engine import Engine, EngineConfig, EngineRequest
from sim.events import CallbackEvent, can_reserve_eids
from sim.step_time import StepTimeModel

if TYPE_CHECKING:
    from sim.cluster import Cluster

NAIVE_ENV = "FLEETSIM_NAIVE"  # FLEETSIM_NAIVE=1 forces the one-event-per-step reference path


def fast_forward_default() -> bool:
    return os.environ.get(NAIVE_ENV, "").strip() not in ("1", "true", "yes")


_CANCEL_START = "cancel_start"  # interrupt cause: scaled in during the cold start

# Enum members as module constants: ``ReplicaState.X`` is a class-attribute lookup through the
# enum's metaclass (~80 ns); states are always these singletons, so ``is`` compares them.
_SERVING = ReplicaState.SERVING
_DRAINING = ReplicaState.DRAINING


class EngineStalled(RuntimeError):
    """The scheduler had work but could schedule nothing: a bug or an impossible config."""


class Replica:
    """One model server (``num_gpus`` GPUs with tensor parallelism). Implements ``ReplicaView``."""

    # Slots: routers read every replica's gauges on every request; compact objects keep that cheap.
    __slots__ = ("cluster", "env", "replica_id", "engine", "step_model", "cold_start_s", "num_gpus",
                 "usd_per_gpu_hour", "block_size", "num_total_blocks", "fast_forward", "state", "created_s",
                 "serving_s", "ended_s", "inflight_requests", "inflight_tokens", "_stop_now", "_idle", "_timer",
                 "_timer_at", "_plan", "_dt", "_plan_aborts", "_stopped", "process", "_spare", "_step_cbs", "_reuse")

    def __init__(self, cluster: "Cluster", replica_id: int, engine_cfg: EngineConfig,
                 step_model: StepTimeModel, cold_start_s: float, num_gpus: int, usd_per_gpu_hour: float,
                 fast_forward: bool | None = None):
        self.cluster = cluster
        env = self.env = cluster.env
        self.replica_id = replica_id
        itl = cluster.itl
        if fast_forward is None:
            fast_forward = getattr(cluster.cfg, "engine_fast_forward", True) and fast_forward_default()
        self.fast_forward = fast_forward
        # The naive path is the reference in full: one event per step and every KV block tracked.
        self.engine = Engine(engine_cfg, on_itl=itl.add, on_itl_many=_bulk_itl(itl), clock=lambda: env.now,
                             lazy_exclusive=fast_forward)
        self.step_model = step_model
        self.cold_start_s = cold_start_s
        self.num_gpus = num_gpus
        self.usd_per_gpu_hour = usd_per_gpu_hour
        self.block_size = engine_cfg.block_size
        self.num_total_blocks = engine_cfg.num_gpu_blocks
        self.state = ReplicaState.STARTING
        self.created_s = env.now
        self.serving_s: float | None = None
        self.ended_s: float | None = None
        # Router-tracked counters (exact, maintained by the cluster on route / finish).
        self.inflight_requests = 0
        self.inflight_tokens = 0
        self._stop_now = False
        self._idle = False  # serving with nothing to do: the next submit wakes the loop
        self._timer: CallbackEvent | None = None  # end of the step (or run) in flight
        self._timer_at = 0.0
        # The step-end event last processed, re-queued by the next _arm instead of a new event
        # (SimPy 4 layout only; otherwise every arm makes an event).
        self._spare: CallbackEvent | None = None
        self._step_cbs = [self._step_done]  # its callback list (SimPy reads it, never mutates it)
        self._reuse = can_reserve_eids(env)
        self._plan = None
        self._dt = 0.0
        self._plan_aborts = 0
        self._stopped = env.event()
        self.process = env.process(self._run())

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

    @property
    def busy_s(self) -> float:
        """GPU-busy seconds: the sum of the durations of the steps this replica has completed."""
        e = self.engine
        if e.in_run:
            e.sync()
        return e.busy_s

    # -- the story ---------------------------------------------------------------------------
    def _run(self):
        env = self.env
        try:
            if self.cold_start_s > 0:
                try:
                    yield env.timeout(self.cold_start_s)
                except simpy.Interrupt as stop:
                    if stop.cause != _CANCEL_START:
                        raise
            if self._stop_now:  # scaled in before it ever served: the GPU is released at once
                self._end(ReplicaState.STOPPED)
                return
            self.state = ReplicaState.SERVING
            self.serving_s = env.now
            self.cluster.on_replica_ready(self)
            self._next_step()
            yield self._stopped  # serving happens in the step callbacks until drained
            self._end(ReplicaState.STOPPED)
        except simpy.Interrupt:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            aborted = self.engine.abort_all()
            self._end(ReplicaState.FAILED)
            self.cluster.on_replica_failed(self, aborted)

    def _next_step(self) -> None:
        """Plan what the GPU does next: a run of decode steps, one step, or nothing."""
        engine = self.engine
        running = engine.running
        # engine.has_work(), inlined (this runs after every step): running, or a waiting queue.
        if not running and not engine._waitq:
            if self.state is _DRAINING:
                self._stopped.succeed()
            else:
                self._idle = True
            return
        now = self.env._now
        if running and self.fast_forward:
            end = engine.plan_decode_run(now, self.step_model)
            if end is not None:
                self._plan = None
                self._plan_aborts = engine.aborts
                self._arm(end)
                return
        plan = engine.schedule(now)
        while plan.empty and plan.preempted:
            # vLLM too can return an empty step when the only candidate preempted itself
            # (priority policy); the next schedule() sees the freed blocks.
            plan = engine.schedule(now)
        if plan.empty:
            raise EngineStalled(
                f"replica {self.replica_id}: {engine.num_waiting} waiting, {engine.num_running} running "
                f"but nothing schedulable (free blocks {engine.kv.num_free_blocks})")
        dt = self.step_model.step_time(plan.shape)
        if self.fast_forward:
            # If the steps after this one are a decode run, plan it now with this step as its head
            # (one event for both; Engine.plan_decode_run).
            end = engine.plan_decode_run(now + dt, self.step_model, head=plan, head_dt=dt)
            if end is not None:
                self._plan = None
                self._plan_aborts = engine.aborts
                self._arm(end)
                return
        self._plan = plan
        self._dt = dt
        self._plan_aborts = engine.aborts
        self._arm(now + dt)

    def _arm(self, t: float) -> None:
        """(Re)place the wake-up at the end of the step or run in flight.

        The event is queued as ``CallbackEvent(env, self._step_done, at=t, priority=URGENT)``
        would queue it: key ``(t, URGENT, next(env._eid))``, so the order of events is unchanged.
        After a step end was processed, that same event object is queued again under the new key
        (SimPy is done with it: it took its callbacks and reads nothing else of it afterwards);
        a wake-up still queued (a run truncated by an arrival) is cancelled and a new one made.
        """
        ev = self._timer
        if ev is None:
            ev = self._spare
            if ev is not None:
                self._spare = None
                ev.requeue(self._step_cbs, t, URGENT)
                self._timer = ev
                self._timer_at = t
                return
        else:
            ev.cancel()  # processed later as a no-op
        self._timer = CallbackEvent(self.env, self._step_done, at=t, priority=URGENT)
        self._timer_at = t

    def _step_done(self, event) -> None:
        """The step (or run) in flight ended: apply it, hand back finished requests, go on."""
        self._timer = None
        if self._reuse:
            self._spare = event  # processed: _arm may queue it again
        engine = self.engine
        now = self.env._now
        if engine.aborts != self._plan_aborts:  # everything was aborted meanwhile (horizon)
            finished = []
            self._plan = None
        elif self._plan is None:
            wake = engine.run_wake(now)
            if wake is not None:  # the run goes on: its next chunk of steps is now computed
                self._arm(wake)
                return
            finished = engine.finish_run(now)
        else:
            finished = engine.update(self._plan, now)
            engine.busy_s += self._dt
            self._plan = None
        if finished:
            on_finished = self.cluster.on_request_finished
            for req in finished:
                on_finished(self, req)
        state = self.state
        if state is _SERVING or state is _DRAINING:
            self._next_step()

    def _wake(self, _event) -> None:
        self._next_step()

    def _end(self, state: ReplicaState) -> None:
        self.state = state
        self.ended_s = self.env.now
        self.cluster.on_replica_ended(self)

    # -- commands from the cluster -------------------------------------------------------------
    def submit(self, req: EngineRequest) -> None:
        env = self.env
        engine = self.engine
        engine.add_request(req, env._now)
        if self._idle:
            self._idle = False
            wakes = self.cluster._wakes
            if wakes is None:
                self._schedule_wake()
            else:
                # Inside the cluster's arrival callback: the wake-up's event id is taken now, as
                # _schedule_wake would take it, and Cluster._run_wakes either runs the wake
                # directly (nothing sorts before it) or queues it with this id.
                wakes.append((next(env._eid), self))
        elif engine._run is not None:  # engine.in_run
            # The new request can change the batch: the run ends with the step in flight.
            end = engine.truncate_run(env._now)
            if end < self._timer_at:
                self._arm(end)

    def _schedule_wake(self) -> None:
        CallbackEvent(self.env, self._wake)  # now, after what is already due now (as event.succeed())

    def drain(self) -> None:
        """Stop taking new work; stop once in-flight requests finish (or at once if starting)."""
        if self.state == ReplicaState.STARTING:
            # Cancelling a pod that is still loading its weights frees its GPU now: the replica
            # ends (and stops being billed) at the drain, not at the end of its cold start.
            self._stop_now = True
            self.state = ReplicaState.DRAINING
            if self.cold_start_s > 0 and self.env.now < self.created_s + self.cold_start_s:
                self.process.interrupt(_CANCEL_START)
            return
        if self.state != ReplicaState.SERVING:
            return
        self.state = ReplicaState.DRAINING
        self.cluster.on_replica_draining(self)  # it leaves the set routers choose from
        if self._idle:
            self._idle = False
            self._schedule_wake()

    def fail(self) -> None:
        if self.state in (ReplicaState.STOPPED, ReplicaState.FAILED):
            return
        self.process.interrupt("failure")

    def gpu_hours(self, now: float) -> float:
        end = self.ended_s if self.ended_s is not None else now
        return (end - self.created_s) / 3600.0 * self.num_gpus

    def cost_usd(self, now: float) -> float:
        return self.gpu_hours(now) * self.usd_per_gpu_hour


def _bulk_itl(hist):
    """``add(values, count, n, lo, hi, total)``: many inter-token latencies at once (the
    :class:`sim.engine.Engine` ``on_itl_many`` protocol), bucketed exactly like ``hist.add`` would
    one by one.

    Buckets are monotone in the value, so when the bounds ``lo`` and ``hi`` fall in the same bucket
    (the usual case: a run's step times differ by microseconds) one increment covers all ``n``
    values without computing them. Otherwise the values are bucketed with numpy, and the few within
    1e-9 of a bucket edge (where numpy's and libm's ``log`` could round differently) again with
    ``math.log``. The histogram's running ``sum`` (for the mean) gets ``total``: equal to round-off.
    """
    if not all(hasattr(hist, a) for a in ("lo", "log_base", "n_buckets", "counts", "total", "sum")):
        return None
    h_lo, log_base, last = hist.lo, hist.log_base, hist.n_buckets - 1

    def bucket(x: float) -> int:
        if x <= h_lo:
            return 0
        return min(int(math.log(x / h_lo) / log_base) + 1, last)

    def add_many(values, count: int, n: int, lo: float, hi: float, total: float) -> None:
        b = bucket(lo)
        if b == bucket(hi):
            hist.counts[b] += n * count
        else:
            v = values()
            y = np.log(np.maximum(v, h_lo) / h_lo) / log_base
            idx = np.minimum(np.floor(y).astype(np.int64) + 1, last)
            idx[v <= h_lo] = 0
            for k in np.flatnonzero(np.abs(y - np.rint(y)) < 1e-9).tolist():
                idx[k] = bucket(float(v[k]))
            counts = hist.counts
            for k in idx.tolist():
                counts[k] += count
        hist.total += n * count
        hist.sum += total * count

    # edges[b]: the smallest float x with bucket(x) >= b (computed on first use, then exact:
    # bucket(x) == b  <=>  edges[b] <= x < edges[b + 1], bucket() being monotone). Nothing above
    # the last bucket.
    edges: list[float | None] = [None] * (last + 2)
    edges[last + 1] = math.inf
    nextafter, inf = math.nextafter, math.inf

    def edge(b: int) -> float:
        x = edges[b]
        if x is None:
            x = h_lo * math.exp((b - 1) * log_base) if b > 0 else -inf
            if b > 0:
                while bucket(x) >= b:  # walk to the exact edge, one float at a time
                    x = nextafter(x, -inf)
                while bucket(x) < b:
                    x = nextafter(x, inf)
            edges[b] = x
        return x

    def progression(first: float, step: float, n: int, count: int) -> None:
        """``n`` values ``first + step * i`` (a closed-form decode run's gaps), each ``count`` times.

        The bucket is monotone in the value and the values are monotone in ``i``, so each bucket
        holds a contiguous range of ``i``: the first value's bucket (one ``log``), then the exact
        upper edge of that bucket (cached) tells how many values are in it; usually all of them.
        """
        counts = hist.counts
        last_v = first + step * (n - 1)
        b = bucket(first)
        hi = edges[b + 1]
        if hi is None:
            hi = edge(b + 1)
        if last_v < hi and step >= 0.0:
            counts[b] += n * count
        elif step > 0.0:
            i = 0
            while True:  # values i.. are in bucket b or above, value i below hi, the last value not
                j = max(i + 1, min(n - 1, int((hi - first) / step)))  # about the first one >= hi
                while first + step * (j - 1) >= hi:
                    j -= 1
                while first + step * j < hi:
                    j += 1
                counts[b] += (j - i) * count
                i = j
                b = bucket(first + step * i)
                hi = edges[b + 1]
                if hi is None:
                    hi = edge(b + 1)
                if last_v < hi:
                    counts[b] += (n - i) * count
                    break
        else:  # not increasing (no step-time model gives that): one bucket at a time, by bisection
            i = 0
            while i < n:
                b = bucket(first + step * i)
                lo, hi_i = i, n - 1  # the last index still in bucket b
                while lo < hi_i:
                    mid = (lo + hi_i + 1) // 2
                    if bucket(first + step * mid) == b:
                        lo = mid
                    else:
                        hi_i = mid - 1
                counts[b] += (lo - i + 1) * count
                i = lo + 1
        hist.total += n * count
        hist.sum += (n * first + step * (n * (n - 1) // 2)) * count

    add_many.progression = progression
    return add_many
