"""The cluster: trace arrivals -> admission -> router -> replicas -> metrics, in one SimPy environment.

Processes:
- the arrival chain (``_arrivals_due``, one event per arrival time, not a process: it runs once
  per request): releases each workload request at its arrival time and dispatches it.
- ``_autoscale`` (if an autoscaler is configured): every sync period, asks the policy for the
  desired size and starts (cold) or drains replicas.
- ``_sample``: every ``sample_interval_s``, records the gauges of each replica and the cluster.
- ``_failures`` (if failures are configured): injects replica failures.

Every request ends exactly once: completed, rejected (admission, too long, no replica) or failed
(replica failure without retry, or retries exhausted), always with a reason. ``run()`` checks this.
"""

from __future__ import annotations

import functools
import gc
import time
from array import array
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd
import simpy
from simpy.core import NORMAL, URGENT

from policies.base import Autoscaler, ClusterView, ReplicaState, Router, RoutingRequest
from sim.engine import EngineConfig, EngineRequest
from sim.events import CallbackEvent, Environment, can_reserve_eids
from sim.metrics import (COMPLETED, FAILED, REJECTED, REQUEST_COLUMNS, SLO, LogHistogram, TimeSeries,
                         labelled_column, summarize)
from sim.replica import Replica
from sim.rng import stream
from sim.step_time import StepTimeModel
from sim.kv_cache import PromptBlockHashes
from traces.schema import Workload

_STATUS_NAMES = {0: "pending", 1: COMPLETED, 2: REJECTED, 3: FAILED}
_STATUS_LABELS = [_STATUS_NAMES[k] for k in range(len(_STATUS_NAMES))]  # code -> status
_STATUS_CODES = {COMPLETED: 1, REJECTED: 2, FAILED: 3}
_SERVING = ReplicaState.SERVING


@dataclass
class FailureConfig:
    mtbf_s: float | None = None  # mean time between failures per replica (exponential)
    inject: list[tuple[int, float]] = field(default_factory=list)  # (replica_id, time_s)
    on_failure: str = "retry"  # or "fail"
    max_retries: int = 2
    replace: bool = True  # start a replacement replica (cold) when one fails


@dataclass
class ClusterConfig:
    workload: Workload
    engine: EngineConfig
    make_step_model: Callable[[], StepTimeModel]
    router: Router
    replicas: int = 1
    num_gpus_per_replica: int = 1
    usd_per_gpu_hour: float = 0.0
    staleness_s: float = 0.0
    autoscaler: Autoscaler | None = None
    min_replicas: int = 0
    max_replicas: int = 1_000_000
    cold_start: Callable[[np.random.Generator], float] = lambda rng: 0.0
    initial_cold_start: bool = False  # do the initial replicas pay the cold start?
    admission: Any = None  # object with admit(request, now, ClusterView) -> (bool, reason)
    failures: FailureConfig = field(default_factory=FailureConfig)
    sample_interval_s: float = 1.0
    slo: SLO | None = None
    seed: int = 0
    progress: bool = False
    closed_loop: bool = False  # release a turn think_time_s after its parent turn finishes
    on_progress: Callable[[int, int, float], None] | None = None  # (ended, total, sim_time_s)
    horizon_after_last_arrival_s: float = 7 * 86400.0
    engine_fast_forward: bool = True  # exact fast-forward of decode runs (False: one event per step)


@contextmanager
def _quiet_gc(young: int = 100_000):
    """Run the event loop with the cyclic garbage collector mostly out of the way.

    Why: a long run keeps millions of live objects (requests, block tables, hash lists); every
    full collection walks all of them, so collections cost a few percent of a run while finding
    almost nothing (the loop's garbage is freed by reference counting). The objects alive at the
    start are frozen (never scanned) and young collections happen every ``young`` net allocations
    instead of 700. Both are restored on exit, whatever happens.
    """
    old = gc.get_threshold()
    freeze = gc.get_freeze_count() == 0  # a caller's own frozen set is left alone
    if freeze:
        gc.freeze()
    gc.set_threshold(young, old[1], old[2])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        if freeze:
            gc.unfreeze()


class _StaleView:
    """A replica's gauges as a router saw them at the last scrape; router-tracked counts stay exact."""

    __slots__ = ("_r", "replica_id", "state", "num_running", "num_waiting", "kv_usage", "num_free_blocks",
                 "num_total_blocks", "block_size", "num_preemptions", "prefix_hit_rate")

    def __init__(self, r: Replica):
        self._r = r
        self.replica_id = r.replica_id
        self.num_total_blocks = r.num_total_blocks
        self.block_size = r.block_size
        self.refresh()

    def refresh(self) -> None:
        r = self._r
        self.state = r.state
        self.num_running = r.num_running
        self.num_waiting = r.num_waiting
        self.kv_usage = r.kv_usage
        self.num_free_blocks = r.num_free_blocks
        self.num_preemptions = r.num_preemptions
        self.prefix_hit_rate = r.prefix_hit_rate

    @property
    def inflight_requests(self) -> int:
        return self._r.inflight_requests

    @property
    def inflight_tokens(self) -> int:
        return self._r.inflight_tokens

    def cached_prefix_blocks(self, block_hashes) -> int:
        return self._r.cached_prefix_blocks(block_hashes)


class Cluster:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self.env = Environment()  # simpy.Environment with an inlined run loop (sim.events)
        self.itl = LogHistogram()
        # One RNG stream per subsystem: adding draws to one never shifts another's.
        self.rng_cold_start = stream(cfg.seed, "cold_start")
        self.rng_failures = stream(cfg.seed, "failures")
        cfg.router.rng = stream(cfg.seed, "router")
        w = cfg.workload
        df = w.df
        self.n = len(df)
        self.arrival = df["arrival_s"].to_numpy(dtype=np.float64)
        self.prompt = df["prompt_tokens"].to_numpy(dtype=np.int64)
        self.output = df["output_tokens"].to_numpy(dtype=np.int64)
        self.session = df["session_id"].to_numpy() if w.has("session_id") else None
        self.tenant = df["tenant"].to_numpy() if w.has("tenant") else None
        self.priority = df["priority"].fillna(0).to_numpy(dtype=np.int64) if w.has("priority") else None
        self.token_ids = df["token_ids"].to_numpy() if w.has("token_ids") else None
        self.hash_ids = df["hash_ids"].to_numpy() if w.has("hash_ids") else None
        self._prompt_hashes = PromptBlockHashes(w, cfg.engine.block_size)
        self.children: dict[int, list[int]] | None = None
        self.think = None
        if cfg.closed_loop:
            self._link_sessions(df)
        # Outcome columns, filled when each request ends. Typed arrays (array.array), not numpy:
        # the same memory, but storing one Python scalar costs a third of a numpy item write, and
        # there are ~10 per request. ``_collect`` views them as numpy arrays without a copy.
        n = self.n
        self.o_status = _column("b", 0, n)  # int8
        self.o_replica = _column("i", -1, n)  # int32
        self.o_cached = _column("q", 0, n)  # int64
        self.o_out = _column("q", 0, n)
        self.o_queue = _column("d", np.nan, n)
        self.o_ttft = _column("d", np.nan, n)
        self.o_tpot = _column("d", np.nan, n)
        self.o_e2e = _column("d", np.nan, n)
        self.o_finish = _column("d", np.nan, n)
        self.o_preempt = _column("i", 0, n)  # int32
        self.o_retries = _column("i", 0, n)
        # Why a request ended, as a code into _reason_labels (0: no reason, i.e. completed).
        self.o_reason = _column("h", 0, n)  # int16
        self._reason_labels: list[str | None] = [None]
        self._reason_codes: dict[str | None, int] = {None: 0}
        self.ended = 0
        self.arrived = 0
        self.replicas: list[Replica] = []  # every replica ever created, by id
        self.active: list[Replica] = []  # starting / serving / draining
        self.pending: deque[EngineRequest] = deque()  # waiting for any replica to be serving
        # RoutingRequest of each routed, unfinished request: kept only when a router or admission
        # on_finished hook will want it back (see _needs_routing).
        self._routing: dict[int, RoutingRequest] = {}
        self._serving: tuple[Replica, ...] | None = None  # SERVING members of active; None: stale
        self._active_version = 0  # bumped whenever self.active changes (the sampler's cache key)
        self._views: dict[int, _StaleView] = {}
        self._views_refreshed_s = -1.0
        self.series = TimeSeries()
        # Replicas woken by the arrival callback in progress (see _run_wakes); None outside it.
        self._wakes: list[tuple[int, Replica]] | None = None
        self._fold_wakes = can_reserve_eids(self.env)
        self._done = self.env.event()
        self._prefix_queries_ended = 0
        self._prefix_hits_ended = 0
        self._preemptions_ended = 0
        self._replica_samples: list[int] = []
        self._progress = None
        self._progress_every = max(1, n // 200)
        self.incomplete = False
        # Requests still in the system this long after the last arrival are declared stuck.
        self._horizon = (float(self.arrival[-1]) if n else 0.0) + cfg.horizon_after_last_arrival_s
        self._next_arrival = 0  # index of the next row the arrival chain looks at
        # Per-request reads of the workload columns go through memoryviews: a Python scalar per
        # read without numpy's scalar boxing, and no copy of the columns (closed-loop release times
        # written into self.arrival are seen through its view).
        self._arrival_mv = _scalars(self.arrival)
        self._gated_mv = _scalars(self.has_parent) if self.children is not None else None
        self._prompt_mv = _scalars(self.prompt)
        self._output_mv = _scalars(self.output)
        self._priority_mv = _scalars(self.priority) if self.priority is not None else None
        self._block_size = cfg.engine.block_size
        self._max_model_len = cfg.engine.max_model_len
        # Hooks that are the base class's no-ops are not called, and a RoutingRequest is kept
        # after routing only when some on_finished hook will receive it.
        router = cfg.router
        self._router_on_routed = _override(router, Router, "on_routed")
        self._router_on_finished = _override(router, Router, "on_finished")
        self._admission_on_finished = getattr(cfg.admission, "on_finished", None) if cfg.admission is not None else None
        self._needs_routing = self._router_on_finished is not None or self._admission_on_finished is not None
        self._route = router.route  # bound once: called for every request
        self._arrivals_cb = self._arrivals_due  # (bound once: one per arrival time)
        self._no_labels = self.session is None and self.tenant is None  # RoutingRequest without session/tenant
        self._staleness_s = cfg.staleness_s

    def _link_sessions(self, df: pd.DataFrame) -> None:
        """Closed loop: a turn whose parent is in the table waits for the parent to finish."""
        from sim.errors import ConfigError

        if "parent_request_id" not in df.columns or "request_id" not in df.columns:
            raise ConfigError("workload.closed_loop: the workload has no parent_request_id/request_id columns "
                              "(use multi-turn sessions, e.g. synthetic sessions or a Bailian trace)")
        self.arrival = self.arrival.copy()  # release times replace the table's estimates
        index = {rid: k for k, rid in enumerate(df["request_id"].astype("string").tolist()) if rid is not pd.NA}
        self.children = {}
        self.has_parent = np.zeros(self.n, dtype=bool)
        for k, par in enumerate(df["parent_request_id"].astype("string").tolist()):
            if par is pd.NA or par is None:
                continue
            j = index.get(par)
            if j is not None and j != k:
                self.children.setdefault(j, []).append(k)
                self.has_parent[k] = True
        think = df["think_time_s"].to_numpy(dtype=float) if "think_time_s" in df.columns else np.zeros(self.n)
        self.think = np.nan_to_num(think, nan=0.0)

    def _release_child(self, k: int, delay: float):
        if delay > 0:
            yield self.env.timeout(delay)
        self.arrival[k] = self.env.now
        self._arrive(k)

    def _on_session_turn_ended(self, i: int, completed: bool) -> None:
        for k in self.children.get(i, ()):
            if completed:
                self.env.process(self._release_child(k, float(self.think[k])))
            else:
                # The user never sends the next turn of a conversation whose previous turn failed.
                self.arrived += 1
                self._end_index(k, REJECTED, "session_aborted")

    # -- replica management -------------------------------------------------------------------
    def _start_replica(self, cold: bool = True) -> Replica:
        cfg = self.cfg
        cold_s = float(cfg.cold_start(self.rng_cold_start)) if cold else 0.0
        r = Replica(self, len(self.replicas), cfg.engine, cfg.make_step_model(), cold_s,
                    cfg.num_gpus_per_replica, cfg.usd_per_gpu_hour)
        self.replicas.append(r)
        self.active.append(r)
        self._active_version += 1
        self._serving = None
        if cfg.failures.mtbf_s:
            self.env.process(self._random_failure(r))
        return r

    def on_replica_ready(self, r: Replica) -> None:
        self._serving = None
        while self.pending and r.state == ReplicaState.SERVING:
            self._dispatch(self.pending.popleft())

    def on_replica_draining(self, r: Replica) -> None:
        self._serving = None

    def on_replica_ended(self, r: Replica) -> None:
        if r in self.active:
            self.active.remove(r)
            self._active_version += 1
        self._serving = None
        kv = r.engine.kv
        self._prefix_queries_ended += kv.prefix_queries
        self._prefix_hits_ended += kv.prefix_hits
        self._preemptions_ended += r.engine.num_preemptions
        self._views.pop(r.replica_id, None)
        self.cfg.router.on_replica_removed(r.replica_id)
        # Requests held for a serving replica cannot wait for one that will never come.
        if self.pending and not self.active:
            while self.pending:
                self._end_unserved(self.pending.popleft(), REJECTED, "no_replicas")

    def on_replica_failed(self, r: Replica, aborted: list[EngineRequest]) -> None:
        fcfg = self.cfg.failures
        for req in aborted:
            self._release(req, r)
            i = req.idx
            if fcfg.on_failure == "retry" and self.o_retries[i] < fcfg.max_retries:
                self.o_retries[i] += 1
                self.o_preempt[i] += req.num_preemptions
                # A retry is a fresh request to the engine (new replica, cold KV) but keeps its
                # original arrival time, so its latency includes the lost work.
                fresh = self._engine_request(i)
                fresh.first_token_s = -1.0
                self._dispatch(fresh)
            else:
                self.o_preempt[i] += req.num_preemptions
                self._end_unserved(req, FAILED, "replica_failed")
        if fcfg.replace and self.cfg.autoscaler is None:
            self._start_replica(cold=True)

    # -- arrivals, admission, routing ----------------------------------------------------------
    def _engine_request(self, i: int) -> EngineRequest:
        hashes, shared = self._prompt_hashes(i)  # engine_block_hashes of row i, precomputed vectorised
        pr = self._priority_mv[i] if self._priority_mv is not None else 0
        return EngineRequest(i, self._arrival_mv[i], self._prompt_mv[i], self._output_mv[i], hashes, pr, shared)

    def _routing_request(self, req: EngineRequest) -> RoutingRequest:
        # Positional (field order of RoutingRequest): keywords cost more, once per request.
        i = req.idx
        # A copy of the prompt's hashes: the engine extends its list in place with the hashes of
        # generated blocks.
        hashes = req.block_hashes[: req.prompt_tokens // self._block_size]
        if self._no_labels:
            return RoutingRequest(i, req.arrival_s, req.prompt_tokens, req.max_output_tokens, hashes, None, None,
                                  req.priority)
        return RoutingRequest(
            i, req.arrival_s, req.prompt_tokens, req.max_output_tokens, hashes,
            None if self.session is None else _opt_str(self.session[i]),
            None if self.tenant is None else _opt_str(self.tenant[i]),
            req.priority,
        )

    def _start_arrivals(self) -> None:
        """Start the arrival chain: at each arrival time, an event whose callback releases every
        request arriving then and schedules the next one.

        Why not a process: this is exactly what a generator yielding ``env.timeout(t - now)``
        does (same event times, priorities and id order: the first event is URGENT now, like a
        process's start), minus a generator resume per arrival.
        """
        CallbackEvent(self.env, self._arrivals_due, priority=URGENT)

    def _arrivals_due(self, _event) -> None:
        """Release the requests due now; schedule the next arrival; wake the replicas that were
        idle (:meth:`_run_wakes`)."""
        env = self.env
        arrival = self._arrival_mv
        gated = self._gated_mv
        n = self.n
        i = self._next_arrival
        now = env._now  # (nothing below advances the clock)
        arrive = self._arrive
        wakes = self._wakes = [] if self._fold_wakes else None
        try:
            while i < n:
                if gated is not None and gated[i]:
                    i += 1
                    continue  # released when its parent turn finishes
                # A Python float (a memoryview item): the clock takes the type of the delays it is
                # given, and numpy float64 arithmetic would then spread to every step end computed
                # from it (same values, ~5x slower per operation).
                t = arrival[i]
                if t > now:
                    self._next_arrival = i
                    CallbackEvent(env, self._arrivals_cb, delay=t - now)  # at now + (t - now), as env.timeout
                    break
                i += 1
                self._next_arrival = i
                arrive(i - 1)
            else:
                self._next_arrival = n
        finally:
            self._wakes = None
        if wakes:
            self._run_wakes(wakes)

    def _run_wakes(self, wakes: list[tuple[int, Replica]]) -> None:
        """Wake the replicas that an arrival callback found idle, without events when that is exact.

        Why: an idle replica that is sent a request wakes in an event at now (NORMAL priority, as
        ``event.succeed()``), so that every request arriving at this instant is in its queue before
        it plans a step; that event was ~1 of the ~4 SimPy events per request.

        ``wakes`` holds, in the order of ``Replica.submit`` calls, ``(eid, replica)``: the id
        ``next(env._eid)`` that the wake event would have got, taken at that moment, so event ids
        are consumed exactly as with events. SimPy processes events in ``(time, priority, eid)``
        order; the wake event's key is ``(now, NORMAL, eid)``. When this callback returns, SimPy
        pops the smallest key in the queue, so if the queue holds no key smaller than the first
        wake's, the wake is the event SimPy would process next: running its callback
        (``_next_step``) here is the same as processing the event, minus the heap push/pop. The
        check is repeated before each wake (a wake's own step may sort before the next wake, e.g. a
        zero-length step, an URGENT event at now); at the first wake that something precedes, that
        wake and the rest are queued as the events they would have been, with their reserved ids.
        The sequence of callbacks run, the clock at each, and the key of every other event are
        therefore the same as with one event per wake: results are bit-identical, not just equal.
        Nothing reads the queue in between (only ``Replica.submit``'s own bookkeeping runs), and
        the same check covers every other event due now: an URGENT one (a process started or
        interrupted now, a step ending now) or a NORMAL one queued earlier (a metrics sample or an
        autoscaler tick at this instant, the end-of-run event) goes first, as it would have.

        Only wakes from this callback are folded; a submit anywhere else (a replica becoming ready,
        retries after a failure, a closed-loop turn released by its process, a drain) still
        schedules its event (``Replica._schedule_wake``): ``self._wakes`` is None there.
        """
        env = self.env
        queue = env._queue
        now = env._now
        for k, (eid, r) in enumerate(wakes):
            if queue:
                top = queue[0]
                # (top[1], top[2]) < (NORMAL, eid), without building the tuples (integers)
                if top[0] <= now and (top[1] < NORMAL or (top[1] == NORMAL and top[2] < eid)):
                    for eid, r in wakes[k:]:
                        CallbackEvent(env, r._wake, eid=eid)  # at now, NORMAL: where _schedule_wake put it
                    return
            r._next_step()

    def _arrive(self, i: int) -> None:
        self.arrived += 1
        if self._prompt_mv[i] + self._output_mv[i] > self._max_model_len:
            # vLLM's API server refuses these with HTTP 400 before they reach the engine.
            self._end_index(i, REJECTED, "exceeds_max_model_len")
            return
        req = self._engine_request(i)
        if self.cfg.admission is not None:
            ok, reason = self.cfg.admission.admit(self._routing_request(req), self.env.now, self.cluster_view())
            if not ok:
                self._end_unserved(req, REJECTED, reason)
                return
        self._dispatch(req)

    def _dispatch(self, req: EngineRequest) -> None:
        serving = self._serving
        if serving is None:
            # Rebuilt only after a replica started, became ready, ended or was drained (every
            # state change goes through the cluster): not a scan of the fleet per request.
            serving = self._serving = tuple(r for r in self.active if r.state == ReplicaState.SERVING)
        if not serving:
            if any(r.state == ReplicaState.STARTING for r in self.active) or self.cfg.autoscaler is not None:
                self.pending.append(req)  # the gateway holds it until a replica is ready
            else:
                self._end_unserved(req, REJECTED, "no_replicas")
            return
        rreq = self._routing_request(req)
        i = req.idx
        now = self.env._now
        rid = self._route(rreq, serving if self._staleness_s <= 0 else self._router_views(serving), now)
        replicas = self.replicas
        target = replicas[rid] if 0 <= rid < len(replicas) else None
        if target is None or target.state != _SERVING:
            raise RuntimeError(f"router {self.cfg.router.name!r} chose replica {rid}, which is not serving")
        target.inflight_requests += 1
        target.inflight_tokens += req.prompt_tokens + req.max_output_tokens
        if self._needs_routing:
            self._routing[i] = rreq
        self.o_replica[i] = rid
        if self._router_on_routed is not None:
            self._router_on_routed(rreq, rid, now)
        target.submit(req)

    def _router_views(self, serving: list[Replica]):
        if self.cfg.staleness_s <= 0:
            return serving
        now = self.env.now
        if now - self._views_refreshed_s >= self.cfg.staleness_s:
            # Scrape: refresh every view at once, like a router polling /metrics on a period.
            self._views_refreshed_s = now - (now % self.cfg.staleness_s)
            for r in self.active:
                v = self._views.get(r.replica_id)
                if v is None:
                    self._views[r.replica_id] = _StaleView(r)
                else:
                    v.refresh()
        out = []
        for r in serving:
            v = self._views.get(r.replica_id)
            if v is None:
                v = self._views[r.replica_id] = _StaleView(r)
            out.append(v)
        return out

    def _release(self, req: EngineRequest, r: Replica) -> None:
        r.inflight_requests -= 1
        r.inflight_tokens -= req.prompt_tokens + req.max_output_tokens
        if self._needs_routing:
            self._finished_hooks(req, r)

    def _finished_hooks(self, req: EngineRequest, r: Replica) -> None:
        rreq = self._routing.pop(req.idx, None)
        if rreq is not None:
            now = self.env._now
            if self._router_on_finished is not None:
                self._router_on_finished(rreq, r.replica_id, now)
            if self._admission_on_finished is not None:
                self._admission_on_finished(rreq, now, req.num_output_tokens)

    # -- endings --------------------------------------------------------------------------------
    def on_request_finished(self, r: Replica, req: EngineRequest) -> None:
        self._release(req, r)
        i = req.idx
        arrival_s = req.arrival_s
        first_token_s = req.first_token_s
        finish_s = req.finish_s
        n_out = req.num_output_tokens
        cached = req.cached_tokens
        self.o_cached[i] = cached if cached > 0 else 0  # max(cached, 0)
        self.o_out[i] = n_out
        self.o_queue[i] = req.first_scheduled_s - arrival_s
        self.o_ttft[i] = first_token_s - arrival_s
        if n_out > 1:
            self.o_tpot[i] = (finish_s - first_token_s) / (n_out - 1)
        self.o_e2e[i] = finish_s - arrival_s
        self.o_finish[i] = finish_s
        if req.num_preemptions:
            self.o_preempt[i] += req.num_preemptions
        self._end_index(i, COMPLETED, None)

    def _end_unserved(self, req: EngineRequest, status: str, reason: str) -> None:
        self._end_index(req.idx, status, reason)

    def _end_index(self, i: int, status: str, reason: str | None) -> None:
        if self.o_status[i] != 0:
            raise RuntimeError(f"request {i} ended twice ({_STATUS_NAMES[self.o_status[i]]} then {status})")
        self.o_status[i] = _STATUS_CODES[status]
        if reason is not None:
            code = self._reason_codes.get(reason)
            if code is None:
                code = self._reason_codes[reason] = len(self._reason_labels)
                self._reason_labels.append(reason)
            self.o_reason[i] = code
        if status != COMPLETED:
            self.o_finish[i] = self.env.now
        self.ended += 1
        if self.children is not None and i in self.children:
            self._on_session_turn_ended(i, status == COMPLETED)
        if self.ended % self._progress_every == 0:
            self._report_progress()
        if self.ended == self.n and not self._done.triggered:
            self._done.succeed()

    def _report_progress(self) -> None:
        if self._progress is not None:
            self._progress.update(self._progress_every)
        if self.cfg.on_progress is not None:
            self.cfg.on_progress(self.ended, self.n, self.env.now)

    # -- autoscaling, failures, sampling -----------------------------------------------------
    def cluster_view(self) -> ClusterView:
        return ClusterView(now=self.env.now, replicas=list(self.active), arrivals_total=self.arrived,
                           cluster_waiting=len(self.pending))

    def _autoscale(self):
        a = self.cfg.autoscaler
        env = self.env
        observe = getattr(a, "observe", None)
        metric_period = getattr(a, "metric_period_s", None)
        next_sync = 0.0
        step = min(metric_period or a.sync_period_s, a.sync_period_s)
        while True:
            if observe is not None:
                observe(env.now, self.cluster_view())
            if env.now + 1e-9 >= next_sync:
                next_sync += a.sync_period_s
                self._apply_desired(a.desired(env.now, self.cluster_view()))
            yield env.timeout(step)

    def _apply_desired(self, desired: int) -> None:
        desired = max(self.cfg.min_replicas, min(self.cfg.max_replicas, int(desired)))
        current = [r for r in self.active if r.state in (ReplicaState.SERVING, ReplicaState.STARTING)]
        if desired > len(current):
            for _ in range(desired - len(current)):
                self._start_replica(cold=True)
        elif desired < len(current):
            # Cancel replicas still starting first (newest first), then drain the least loaded.
            order = sorted(current, key=lambda r: (r.state != ReplicaState.STARTING, r.inflight_requests, -r.replica_id))
            for r in order[: len(current) - desired]:
                r.drain()  # (each tells on_replica_draining: drained replicas take no new work)

    def _random_failure(self, r: Replica):
        ttf = float(self.rng_failures.exponential(self.cfg.failures.mtbf_s))
        yield self.env.timeout(ttf)
        if r.state not in (ReplicaState.STOPPED, ReplicaState.FAILED):
            r.fail()

    def _injected_failures(self):
        for rid, t in sorted(self.cfg.failures.inject, key=lambda x: x[1]):
            if t > self.env.now:
                yield self.env.timeout(t - self.env.now)
            if rid < len(self.replicas):
                self.replicas[rid].fail()

    def _sample(self):
        """Every ``sample_interval_s``: one row per active replica and one for the cluster.

        This runs ~10^5 times in a day-long run, so each gauge is read once per replica (some are
        computed on demand during fast-forwarded runs) and the row goes into the series' flat
        value lists (see :class:`sim.metrics.TimeSeries`).
        """
        env = self.env
        dt = self.cfg.sample_interval_s
        series = self.series
        ints = series.ints
        floats = series.floats
        codes = series.label_codes  # keyed by label; a ReplicaState (a str enum) hashes as its value
        cluster_codes: dict[int, int] = {}  # replicas serving or starting -> code of "replicas=N"
        serving, starting = ReplicaState.SERVING, ReplicaState.STARTING
        nan = np.nan
        rows: list[tuple] = []  # per active replica: (replica, gauges, kv manager, id, usable blocks)
        rows_version = -1  # self._active_version that rows was built for
        while True:
            t = env._now
            run_sum = wait_sum = gen_sum = pre_sum = 0
            kv_sum = 0.0
            n_rep = 0
            active = self.active
            if rows_version != self._active_version:  # replicas started or ended since the last tick
                rows = [(r, r.engine.gauges, r.engine.kv, r.replica_id, r.engine.kv.pool.num_gpu_blocks - 1)
                        for r in active]
                rows_version = self._active_version
            for r, gauges, kv, rid, usable in rows:
                q = kv.prefix_queries
                hr = kv.prefix_hits / q if q else 0.0
                run, wait, free, pre, gen = gauges(t)
                usage = 1.0 - free / usable  # KVCacheManager.usage()
                st = r.state
                try:
                    code = codes[st]
                except KeyError:
                    code = series.code(st.value)
                ints += (rid, code, run, wait, pre, gen, r.inflight_requests)
                floats += (usage, hr)
                run_sum += run
                wait_sum += wait
                kv_sum += usage
                gen_sum += gen
                pre_sum += pre
                if st is serving or st is starting:
                    n_rep += 1
            code = cluster_codes.get(n_rep)
            if code is None:
                code = cluster_codes[n_rep] = series.code(f"replicas={n_rep}")
            ints += (-1, code, run_sum, wait_sum + len(self.pending), pre_sum, gen_sum, self.arrived - self.ended)
            floats += (kv_sum / len(active) if active else 0.0, nan)
            series.end_tick(t, len(active) + 1)
            self._replica_samples.append(n_rep)
            if self.arrived == self.n and t > self._horizon:
                self._give_up()
                return
            yield env.timeout(dt)

    def _give_up(self) -> None:
        """Past the horizon with requests still in the system: end them as failed, loudly."""
        self.incomplete = True
        for r in list(self.active):
            for req in r.engine.abort_all():
                self._release(req, r)
                self._end_unserved(req, FAILED, "unfinished_at_horizon")
        while self.pending:
            self._end_unserved(self.pending.popleft(), FAILED, "unfinished_at_horizon")

    # -- run ---------------------------------------------------------------------------------
    def run(self) -> "RunOutput":
        cfg = self.cfg
        wall0 = time.perf_counter()
        for _ in range(cfg.replicas):
            self._start_replica(cold=cfg.initial_cold_start)
        self._start_arrivals()
        self.env.process(self._sample())
        if cfg.autoscaler is not None:
            self.env.process(self._autoscale())
        if cfg.failures.inject:
            self.env.process(self._injected_failures())
        if cfg.progress:
            from tqdm import tqdm

            self._progress = tqdm(total=self.n, unit="req", desc="simulating", leave=False, mininterval=0.5)
        try:
            if self.n:
                with _quiet_gc():
                    self.env.run(until=self._done)
        finally:
            if self._progress is not None:
                self._progress.close()
        wall = time.perf_counter() - wall0
        return self._collect(wall)

    def _collect(self, wall: float) -> "RunOutput":
        # The outcome columns as numpy arrays from here on (views of the typed arrays, no copy).
        for name in _OUTCOME_COLUMNS:
            setattr(self, name, np.asarray(getattr(self, name)))
        now = self.env.now
        n = self.n
        if int((self.o_status != 0).sum()) != n:
            raise RuntimeError(f"conservation violated: {n - int((self.o_status != 0).sum())} requests never ended")
        w = self.cfg.workload
        df = w.df
        req = pd.DataFrame({
            "request_id": _as_result_column(df["request_id"]) if w.has("request_id") else np.arange(n),
            "arrival_s": self.arrival,
            "replica": self.o_replica,
            "prompt_tokens": self.prompt,
            "cached_tokens": self.o_cached,
            "output_tokens": self.o_out,
            "queue_s": self.o_queue,
            "ttft_s": self.o_ttft,
            "tpot_s": self.o_tpot,
            "e2e_s": self.o_e2e,
            "finish_s": self.o_finish,
            "preemptions": self.o_preempt,
            "retries": self.o_retries,
            # (An empty run keeps the dtypes pandas gives empty columns: object and float64.)
            "status": labelled_column(_STATUS_LABELS, self.o_status) if n else np.array([], dtype=object),
            "reason": labelled_column(self._reason_labels, self.o_reason) if n else [],
            "session_id": _as_result_column(df["session_id"]) if self.session is not None else None,
            "tenant": _as_result_column(df["tenant"]) if self.tenant is not None else None,
            "priority": self.priority if self.priority is not None else 0,
        }, columns=REQUEST_COLUMNS)
        # Stats of replicas still alive at the end.
        pq, ph, pre = self._prefix_queries_ended, self._prefix_hits_ended, self._preemptions_ended
        for r in self.active:
            pq += r.engine.kv.prefix_queries
            ph += r.engine.kv.prefix_hits
            pre += r.engine.num_preemptions
        gpu_hours = sum(r.gpu_hours(now) for r in self.replicas)
        cost = sum(r.cost_usd(now) for r in self.replicas)
        start = float(self.arrival[0]) if n else 0.0
        duration = max(now - start, 1e-9)
        samples = np.array(self._replica_samples or [len(self.active)])
        busy = np.array([r.busy_s for r in self.replicas]) if self.replicas else np.zeros(1)
        extra = {
            "replicas_max": int(samples.max()),
            "replicas_mean": float(samples.mean()),
            "replicas_started": len(self.replicas),
            "replica_failures": sum(1 for r in self.replicas if r.state == ReplicaState.FAILED),
            "retries": int(self.o_retries.sum()),
            "engine_steps": int(sum(r.engine.steps for r in self.replicas)),
            "load_imbalance": float(busy.max() / busy.mean()) if busy.mean() > 0 else 1.0,
            "complete": not self.incomplete,
        }
        summary = summarize(req, self.itl, duration_s=duration, gpu_hours=gpu_hours, cost_usd=cost,
                            prefix_queries=pq, prefix_hits=ph, preemptions=pre, slo=self.cfg.slo,
                            sim_wall_s=wall, extra=extra)
        return RunOutput(req, self.series.frame(), summary, self._replica_table(req, now))

    def _replica_table(self, req: pd.DataFrame, now: float) -> pd.DataFrame:
        """One row per replica ever started: lifetime, load, cache and cost."""
        # Only the four columns it needs, not a filtered copy of the whole table.
        done = req.loc[self.o_status == _STATUS_CODES[COMPLETED], ["replica", "output_tokens", "ttft_s", "e2e_s"]]
        per = done.groupby("replica").agg(requests=("ttft_s", "size"), output_tokens=("output_tokens", "sum"),
                                          ttft_p50_s=("ttft_s", "median"), e2e_p99_s=("e2e_s", lambda x: x.quantile(0.99)))
        rows = []
        for r in self.replicas:
            kv = r.engine.kv
            end = r.ended_s if r.ended_s is not None else now
            serving = (end - r.serving_s) if r.serving_s is not None else 0.0
            p = per.loc[r.replica_id] if r.replica_id in per.index else None
            rows.append({
                "replica": r.replica_id, "final_state": r.state.value, "created_s": r.created_s,
                "serving_s": r.serving_s, "ended_s": r.ended_s,
                "requests_completed": int(p["requests"]) if p is not None else 0,
                "output_tokens": int(p["output_tokens"]) if p is not None else 0,
                "busy_fraction": r.busy_s / serving if serving > 0 else 0.0,
                "prefix_hit_rate": kv.prefix_hits / kv.prefix_queries if kv.prefix_queries else 0.0,
                "preemptions": r.engine.num_preemptions, "engine_steps": r.engine.steps,
                "ttft_p50_s": float(p["ttft_p50_s"]) if p is not None else float("nan"),
                "e2e_p99_s": float(p["e2e_p99_s"]) if p is not None else float("nan"),
                "gpu_hours": r.gpu_hours(now), "cost_usd": r.cost_usd(now),
            })
        return pd.DataFrame(rows)


@dataclass
class RunOutput:
    requests: pd.DataFrame
    timeseries: pd.DataFrame
    summary: dict
    replicas: pd.DataFrame


def _as_result_column(col: pd.Series):
    """A workload column for the result table: what ``pd.DataFrame`` infers from ``col.to_numpy()``.

    Why not always that: a string column's ``to_numpy()`` makes one Python object per row, which
    pandas then infers and copies back into a string array (seconds for millions of rows). When the
    column already has the dtype that inference would give (pandas' default ``str``) and a
    non-missing value, the round trip is the identity, so the array is used as is.
    """
    if col.dtype == _inferred_str_dtype() and col.notna().any():
        return col.array
    return col.to_numpy()


@functools.cache
def _inferred_str_dtype():
    """The dtype pandas infers for a column of Python strings (``str`` since pandas 3, else object)."""
    return pd.Series(["a"]).dtype


def _isnan(v) -> bool:
    """Missing scalar: None, NaN or pandas' NA (never true for a list/array)."""
    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


_OUTCOME_COLUMNS = ("o_status", "o_replica", "o_cached", "o_out", "o_queue", "o_ttft", "o_tpot", "o_e2e",
                    "o_finish", "o_preempt", "o_retries", "o_reason")


def _column(typecode: str, fill, n: int) -> array:
    """``n`` copies of ``fill`` in a typed array (``array.array``: a numpy dtype's memory, cheap scalar stores)."""
    return array(typecode, [fill]) * n


def _scalars(a: np.ndarray):
    """Read-only per-item access to a numeric column that yields Python scalars (a memoryview of it)."""
    if a.dtype.kind not in "biuf" or a.ndim != 1:
        return a.tolist()  # pragma: no cover - the columns read this way are numeric vectors
    return memoryview(a).toreadonly()  # strided or not: a view, never a copy


def _override(obj, base: type, name: str):
    """``obj.name`` bound, or None when it is ``base``'s own (a no-op hook not worth a call)."""
    fn = getattr(obj, name, None)
    if fn is None or (getattr(type(obj), name, None) is getattr(base, name) and name not in getattr(obj, "__dict__", ())):
        return None
    return fn


def _opt_str(v) -> str | None:
    if v is None or _isnan(v):
        return None
    return str(v)
