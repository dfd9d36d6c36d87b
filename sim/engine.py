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

Deviations from vLLM are listed in docs/architecture.md.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

from sim.kv_cache import KVCacheManager
from sim.step_time import BatchShape
from traces.schema import _mix

WAITING, RUNNING, FINISHED = 0, 1, 2


class EngineRequest:
    """Per-request engine state. One object per request, never one per token."""

    __slots__ = (
        "idx", "arrival_s", "prompt_tokens", "max_output_tokens", "priority",
        "num_tokens", "num_computed_tokens", "num_output_tokens", "status",
        "blocks", "block_hashes", "num_cached_blocks", "hash_key",
        "enqueue_s", "first_scheduled_s", "first_token_s", "last_token_s", "finish_s",
        "num_preemptions", "cached_tokens", "seq",
    )

    def __init__(self, idx: int, arrival_s: float, prompt_tokens: int, max_output_tokens: int,
                 block_hashes: Sequence[int] = (), priority: int = 0):
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
        self.block_hashes = list(block_hashes)
        self.num_cached_blocks = 0
        self.hash_key = _mix(0xC0FFEE, idx)
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
        cached and LRU-evicted like prompt blocks; their content is unique to this request.
        """
        h = self.block_hashes
        parent = h[-1] if h else 0x5F3759DF
        key = self.hash_key
        for i in range(len(h), n):
            parent = _mix(parent, _mix(key, i))
            h.append(parent)


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


@dataclass(slots=True)
class StepPlan:
    """The output of one ``schedule()`` call."""

    requests: list[EngineRequest] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)
    shape: BatchShape = field(default_factory=BatchShape)
    preempted: list[EngineRequest] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.requests


class Engine:
    """Scheduler + KV cache manager of one replica."""

    def __init__(self, cfg: EngineConfig, on_itl: Callable[[float, int], None] | None = None):
        self.cfg = cfg
        self.kv = KVCacheManager(cfg.num_gpu_blocks, cfg.block_size, cfg.enable_prefix_caching, cfg.watermark)
        self.running: list[EngineRequest] = []
        self._priority = cfg.scheduling_policy == "priority"
        self._waiting_fifo: deque[EngineRequest] = deque()
        self._waiting_heap: list[tuple[int, float, int, EngineRequest]] = []
        self._seq = 0
        self.num_preemptions = 0
        self.steps = 0
        self.tokens_generated = 0
        self.prompt_tokens_computed = 0
        self._on_itl = on_itl  # callback(itl_seconds, count) for the ITL histogram

    # -- queue -----------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self._waiting_heap) if self._priority else len(self._waiting_fifo)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

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
        cfg = self.cfg
        kv = self.kv
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
            n = req.num_tokens - req.num_computed_tokens
            if 0 < thr < n:
                n = thr
            n = min(n, budget, cfg.max_model_len - 1 - req.num_computed_tokens)
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
        if not preempted:
            while budget > 0 and self.num_waiting and len(running) < cfg.max_num_seqs:
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
        for req, n in zip(reqs, ntoks):
            c = req.num_computed_tokens
            if n == 1 and req.num_output_tokens > 0 and c == req.num_tokens - 1:
                shape.decode_seqs += 1
                shape.decode_context += c + 1
            else:
                shape.prefill_seqs += 1
                shape.prefill_tokens += n
                shape.prefill_attn += n * (c + n)
        return plan

    def _pick_victim(self) -> tuple[EngineRequest, int]:
        """FCFS: the most recently admitted request. Priority: largest (priority, arrival)."""
        running = self.running
        if self._priority:
            vidx = max(range(len(running)), key=lambda k: (running[k].priority, running[k].arrival_s))
            return running.pop(vidx), vidx
        return running.pop(), len(running)

    def _preempt(self, req: EngineRequest) -> None:
        """Preemption by recompute: drop all KV, restart from zero, front of the queue."""
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = WAITING
        self.num_preemptions += 1
        self._push_waiting(req, front=True)

    # -- applying a finished step ----------------------------------------------------------
    def update(self, plan: StepPlan, now: float) -> list[EngineRequest]:
        """Advance every scheduled request by its tokens; return the requests that finished."""
        self.steps += 1
        finished: list[EngineRequest] = []
        itl_count = 0
        itl_value = 0.0
        on_itl = self._on_itl
        for req, n in zip(plan.requests, plan.num_tokens):
            if req.num_computed_tokens < req.prompt_tokens:
                self.prompt_tokens_computed += min(n, req.prompt_tokens - req.num_computed_tokens)
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.num_tokens:
                continue  # a chunk of a (re)computed prefill: no token sampled yet
            # Caught up: the step samples one new token for this request.
            req.num_output_tokens += 1
            req.num_tokens += 1
            self.tokens_generated += 1
            if req.first_token_s < 0:
                req.first_token_s = now
            elif on_itl is not None:
                gap = now - req.last_token_s
                if gap == itl_value:
                    itl_count += 1
                else:
                    if itl_count:
                        on_itl(itl_value, itl_count)
                    itl_value, itl_count = gap, 1
            req.last_token_s = now
            if req.num_output_tokens >= req.max_output_tokens:
                finished.append(req)
        if itl_count:
            on_itl(itl_value, itl_count)
        if finished:
            done = set(id(r) for r in finished)
            self.running = [r for r in self.running if id(r) not in done]
            for req in finished:
                req.status = FINISHED
                req.finish_s = now
                self.kv.free(req)
        return finished

    def abort_all(self) -> list[EngineRequest]:
        """Drop every request (replica failure): free their blocks and return them."""
        out = list(self.running) + self.waiting_requests()
        for req in self.running:
            self.kv.free(req)
        self.running = []
        self._waiting_fifo.clear()
        self._waiting_heap.clear()
        return out
