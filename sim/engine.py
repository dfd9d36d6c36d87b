"""One replica's engine: vLLM V1's continuous-batching scheduler over the paged KV cache.

This module knows nothing of SimPy. The replica process (:mod:`sim.replica`) drives it::

    plan = engine.schedule()          # which requests compute how many tokens this step
    dt = step_time_model.step_time(plan.shape)
    ... advance the clock by dt ...
    engine.update(plan, now)          # tokens produced, prefills advanced, completions

``schedule()`` follows ``vllm/v1/core/sched/scheduler.py`` ``Scheduler.schedule()``:

1. One token budget per step (``max_num_batched_tokens``).
2. RUNNING requests first, in admission order: a decode needs 1 token, an unfinished chunked
   prefill needs the rest of its prompt (capped by the budget). If blocks run out, preempt by
   recompute: FCFS evicts the most recently admitted running request, ``priority`` evicts the
   largest (priority, arrival); the victim frees all its blocks, restarts from zero computed tokens
   and goes to the *front* of the waiting queue.
3. Only if nothing was preempted this step: admit WAITING requests while budget remains and fewer
   than ``max_num_seqs`` run, after a prefix-cache lookup; stop at the first that does not fit.

**Exact fast-forward** (:meth:`Engine.plan_decode_run`): when every running request is decoding
and nothing can change the batch before a known horizon, the next ``k`` steps are identical in
shape except for the context length, so they are planned at once instead of one
``schedule``/``update`` pair per step. :class:`DecodeRun` documents the horizon and why the
result is the same as ``k`` naive steps; docs/performance.md has the proof sketch and numbers.

Deviations from vLLM are listed in docs/architecture.md.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass
from operator import add, attrgetter, ge, sub
from typing import Callable, Sequence

import numpy as np

from sim.kv_cache import KVCacheManager, exclusive_count, unique_hash_base
from sim.step_time import BatchShape

WAITING, RUNNING, FINISHED = 0, 1, 2
_NO_ENDS = np.empty(0)  # no step ends computed (yet: a closed-form run never computes any)
_NO_ENDS.flags.writeable = False


class EngineRequest:
    """Per-request engine state. One object per request, never one per token."""

    __slots__ = (
        "idx", "arrival_s", "prompt_tokens", "max_output_tokens", "priority",
        "num_tokens", "num_computed_tokens", "num_output_tokens", "status",
        "blocks", "block_hashes", "num_shared_blocks", "num_cached_blocks", "hash_key",
        "enqueue_s", "first_scheduled_s", "first_token_s", "last_token_s", "finish_s",
        "num_preemptions", "cached_tokens", "seq",
    )

    def __init__(self, idx: int, arrival_s: float, prompt_tokens: int, max_output_tokens: int,
                 block_hashes: Sequence[int] = (), priority: int = 0, num_shared_blocks: int | None = None):
        self.idx = idx
        self.arrival_s = arrival_s
        self.prompt_tokens = prompt_tokens
        self.max_output_tokens = max_output_tokens
        self.priority = priority
        self.num_tokens = prompt_tokens  # prompt + tokens sampled so far
        self.num_computed_tokens = 0
        self.num_output_tokens = 0
        self.status = WAITING
        self.blocks: list[int] = []
        # Hashes of blocks past the precomputed prompt ones are ``hash_key - i``: negative, so they
        # never equal a prompt hash (64-bit unsigned), and unique per (request, block index).
        key = self.hash_key = unique_hash_base(idx)
        # A list is taken over (extended in place with the hashes of later blocks), not copied. A
        # prompt with no shared block comes as ``range(key, key - n, -1)`` (sim.kv_cache.
        # PromptBlockHashes): its hashes are this request's unique ids, and stay a range (no list of
        # Python ints per request; routers slice and index it like a list).
        t = type(block_hashes)
        if t is not list and not (t is range and block_hashes.start == key and block_hashes.step == -1):
            block_hashes = list(block_hashes)
        self.block_hashes = block_hashes
        # Leading blocks whose content other requests may share (the rest is unique to this one:
        # see sim.kv_cache.BlockPool.mark_unique). Unknown = all precomputed hashes.
        self.num_shared_blocks = len(block_hashes) if num_shared_blocks is None else num_shared_blocks
        self.num_cached_blocks = 0
        self.enqueue_s = arrival_s
        self.first_scheduled_s = -1.0
        self.first_token_s = -1.0
        self.last_token_s = -1.0
        self.finish_s = -1.0
        self.num_preemptions = 0
        self.cached_tokens = -1  # prefix-cache hit tokens at first admission
        self.seq = 0

    def extend_block_hashes(self, n: int) -> None:
        """Hashes for blocks past the precomputed prompt ones (generated tokens, partial tail).

        vLLM hashes every full block, including ones filled by generated tokens, so they are
        cached and LRU-evicted like prompt blocks. The simulator does not know generated token
        ids, so their content is unique to this request: any id unique per (request, block index)
        is equivalent to vLLM's content hash, and a plain integer costs nothing to compute.
        """
        h = self.block_hashes
        if n > len(h):
            key = self.hash_key
            if type(h) is range:  # unique ids only (see __init__): a longer range
                self.block_hashes = range(key, key - n, -1)
            else:
                h.extend(range(key - len(h), key - n, -1))


@dataclass(frozen=True)
class EngineConfig:
    """The scheduler knobs of one replica (vLLM ``SchedulerConfig`` / ``CacheConfig`` names)."""

    num_gpu_blocks: int
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    max_model_len: int = 131072
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"  # or "priority"
    watermark: float = 0.0
    long_prefill_token_threshold: int = 0
    # vLLM's SchedulerConfig.scheduler_reserve_full_isl (default True in vLLM 0.32): a WAITING
    # request is admitted only if its whole current sequence fits in the free blocks, not just the
    # chunk scheduled now (KVCacheManager.allocate_slots(full_sequence_must_fit=...)).
    scheduler_reserve_full_isl: bool = True


class StepPlan:
    """The output of one ``schedule()`` call."""

    __slots__ = ("requests", "num_tokens", "shape", "preempted")

    def __init__(self) -> None:
        self.requests: list[EngineRequest] = []
        self.num_tokens: list[int] = []
        self.shape = BatchShape()
        self.preempted: list[EngineRequest] = []

    @property
    def empty(self) -> bool:
        return not self.requests


class DecodeRun:
    """``k`` consecutive decode-only steps of the same batch, planned at once (exact fast-forward).

    Preconditions (checked by :meth:`Engine.plan_decode_run`): every running request is decoding
    (one token to compute, already has its first token) and all fit in the token budget. Then step
    ``j`` (1-based) schedules every running request for one token, in running order, with
    ``decode_context = sum(c0 + 1) + (j - 1) * B``. Nothing changes that until the first of:

    - a completion: ``k <= min(max_output - num_output)`` (the last step may finish requests);
    - a failed allocation: request ``r`` needs its ``m``-th new block at step
      ``len(blocks) * block_size - c0 + 1 + (m - 1) * block_size``; no block is freed inside a run,
      so allocations fail first at the step where the cumulative count exceeds the free blocks;
    - ``max_model_len``: a request with ``c >= max_model_len - 1`` would be skipped;
    - the waiting head becoming admissible: it is not now, the budget and running count left to it
      are constant, and the free blocks only decrease (so neither the chunk's allocation nor, with
      ``scheduler_reserve_full_isl``, the whole-sequence gate can start to fit); its need can change only if a block of its
      prefix hit is evicted, which happens only when that (free) block is popped -- the run stops
      before the step that would pop it;
    - an arrival (or anything else the replica is told about): the replica truncates the run to the
      step in flight (:meth:`Engine.truncate_run`).

    Allocations pop the free queue in (step, running position) order; since nothing is pushed during
    a run they are exactly the first blocks of the queue, replayed in that order, so block ids,
    evictions and the LRU order are identical to the naive path. State is materialised lazily: at
    time ``t`` the requests reflect the steps that ended at or before ``t`` and the pool also the
    step in flight (its blocks were allocated when it was scheduled), exactly as the naive path.
    """

    __slots__ = ("reqs", "B", "k", "ends", "c0", "first", "nc", "done", "pool_done",
                 "memo", "allocs", "dc0", "times", "dmin", "dmax", "t0", "monotone", "head", "head_dt")

    FIRST_CHUNK = 512  # step durations are computed in chunks (512, then x4 in total): many runs are cut short

    def __init__(self, reqs, c0, first, nc, k, allocs, times, t0, monotone=False):
        self.reqs: list[EngineRequest] = reqs
        self.monotone = monotone  # the model promises nondecreasing durations over a run
        self.t0 = t0  # start of the first step
        self.B = len(reqs)
        self.c0: list[int] = c0  # computed tokens at the start
        self.first: list[int] = first  # step at which each request needs its next new block
        self.nc: list[int] = nc  # registered (hashed) blocks at the start
        self.allocs: Callable[[int], int] = allocs  # new blocks allocated in steps 1..j
        self.k = k  # steps in the run (shrinks if truncated)
        self.dc0 = sum(c0) + self.B  # decode_context of step 1
        self.times = times  # (num_seqs, context_sum_start, n) -> step durations
        self.dmin = self.dmax = 0.0  # bounds of the computed step durations
        self.ends = _NO_ENDS  # end times of the steps computed so far (extend() makes the array)
        self.memo = (-1.0, 0)  # (time, steps ended by then) of the last completed_steps() query
        self.done = 0  # steps applied to the requests
        self.pool_done = 0  # steps whose block operations are applied to the pool
        # A scheduled step that ends at t0 and is not applied yet (see Engine.plan_decode_run's
        # ``head``): until t0 it is the step in flight and nothing of the run has happened.
        self.head: StepPlan | None = None
        self.head_dt = 0.0

    @property
    def computed(self) -> int:
        return len(self.ends)

    def extend(self, t_start: float) -> float:
        """Compute the next chunk of step durations and end times; return the chunk's last end.

        End times are a running sum started at the run's start, the same float additions as
        ``now + dt`` one step at a time. The durations themselves are not kept: only their bounds
        (for the ITL histogram).
        """
        n0 = len(self.ends)
        n = min(self.k - n0, max(self.FIRST_CHUNK, 3 * n0))
        acc = np.empty(n + 1)
        acc[0] = t_start
        dts = acc[1:]
        self.times(self.B, self.dc0 + n0 * self.B, n, out=dts)
        if self.monotone:  # nondecreasing (to a few ulps, far inside the ITL margin)
            lo, hi = acc.item(1), acc.item(n)
        else:
            lo, hi = float(np.minimum.reduce(dts)), float(np.maximum.reduce(dts))
        acc.cumsum(out=acc)
        if n0:
            self.ends = np.concatenate((self.ends, dts))
            self.dmin, self.dmax = min(self.dmin, lo), max(self.dmax, hi)
        else:
            self.ends = dts
            self.dmin, self.dmax = lo, hi
        self.memo = (-1.0, 0)
        return acc.item(n)

    @property
    def end_time(self) -> float:
        """When the engine must be woken: the end of the run, or of the last computed chunk."""
        return self.ends.item(min(self.k, len(self.ends)) - 1)

    def end_of(self, j: int) -> float:
        """End time of step ``j`` (1-based; ``end_of(0)`` is the run's start)."""
        return self.ends.item(j - 1) if j else self.t0

    def emit_itl(self, on_itl, on_itl_many, lo: int, s: int) -> None:
        """Inter-token gaps of steps ``lo+1..s`` (every request's gap is the step's end minus the
        previous end), each counted ``B`` times."""
        ends = self.ends

        def gaps() -> np.ndarray:
            prev = ends[lo - 1:s - 1] if lo else np.concatenate(([self.t0], ends[:s - 1]))
            return ends[lo:s] - prev

        if on_itl_many is not None:
            t_last = ends.item(s - 1)
            # A gap differs from its step duration by at most an ulp of the end time.
            eps = 4.0 * math.ulp(t_last)
            on_itl_many(gaps, self.B, s - lo, self.dmin - eps, self.dmax + eps, t_last - self.end_of(lo))
        else:
            for g in gaps().tolist():
                on_itl(g, self.B)

    def pending_blocks(self, s: int) -> int:
        """With ``s`` steps ended: blocks taken by the steps so far and the one in flight (allocated
        when it was scheduled) but not yet popped from the free queue."""
        j = min(s + 1, self.k)
        return self.allocs(j) - self.allocs(self.pool_done) if j > self.pool_done else 0

    def completed_steps(self, now: float) -> int:
        """Steps of the run that ended at or before ``now``."""
        t, s = self.memo
        if now != t:
            s = int(self.ends.searchsorted(now, "right"))
            self.memo = (now, s)
        return min(s, self.k)


class AffineDecodeRun(DecodeRun):
    """A :class:`DecodeRun` whose step ends are known in closed form.

    When a pure-decode step takes ``T + g * decode_context`` (``decode_run_affine`` of the linear
    and roofline models), step ``j`` of a run takes ``d1 + a * (j - 1)`` with ``d1 = T + g * dc0``
    and ``a = g * B`` (the context sum grows by ``B`` per step), so step ``j`` ends at
    ``t0 + j * d1 + a * j * (j - 1) / 2``. Nothing is computed per step: planning, truncating,
    observing and applying a run cost the same whatever its length. The ends equal the naive
    path's running sum ``now + dt`` to round-off (the sum accumulates ~one ulp of the clock per
    step; the closed form does not), see docs/performance.md.
    """

    __slots__ = ("d1", "a")

    def __init__(self, reqs, c0, first, nc, k, allocs, t0, T: float, g: float):
        super().__init__(reqs, c0, first, nc, k, allocs, None, t0, True)
        self.d1 = T + g * self.dc0  # duration of step 1
        self.a = g * self.B  # growth of the duration per step
        self.dmin = self.d1

    @property
    def computed(self) -> int:
        return self.k

    def extend(self, t_start: float) -> float:
        return self.end_of(self.k)

    def end_of(self, j: int) -> float:
        return self.t0 + (j * self.d1 + self.a * (j * (j - 1) // 2)) if j else self.t0

    @property
    def end_time(self) -> float:
        return self.end_of(self.k)

    def completed_steps(self, now: float) -> int:
        t, s = self.memo
        if now == t:
            return s
        k = self.k
        x = now - self.t0
        a, d1 = self.a, self.d1
        # Solve a*j*(j-1)/2 + d1*j = x for j, then settle the rounding against end_of itself.
        if x <= 0:
            j = 0
        elif a > 0:
            b = d1 - 0.5 * a
            j = int((math.sqrt(b * b + 2.0 * a * x) - b) / a)
        else:
            j = int(x / d1)
        j = min(max(j, 0), k)
        # Settle against the ends exactly as end_of computes them (inlined: this runs at every
        # observation of a replica in a run, e.g. each metrics sample).
        t0 = self.t0
        while j < k and t0 + ((j + 1) * d1 + a * ((j + 1) * j // 2)) <= now:
            j += 1
        while j > 0 and t0 + (j * d1 + a * (j * (j - 1) // 2)) > now:
            j -= 1
        self.memo = (now, j)
        return j  # truncate_run only shrinks k to completed + 1, so a memoised j stays <= k

    def emit_itl(self, on_itl, on_itl_many, lo: int, s: int) -> None:
        # The gaps of steps lo+1..s are an arithmetic progression: d1 + a*lo, step a, s - lo terms.
        first = self.d1 + self.a * lo
        n = s - lo
        prog = getattr(on_itl_many, "progression", None)
        if prog is not None:
            prog(first, self.a, n, self.B)
        else:
            for i in range(n):
                on_itl(first + self.a * i, self.B)


class Engine:
    """Scheduler + KV cache manager of one replica.

    Args:
        cfg: scheduler and cache knobs.
        on_itl: ``callback(itl_seconds, count)`` feeding the inter-token-latency histogram.
        on_itl_many: optional ``callback(values, count, n, lo, hi, total)``: the same for ``n``
            values at once (fast-forwarded runs), each counted ``count`` times; ``values()`` computes
            them, ``lo <= every value <= hi`` and ``total`` is their sum (to round-off), so a
            histogram can often add them without computing them. Default: ``on_itl`` per value.
        clock: ``() -> now``; needed only for fast-forward runs, so that observations made while a
            run is in flight see the exact state at that time.
        lazy_exclusive: let the block pool skip per-block state of request-exclusive blocks
            (:class:`sim.kv_cache.BlockPool`); ``False`` tracks every block (the reference).
    """

    def __init__(self, cfg: EngineConfig, on_itl: Callable[[float, int], None] | None = None,
                 on_itl_many: Callable[..., None] | None = None,
                 clock: Callable[[], float] | None = None, lazy_exclusive: bool = True):
        self.cfg = cfg
        self.kv = KVCacheManager(cfg.num_gpu_blocks, cfg.block_size, cfg.enable_prefix_caching, cfg.watermark,
                                 lazy_exclusive)
        self.running: list[EngineRequest] = []
        self._priority = cfg.scheduling_policy == "priority"
        self._waiting_fifo: deque[EngineRequest] = deque()
        self._waiting_heap: list[tuple[int, float, int, EngineRequest]] = []
        # The one of the two in use: its len() is the waiting count (read several times per request).
        self._waitq = self._waiting_heap if self._priority else self._waiting_fifo
        self._seq = 0
        self.num_preemptions = 0
        self._steps = 0
        self._tokens_generated = 0
        self.prompt_tokens_computed = 0
        self.busy_s = 0.0  # sum of step durations applied (kept here so runs can add them exactly)
        self.aborts = 0  # bumped by abort_all(): a plan made before it must not be applied
        self._on_itl = on_itl  # callback(itl_seconds, count) for the ITL histogram
        self._on_itl_many = on_itl_many
        self._clock = clock
        self._run: DecodeRun | None = None
        self._affine_model = None  # the step-time model whose decode_run_affine is memoised below
        self._affine_fn = None
        self._affine_memo: dict[int, tuple[float, float] | None] = {}
        self._sync_bound = self.sync  # handed to the KV manager at each run (bound once)
        self._pending_bound = self._pending_blocks

    # -- counters (exact at any time, even while a run is in flight) -------------------------
    @property
    def steps(self) -> int:
        run = self._run
        if run is None:
            return self._steps
        return self._steps + self._progress(run, self._clock())[0]

    @property
    def tokens_generated(self) -> int:
        run = self._run
        if run is None:
            return self._tokens_generated
        return self._tokens_generated + self._progress(run, self._clock())[1]

    @staticmethod
    def _progress(run: "DecodeRun", now: float) -> tuple[int, int, int]:
        """What the run in flight adds at ``now`` to the applied state: (steps, tokens generated,
        blocks taken but not yet popped)."""
        if run.head is not None:
            if now < run.t0:
                return 0, 0, 0  # the head step is in flight: nothing of the run is scheduled yet
            s = run.completed_steps(now)
            return 1 + s - run.done, run.B * (1 + s - run.done), run.pending_blocks(s)
        s = run.completed_steps(now)
        return s - run.done, (s - run.done) * run.B, run.pending_blocks(s)

    def gauges(self, now: float | None = None) -> tuple[int, int, int, int, int]:
        """``(num_running, num_waiting, num_free_blocks, num_preemptions, tokens_generated)`` at the
        clock's time (``now``, if the caller has it: it must be the clock's time): what a metrics
        scrape reads, with a run's progress looked up once."""
        free = self.kv.pool.free_queue.size
        gen = self._tokens_generated
        run = self._run
        if run is not None:
            _, tokens, blocks = self._progress(run, self._clock() if now is None else now)
            free -= blocks
            gen += tokens
        return len(self.running), len(self._waitq), free, self.num_preemptions, gen

    def _pending_blocks(self) -> int:
        """Blocks the run in flight has taken by now but not yet popped from the free queue."""
        run = self._run
        return 0 if run is None else self._progress(run, self._clock())[2]

    # -- queue -----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting_heap) if self._priority else len(self._waiting_fifo)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or len(self._waitq) > 0

    def add_request(self, req: EngineRequest, now: float) -> None:
        req.enqueue_s = now
        req.status = WAITING
        self._push_waiting(req, front=False)

    def _push_waiting(self, req: EngineRequest, front: bool) -> None:
        if self._priority:
            self._seq += 1
            heapq.heappush(self._waiting_heap, (req.priority, req.arrival_s, self._seq, req))
        elif front:
            self._waiting_fifo.appendleft(req)
        else:
            self._waiting_fifo.append(req)

    def _peek_waiting(self) -> EngineRequest:
        return self._waiting_heap[0][3] if self._priority else self._waiting_fifo[0]

    def _pop_waiting(self) -> EngineRequest:
        return heapq.heappop(self._waiting_heap)[3] if self._priority else self._waiting_fifo.popleft()

    def waiting_requests(self) -> list[EngineRequest]:
        if self._priority:
            return [e[3] for e in sorted(self._waiting_heap)]
        return list(self._waiting_fifo)

    # -- scheduling ------------------------------------------------------------------------
    def schedule(self, now: float = 0.0) -> StepPlan:
        """Plan one step starting at ``now`` (vLLM ``Scheduler.schedule``)."""
        if self._run is not None:
            raise RuntimeError("schedule() while a fast-forward run is in flight (call finish_run first)")
        cfg = self.cfg
        kv = self.kv
        bs = cfg.block_size
        caching = cfg.enable_prefix_caching
        max_len_1 = cfg.max_model_len - 1
        plan = StepPlan()
        reqs, ntoks = plan.requests, plan.num_tokens
        budget = cfg.max_num_batched_tokens
        thr = cfg.long_prefill_token_threshold
        running = self.running
        preempted = plan.preempted

        # 1. RUNNING requests, in admission order.
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            c = req.num_computed_tokens
            n = req.num_tokens - c
            if n == 1 and c < max_len_1 and c < len(req.blocks) * bs \
                    and (not caching or (c + 1) // bs <= req.num_cached_blocks):
                # A decode whose slot is already allocated and fills no block: nothing to allocate
                # or register (allocate_slots would be a no-op that succeeds).
                reqs.append(req)
                ntoks.append(1)
                budget -= 1
                i += 1
                continue
            if 0 < thr < n:
                n = thr
            n = min(n, budget, max_len_1 - c)
            if n <= 0:
                i += 1
                continue
            while not kv.allocate_slots(req, n):
                victim, vidx = self._pick_victim()
                if vidx < i:
                    # Priority policy can evict a request already scheduled this step: undo it.
                    i -= 1
                    k = next(k for k, r in enumerate(reqs) if r is victim)
                    budget += ntoks[k]
                    del reqs[k], ntoks[k]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                reqs.append(req)
                ntoks.append(n)
                budget -= n
                i += 1
                continue
            break  # the request itself was preempted: nothing more fits this step

        # 2. WAITING requests, only if nothing was preempted this step.
        full_isl = cfg.scheduler_reserve_full_isl
        if not preempted:
            waitq = self._waitq
            while budget > 0 and waitq and len(running) < cfg.max_num_seqs:
                req = self._peek_waiting()
                hit_blocks: list[int] = []
                num_hit = 0
                if req.num_computed_tokens == 0:
                    hit_blocks, num_hit = kv.get_computed_blocks(req)
                n = req.num_tokens - req.num_computed_tokens - num_hit
                if 0 < thr < n:
                    n = thr
                if not cfg.enable_chunked_prefill and n > budget:
                    break
                n = min(n, budget)
                # (When the chunk is the whole sequence, the gate is allocate_slots' own check.)
                if full_isl and n != min(req.num_tokens, cfg.max_model_len) - req.num_computed_tokens - num_hit \
                        and not self._full_sequence_fits(req, num_hit, hit_blocks, bool(reqs)):
                    break
                if not kv.allocate_slots(req, n, hit_blocks, apply_watermark=bool(reqs)):
                    break
                self._pop_waiting()
                req.num_computed_tokens += num_hit
                if req.cached_tokens < 0:
                    req.cached_tokens = num_hit
                    kv.record_prefix_lookup(req.num_tokens, num_hit)
                req.status = RUNNING
                if req.first_scheduled_s < 0:
                    req.first_scheduled_s = now
                running.append(req)
                reqs.append(req)
                ntoks.append(n)
                budget -= n

        # Shape of the step, for the step-time model.
        shape = plan.shape
        ds = dc = ps = pt = 0
        pa = 0
        for req, n in zip(reqs, ntoks):
            c = req.num_computed_tokens
            if n == 1 and req.num_output_tokens > 0 and c == req.num_tokens - 1:
                ds += 1
                dc += c + 1
            else:
                ps += 1
                pt += n
                pa += n * (c + n)
        shape.decode_seqs = ds
        shape.decode_context = dc
        shape.prefill_seqs = ps
        shape.prefill_tokens = pt
        shape.prefill_attn = float(pa) if ps else 0.0
        return plan

    def _full_sequence_fits(self, req: EngineRequest, num_hit: int, hit_blocks: list[int],
                            apply_watermark: bool) -> bool:
        """vLLM's full-sequence admission gate: would blocks for the request's whole current
        sequence (prompt plus any tokens generated before a preemption, capped at max_model_len),
        after its prefix hit, fit in the free blocks (less the watermark if a request is already
        scheduled this step)? The chunk itself is then allocated as usual."""
        full = min(req.num_tokens, self.cfg.max_model_len) - req.num_computed_tokens - num_hit
        return self.kv.can_allocate(req, max(full, 0), hit_blocks, apply_watermark=apply_watermark)

    def _pick_victim(self) -> tuple[EngineRequest, int]:
        """FCFS: the most recently admitted request. Priority: largest (priority, arrival)."""
        running = self.running
        if self._priority:
            vidx = max(range(len(running)), key=lambda k: (running[k].priority, running[k].arrival_s))
            return running.pop(vidx), vidx
        return running.pop(), len(running)

    def _preempt(self, req: EngineRequest) -> None:
        """Preemption by recompute: drop all KV, restart from zero, front of the queue."""
        self.kv.free(req, preempted=True)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = WAITING
        self.num_preemptions += 1
        self._push_waiting(req, front=True)

    # -- applying a finished step ----------------------------------------------------------
    def update(self, plan: StepPlan, now: float) -> list[EngineRequest]:
        """Advance every scheduled request by its tokens; return the requests that finished."""
        self._steps += 1
        finished: list[EngineRequest] = []
        on_itl = self._on_itl
        gaps: list[float] = []
        generated = 0
        for req, n in zip(plan.requests, plan.num_tokens):
            c = req.num_computed_tokens
            if c < req.prompt_tokens:
                self.prompt_tokens_computed += min(n, req.prompt_tokens - c)
            c += n
            req.num_computed_tokens = c
            if c < req.num_tokens:
                continue  # a chunk of a (re)computed prefill: no token sampled yet
            # Caught up: the step samples one new token for this request.
            req.num_output_tokens += 1
            req.num_tokens += 1
            generated += 1
            if req.first_token_s < 0:
                req.first_token_s = now
            elif on_itl is not None:
                gaps.append(now - req.last_token_s)
            req.last_token_s = now
            if req.num_output_tokens >= req.max_output_tokens:
                finished.append(req)
        self._tokens_generated += generated
        if gaps:
            _emit_run_lengths(on_itl, gaps)
        if finished:
            self._finish(finished, now)
        return finished

    def _finish(self, finished: list[EngineRequest], now: float) -> None:
        for req in finished:
            req.status = FINISHED
        if len(finished) == len(self.running):  # the whole batch (finished ones are all running)
            self.running = []
        else:
            self.running = [r for r in self.running if r.status != FINISHED]
        for req in finished:
            req.finish_s = now
            self.kv.free(req)

    def abort_all(self) -> list[EngineRequest]:
        """Drop every request (replica failure): free their blocks and return them."""
        if self._run is not None:
            self.sync()  # apply what happened up to now, then drop the rest of the run
            self._run = None
            self.kv.pending_sync = self.kv.pending_blocks = None
        self.aborts += 1
        out = list(self.running) + self.waiting_requests()
        for req in self.running:
            self.kv.free(req)
        self.running = []
        self._waiting_fifo.clear()
        self._waiting_heap.clear()
        return out

    # -- exact fast-forward of decode runs ---------------------------------------------------
    @property
    def in_run(self) -> bool:
        return self._run is not None

    def plan_decode_run(self, now: float, step_model, max_steps: int = 65536, min_steps: int = 2,
                        head: StepPlan | None = None, head_dt: float = 0.0) -> float | None:
        """Plan the next steps as one :class:`DecodeRun` if at least ``min_steps`` are certain.

        Returns the time the caller must wake up (the end of the run, or of its first chunk of
        steps; then call :meth:`run_wake`), or ``None`` if the next step must be scheduled normally.

        ``head``: a step just scheduled (``schedule()``), taking ``head_dt`` and ending at ``now``,
        not applied yet. The run is then planned now as it would be when that step ends -- on the
        state ``update(head, now)`` will leave, which differs from the current one only in the
        requests' token counts (the step's blocks are already allocated and registered, the queue
        and the pool do not change until then) -- and the head is applied lazily at ``now``, like
        the run's own steps. Only when every running request is in the head step and catches up
        with its prompt there (so all decode afterwards), none finishes, and the step-time model
        has the closed form; an arrival during the head step ends the run before its first step.
        Saves the head step's own event and re-planning (a request's prefill on an idle replica).
        """
        if self._run is not None:
            raise RuntimeError("a fast-forward run is already in flight")
        if self._clock is None:
            raise RuntimeError("plan_decode_run needs the engine's clock (Engine(..., clock=...))")
        running = self.running
        B = len(running)
        cfg = self.cfg
        if B == 0 or B > cfg.max_num_batched_tokens:
            return None
        bs = cfg.block_size
        if step_model is not self._affine_model:
            # (T, g) per batch size, memoised: a step-time model is deterministic.
            self._affine_model = step_model
            self._affine_fn = getattr(step_model, "decode_run_affine", None)
            self._affine_memo = {}
        if head is not None:
            if head.preempted or head.requests != running or self._affine_fn is None:
                return None
            # After the head step every request has caught up (computed = its tokens now) and
            # sampled one more token; it must not be a chunk of a prefill.
            if B == 1:
                r = running[0]
                if r.num_computed_tokens + head.num_tokens[0] != r.num_tokens:
                    return None
                c0 = [r.num_tokens]
            else:
                c0 = list(map(_NUM_TOKENS, running))
                if list(map(add, map(_COMPUTED, running), head.num_tokens)) != c0:
                    return None
            sampled = 1
        else:
            # Every request must be decoding: one token to compute, its first token out.
            if B == 1:  # the common case on a lightly loaded replica: no column machinery
                r = running[0]
                if r.num_tokens - r.num_computed_tokens != 1 or r.num_output_tokens <= 0:
                    return None  # a prefill (or recompute): not a steady decode step
                c0 = [r.num_computed_tokens]
            else:
                # The batch's columns, read with C-level iteration (this runs at every arrival to a
                # busy replica, over the whole batch).
                c0 = list(map(_COMPUTED, running))
                diffs = list(map(sub, map(_NUM_TOKENS, running), c0))
                if min(diffs) != 1 or max(diffs) != 1 or min(map(_OUTPUT, running)) <= 0:
                    return None  # a prefill (or recompute) in the batch: not a steady decode step
            sampled = 0
        # k: up to the first completion and max_model_len; first: the step at which each request
        # needs its next new block.
        if B == 1:
            r = running[0]
            c = c0[0]
            k = min(max_steps, r.max_output_tokens - r.num_output_tokens - sampled, cfg.max_model_len - 1 - c)
            nc = [r.num_cached_blocks]
            first = [len(r.blocks) * bs - c + 1]
        else:
            k = min(max_steps, min(map(sub, map(_MAX_OUTPUT, running), map(_OUTPUT, running))) - sampled,
                    cfg.max_model_len - 1 - max(c0))
            nc = list(map(_CACHED, running))
            first = _first_new_block_steps(running, c0, bs)
        if k < min_steps:
            return None
        # Blocks: the largest k whose cumulative allocations fit in the free blocks.
        kv = self.kv
        free0 = kv.pool.free_queue.size
        allocs = _alloc_counter(first, bs)
        if allocs(k) > free0:
            lo, hi = 0, k  # allocs(lo) <= free0 < allocs(hi)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if allocs(mid) <= free0:
                    lo = mid
                else:
                    hi = mid
            k = lo
            if k < min_steps:
                return None
        # The waiting head: must not be admissible now, and must stay so during the run.
        budget_left = cfg.max_num_batched_tokens - B
        if self._waitq and budget_left > 0 and B < cfg.max_num_seqs:
            whead = self._peek_waiting()
            hit_blocks: list[int] = []
            num_hit = 0
            if whead.num_computed_tokens == 0:
                hit_blocks, num_hit = kv.get_computed_blocks(whead)
            n = whead.num_tokens - whead.num_computed_tokens - num_hit
            thr = cfg.long_prefill_token_threshold
            if 0 < thr < n:
                n = thr
            if cfg.enable_chunked_prefill or n <= budget_left:
                n = min(n, budget_left)
                if kv.can_allocate(whead, n, hit_blocks, apply_watermark=True) and (
                        not cfg.scheduler_reserve_full_isl
                        or n == min(whead.num_tokens, cfg.max_model_len) - whead.num_computed_tokens - num_hit
                        or self._full_sequence_fits(whead, num_hit, hit_blocks, True)):
                    return None  # the naive step admits it
                rc = kv.pool.ref_cnt
                watched = {b for b in hit_blocks if rc[b] == 0}
                if watched:
                    # Stop before the step that would pop (evict) one of the head's hit blocks.
                    total = allocs(k)
                    for p, b in enumerate(kv.pool.free_queue.iter_front()):
                        if p >= total:
                            break
                        if b in watched:
                            lo, hi = 0, k  # allocs(lo) <= p < allocs(hi): pop p happens in step hi
                            while hi - lo > 1:
                                mid = (lo + hi) // 2
                                if allocs(mid) <= p:
                                    lo = mid
                                else:
                                    hi = mid
                            k = lo
                            break
                    if k < min_steps:
                        return None
        if self._affine_fn is not None:
            Tg = self._affine_memo.get(B, False)
            if Tg is False:
                Tg = self._affine_memo[B] = self._affine_fn(B)
            if Tg is not None and Tg[0] > 0 and Tg[1] >= 0:
                run = AffineDecodeRun(list(running), c0, first, nc, k, allocs, now, Tg[0], Tg[1])
                if head is not None:
                    run.head = head
                    run.head_dt = head_dt
                self._run = run
                kv.pending_sync = self._sync_bound
                kv.pending_blocks = self._pending_bound
                return run.end_time
        if head is not None:
            return None
        fn = getattr(step_model, "decode_run_times", None)
        monotone = fn is not None and getattr(step_model, "decode_run_monotone", False)
        if fn is None:
            st = step_model.step_time

            def fn(num_seqs: int, dc: int, n: int, out: np.ndarray) -> np.ndarray:
                out[:] = [st(BatchShape(decode_seqs=num_seqs, decode_context=dc + j * num_seqs)) for j in range(n)]
                return out
        run = DecodeRun(list(running), c0, first, nc, k, allocs, fn, now, monotone)
        self._run = run
        self.kv.pending_sync = self.sync
        self.kv.pending_blocks = self._pending_blocks
        return run.extend(now)

    def run_wake(self, now: float) -> float | None:
        """The engine was woken at ``now`` during a run: if only a chunk of the run's steps is
        computed so far, compute the next one and return the new wake-up time; else ``None``
        (the run is over: call :meth:`finish_run`)."""
        run = self._run
        if run is None or run.computed >= run.k:
            return None
        return run.extend(run.end_of(run.computed))

    def truncate_run(self, now: float) -> float:
        """Something arrived at ``now``: the run ends with the step in flight. Returns its end time."""
        run = self._run
        if run.head is not None and now < run.t0:
            run.k = 0  # the head step is in flight: the run ends with it
            return run.end_time
        j = run.completed_steps(now) + 1
        if j < run.k:
            run.k = j
        return run.end_time

    def sync(self) -> None:
        """Bring a run's lazily-applied state up to the clock (see :class:`DecodeRun`)."""
        run = self._run
        if run is None:
            return
        now = self._clock()
        if run.head is not None:
            if now < run.t0:
                return  # the head step is in flight: its blocks are allocated, nothing else happened
            self._apply_head(run)
        s = run.completed_steps(now)
        self._apply_run(run, s, min(s + 1, run.k))

    def finish_run(self, now: float) -> list[EngineRequest]:
        """The run's last step ended at ``now``: apply everything, return the finished requests."""
        run = self._run
        if run is None:  # aborted meanwhile
            return []
        if run.head is not None:
            self._apply_head(run)
        self._apply_run(run, run.k, run.k)
        self._run = None
        self.kv.pending_sync = self.kv.pending_blocks = None
        finished = [r for r in run.reqs if r.num_output_tokens >= r.max_output_tokens]
        if finished:
            self._finish(finished, now)
        return finished

    def _apply_head(self, run: DecodeRun) -> None:
        """Apply the run's head step, at its end (the run's start), as the replica would have."""
        head = run.head
        run.head = None
        if self.update(head, run.t0):
            raise RuntimeError("internal: a fused head step finished a request")  # excluded when planned
        self.busy_s += run.head_dt

    def _apply_run(self, run: DecodeRun, s_req: int, s_pool: int) -> None:
        if s_pool > run.pool_done:
            self._apply_run_blocks(run, run.pool_done, s_pool)
            run.pool_done = s_pool
        if s_req > run.done:
            self._apply_run_steps(run, run.done, s_req)
            run.done = s_req

    def _apply_run_blocks(self, run: DecodeRun, p: int, j: int) -> None:
        """Block allocations and hash registrations of steps p+1..j, in the naive order."""
        bs = self.cfg.block_size
        kv = self.kv
        if run.B == 1:
            # One request: its new blocks in order, no interleaving to reconstruct.
            n = run.allocs(j) - run.allocs(p)
            if n > 0:
                r = run.reqs[0]
                r.blocks.extend(kv.pool.get_new_blocks(n, 0, (), exclusive_count(len(r.blocks), n, r.num_shared_blocks)))
        else:
            self._apply_run_allocs(run, p, j)
        if not self.cfg.enable_prefix_caching:
            return
        # Registrations of blocks that become full (hashes of distinct new content, so their order
        # relative to the evictions above does not matter).
        for r, cr, ncr in zip(run.reqs, run.c0, run.nc):
            a = max(ncr, (cr + p) // bs) if p else ncr
            b = max(ncr, (cr + j) // bs)
            if b > a:
                kv.register_blocks(r, a, b)
                r.num_cached_blocks = b

    def _apply_run_allocs(self, run: DecodeRun, p: int, j: int) -> None:
        """Block allocations of steps p+1..j of a multi-request run, in the naive order."""
        bs = self.cfg.block_size
        kv = self.kv
        # Allocations in (step, running position) order, step-major like the naive schedule loop,
        # each as the integer step * B + position (sorting ints is cheaper than sorting pairs).
        B = run.B
        events: list[int] = []
        for pos, s in enumerate(run.first):  # s: this request's first new block
            if s <= p:
                s += ((p - s) // bs + 1) * bs
            if s <= j:
                events.extend(range(s * B + pos, j * B + pos + 1, bs * B))
        if events:
            if len(events) > 1:
                events.sort()
            reqs = run.reqs
            n = len(events)
            # A decoding request's new blocks are past its prompt, so exclusive (see BlockPool).
            excl = n if all(map(ge, map(len, map(_BLOCKS, reqs)), map(_SHARED, reqs))) else 0
            new = kv.pool.get_new_blocks(n, 0, (), excl)
            for e, b in zip(events, new):
                reqs[e % B].blocks.append(b)

    def _apply_run_steps(self, run: DecodeRun, q: int, s: int) -> None:
        """Token accounting of steps q+1..s: counters, token times, ITL histogram, busy time."""
        d = s - q
        t_last = run.end_of(s)
        on_itl = self._on_itl
        if on_itl is not None:
            lo = max(q, 1)
            if q == 0:
                t0 = run.t0
                for r in run.reqs:
                    if r.last_token_s != t0:
                        break
                else:
                    lo = 0  # all sampled at the run's start: step 1's gaps are like the others
                if lo:
                    # Step 1: each request's gap since its own last token (as update() computes it).
                    t1 = run.end_of(1)
                    _emit_run_lengths(on_itl, [t1 - r.last_token_s for r in run.reqs])
            if s > lo:
                run.emit_itl(on_itl, self._on_itl_many, lo, s)
        for r in run.reqs:
            r.num_computed_tokens += d
            r.num_tokens += d
            r.num_output_tokens += d
            r.last_token_s = t_last
        self._steps += d
        self._tokens_generated += d * run.B
        # GPU-busy time: the steps' durations, as the elapsed time of the run (equal to round-off).
        self.busy_s += t_last - run.end_of(q)


# Column readers for a batch (C-level iteration with map).
_BLOCKS = attrgetter("blocks")
_COMPUTED = attrgetter("num_computed_tokens")
_NUM_TOKENS = attrgetter("num_tokens")
_OUTPUT = attrgetter("num_output_tokens")
_MAX_OUTPUT = attrgetter("max_output_tokens")
_CACHED = attrgetter("num_cached_blocks")
_SHARED = attrgetter("num_shared_blocks")


def _first_new_block_steps(reqs: list[EngineRequest], c0: list[int], bs: int) -> list[int]:
    """Step of a decode run at which each request needs its next new block:
    ``len(blocks) * bs - c + 1`` (its table holds ``len(blocks) * bs`` slots, ``c`` are computed)."""
    return list(map(sub, map(bs.__mul__, map(len, map(_BLOCKS, reqs))), map((1).__rsub__, c0)))


def _emit_run_lengths(on_itl: Callable[[float, int], None], gaps: Sequence[float]) -> None:
    """``on_itl(value, count)`` for each run of equal consecutive gaps: the requests of a batch
    usually share one gap, so the histogram is touched once per step rather than once per request."""
    value = 0.0
    count = 0
    for g in gaps:
        if g == value:
            count += 1
        else:
            if count:
                on_itl(value, count)
            value, count = g, 1
    if count:
        on_itl(value, count)


def _alloc_counter(first: list[int], bs: int) -> Callable[[int], int]:
    """``allocs(j)``: new blocks the run allocates in steps 1..j, given each request's first step."""
    if len(first) == 1:
        f0 = first[0]

        def allocs(j: int) -> int:
            return (j - f0) // bs + 1 if j >= f0 else 0
    elif len(first) > 32:
        f = np.asarray(first, dtype=np.int64)

        def allocs(j: int) -> int:
            x = j - f
            return int(np.sum(x[x >= 0] // bs + 1))
    else:
        def allocs(j: int) -> int:
            return sum((j - s) // bs + 1 for s in first if s <= j)
    return allocs
