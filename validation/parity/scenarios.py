"""Built-in parity scenarios: each one aims at one piece of vLLM V1 scheduling semantics.

Every builder returns a fresh :class:`ParityScenario`; the registry :data:`SCENARIOS` maps names
to builders. Token ids come from seeded numpy generators, so every run feeds identical prompts.
The comments say which behaviour a scenario forces and why its numbers force it (block size 16).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from validation.parity.spec import EngineKnobs, ParityRequest, ParityScenario


def tokens(tag: int, n: int) -> list[int]:
    """``n`` pseudo-random prompt token ids; the same ``tag`` always gives the same ids."""
    rng = np.random.default_rng([0x5EED, tag])
    return rng.integers(3, 32000, size=n).tolist()


def _req(rid: str, step: int, toks: list[int], max_tokens: int, priority: int = 0) -> ParityRequest:
    return ParityRequest(id=rid, arrival_step=step, prompt_token_ids=toks, max_tokens=max_tokens,
                         priority=priority)


def chunked_prefill_decode_first() -> ParityScenario:
    """Decodes first, then chunked prefills fill the rest of a 64-token budget.

    r0's 150-token prompt takes 64+64+22 tokens; later arrivals are chunked behind running decodes;
    edge cases: a 1-token output (finishes on its prefill step), a prompt of exactly one block, a
    1-token prompt.
    """
    eng = EngineKnobs(num_gpu_blocks=256, max_num_batched_tokens=64, max_num_seqs=8, max_model_len=1024)
    reqs = [_req("r0", 0, tokens(1, 150), 6), _req("r1", 0, tokens(2, 40), 9),
            _req("r2", 2, tokens(3, 100), 5), _req("r3", 3, tokens(4, 7), 1),
            _req("r4", 4, tokens(5, 16), 4), _req("r5", 5, tokens(6, 1), 3),
            _req("r6", 5, tokens(7, 90), 2)]
    return ParityScenario(name="chunked_prefill_decode_first", engine=eng, requests=reqs)


def max_num_seqs_limit() -> ParityScenario:
    """At most 3 running requests: the rest wait although budget and KV would allow them."""
    eng = EngineKnobs(num_gpu_blocks=256, max_num_batched_tokens=128, max_num_seqs=3, max_model_len=512)
    reqs = [_req(f"r{i}", 0, tokens(10 + i, 20), 4 + i) for i in range(7)]
    reqs += [_req("late0", 5, tokens(30, 20), 3), _req("late1", 5, tokens(31, 50), 2)]
    return ParityScenario(name="max_num_seqs_limit", engine=eng, requests=reqs)


def prefix_cache_hits() -> ParityScenario:
    """Shared prompts: hits on running requests' blocks and on freed (cached, free) blocks.

    - a and b: the same 64-token prompt in one step. a's 4 full blocks are registered when it is
      scheduled, so b (admitted right after it) hits 3 blocks: 48 tokens, not 64, because a hit is
      capped at num_tokens - 1 = 63 tokens.
    - c: a's first 40 tokens + its own 30: hits 2 blocks (32 tokens).
    - d (after a and b finished): a's prompt + 20 tokens: hits all 4 blocks, which are now free
      cached blocks, so they count against free capacity at admission.
    - e: a's first 32 tokens + 1: cap num_tokens - 1 = 32 -> hits exactly 2 blocks.
    - f: a 17-token prompt shorter than anything cached but sharing a's first block: 1 block hit.
    """
    eng = EngineKnobs(num_gpu_blocks=64, max_num_batched_tokens=128, max_num_seqs=8, max_model_len=512)
    p = tokens(100, 64)
    reqs = [_req("a", 0, p, 3), _req("b", 0, list(p), 2),
            _req("c", 1, p[:40] + tokens(101, 30), 4),
            _req("d", 10, p + tokens(102, 20), 3), _req("e", 10, p[:32] + tokens(103, 1), 2),
            _req("f", 12, p[:16] + tokens(104, 1), 2)]
    return ParityScenario(name="prefix_cache_hits", engine=eng, requests=reqs)


def prefix_cache_lru_eviction() -> ParityScenario:
    """11 usable blocks: freed cached blocks are evicted LRU (tail of each chain first).

    x, y, z have distinct 48/48/64-token prompts, one after another, so later ones evict earlier
    ones' cached blocks; x and y come back and hit whatever survived.
    """
    eng = EngineKnobs(num_gpu_blocks=12, max_num_batched_tokens=128, max_num_seqs=4, max_model_len=256)
    x, y, z = tokens(200, 48), tokens(201, 48), tokens(202, 64)
    reqs = [_req("x", 0, x, 2), _req("y", 3, y, 2), _req("z", 6, z, 3),
            _req("x2", 10, x + tokens(203, 5), 2), _req("y2", 13, y + tokens(204, 5), 2),
            _req("z2", 16, list(z), 2)]
    return ParityScenario(name="prefix_cache_lru_eviction", engine=eng, requests=reqs)


def _preemption_requests() -> list[ParityRequest]:
    # 4 x (24-token prompt, 40 outputs): 2 blocks each at admission (8 of 9), 4 blocks each at the
    # end -> decodes run out of blocks and the most recently admitted request is preempted.
    return [_req(f"r{i}", 0, tokens(300 + i, 24), 40) for i in range(4)] + \
        [_req("r4", 6, tokens(304, 10), 12)]


def preemption_fcfs() -> ParityScenario:
    """Tiny KV (9 usable blocks): FCFS preempts running.pop(), recompute, front of the queue.

    Prefix caching on: a preempted request's freed blocks stay cached, so on re-admission it hits
    its own prompt and output blocks if they were not evicted meanwhile.
    """
    eng = EngineKnobs(num_gpu_blocks=10, max_num_batched_tokens=256, max_num_seqs=8, max_model_len=256)
    return ParityScenario(name="preemption_fcfs", engine=eng, requests=_preemption_requests())


def preemption_fcfs_no_prefix_cache() -> ParityScenario:
    """As :func:`preemption_fcfs` without prefix caching: every re-admission recomputes fully."""
    eng = EngineKnobs(num_gpu_blocks=10, max_num_batched_tokens=256, max_num_seqs=8, max_model_len=256,
                      enable_prefix_caching=False)
    return ParityScenario(name="preemption_fcfs_no_prefix_cache", engine=eng,
                          requests=_preemption_requests())


def priority_policy() -> ParityScenario:
    """``policy=priority``: waiting queue ordered by (priority, arrival); victim = max of those.

    low (priority 5) is admitted first, so it sits before the important requests in the running
    list; when an important request needs a block, the victim is low, which was already scheduled
    this step, and vLLM undoes that (budget returned, entry removed).
    """
    eng = EngineKnobs(num_gpu_blocks=10, max_num_batched_tokens=256, max_num_seqs=8, max_model_len=256,
                      policy="priority")
    reqs = [_req("low", 0, tokens(400, 30), 40, priority=5),
            _req("mid", 1, tokens(401, 30), 40, priority=2),
            _req("hi", 1, tokens(402, 30), 40, priority=0),
            _req("mid2", 2, tokens(403, 20), 20, priority=2),
            _req("hi2", 8, tokens(404, 12), 10, priority=0)]
    return ParityScenario(name="priority_policy", engine=eng, requests=reqs)


def chunked_prefill_off() -> ParityScenario:
    """No chunking: a prompt larger than the remaining budget stops admission (head of line)."""
    eng = EngineKnobs(num_gpu_blocks=64, max_num_batched_tokens=128, max_num_seqs=8, max_model_len=128,
                      enable_chunked_prefill=False)
    reqs = [_req("p100", 0, tokens(500, 100), 10), _req("p60", 0, tokens(501, 60), 20),
            _req("p30", 0, tokens(502, 30), 20), _req("p90", 3, tokens(503, 90), 6),
            _req("p5", 4, tokens(504, 5), 30)]
    return ParityScenario(name="chunked_prefill_off", engine=eng, requests=reqs)


def long_prefill_threshold_shared() -> ParityScenario:
    """``long_prefill_token_threshold=24`` with always >= 2 requests present: chunks capped at 24."""
    eng = EngineKnobs(num_gpu_blocks=128, max_num_batched_tokens=128, max_num_seqs=8, max_model_len=256,
                      long_prefill_token_threshold=24)
    reqs = [_req("a", 0, tokens(600, 60), 20), _req("b", 0, tokens(601, 50), 20),
            _req("c", 0, tokens(602, 40), 20), _req("d", 3, tokens(603, 30), 8)]
    return ParityScenario(name="long_prefill_threshold_shared", engine=eng, requests=reqs)


def long_prefill_threshold_alone() -> ParityScenario:
    """One request alone: vLLM lifts the threshold (nobody to starve), fleetsim still applies it.

    The known deviation listed in docs/architecture.md.
    """
    eng = EngineKnobs(num_gpu_blocks=128, max_num_batched_tokens=128, max_num_seqs=8, max_model_len=256,
                      long_prefill_token_threshold=24)
    return ParityScenario(name="long_prefill_threshold_alone", engine=eng,
                          requests=[_req("solo", 0, tokens(610, 100), 3)])


def watermark() -> ParityScenario:
    """``watermark=0.2`` (4 of 20 blocks kept free when admitting while others run)."""
    eng = EngineKnobs(num_gpu_blocks=20, max_num_batched_tokens=128, max_num_seqs=8, max_model_len=256,
                      watermark=0.2)
    reqs = [_req("a", 0, tokens(700, 60), 20), _req("b", 1, tokens(701, 60), 20),
            _req("c", 2, tokens(702, 40), 10), _req("d", 3, tokens(703, 10), 5)]
    return ParityScenario(name="watermark", engine=eng, requests=reqs)


def _admission_requests() -> list[ParityRequest]:
    # a (64 tokens, chunked 32+32) holds 4-5 of 11 blocks; b's 100-token prompt needs 7 blocks in
    # total but its first 31-token chunk only 2.
    return [_req("a", 0, tokens(800, 64), 30), _req("b", 1, tokens(801, 100), 5),
            _req("c", 1, tokens(802, 20), 5)]


def admission_full_prompt() -> ParityScenario:
    """vLLM's default ``scheduler_reserve_full_isl``: a WAITING request is admitted only if its whole
    prompt fits in free blocks, not just its first chunk (fleetsim checks the chunk only)."""
    eng = EngineKnobs(num_gpu_blocks=12, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=256)
    return ParityScenario(name="admission_full_prompt", engine=eng, requests=_admission_requests())


def admission_first_chunk() -> ParityScenario:
    """The same stream with vLLM's ``scheduler_reserve_full_isl=False`` (what fleetsim models)."""
    eng = EngineKnobs(num_gpu_blocks=12, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=256,
                      scheduler_reserve_full_isl=False)
    return ParityScenario(name="admission_first_chunk", engine=eng, requests=_admission_requests())


def random_requests(seed: int, n: int = 50, *, priorities: bool = False) -> list[ParityRequest]:
    """A mixed stream: 4 shared prefixes (some prompts reuse one), random tails, bursty arrivals."""
    rng = np.random.default_rng(seed)
    prefixes = [tokens(seed * 1000 + k, int(rng.integers(16, 120))) for k in range(4)]
    reqs = []
    step = 0
    for i in range(n):
        step += int(rng.choice([0, 0, 1, 2, 5]))
        body = tokens(seed * 1000 + 100 + i, int(rng.integers(1, 200)))
        if rng.random() < 0.5:
            pre = prefixes[int(rng.integers(len(prefixes)))]
            body = pre[: int(rng.integers(1, len(pre) + 1))] + body
        reqs.append(_req(f"q{i}", step, body[:300], int(rng.integers(1, 40)),
                         priority=int(rng.integers(0, 4)) if priorities else 0))
    return reqs


def _random(name: str, num_gpu_blocks: int, *, policy: str = "fcfs", full_isl: bool | None = None,
            **knobs) -> ParityScenario:
    base = dict(num_gpu_blocks=num_gpu_blocks, max_num_batched_tokens=128, max_num_seqs=16,
                max_model_len=512, policy=policy, scheduler_reserve_full_isl=full_isl)
    eng = EngineKnobs(**{**base, **knobs})
    return ParityScenario(name=name, engine=eng,
                          requests=random_requests(42, priorities=policy == "priority"))


def random_roomy() -> ParityScenario:
    """50 seeded requests, KV large enough that nothing is ever preempted (2048 blocks)."""
    return _random("random_roomy", 2048)


def random_tight() -> ParityScenario:
    """The same 50 requests with 48 blocks: preemptions and evictions, vLLM defaults."""
    return _random("random_tight", 48)


def random_tight_first_chunk() -> ParityScenario:
    """:func:`random_tight` with vLLM's ``scheduler_reserve_full_isl=False``."""
    return _random("random_tight_first_chunk", 48, full_isl=False)


def random_priority_first_chunk() -> ParityScenario:
    """Priority policy, tight KV, random priorities, ``scheduler_reserve_full_isl=False``."""
    return _random("random_priority_first_chunk", 48, policy="priority", full_isl=False)


def random_priority() -> ParityScenario:
    """Priority policy, tight KV, random priorities, vLLM defaults."""
    return _random("random_priority", 48, policy="priority")


def random_chunking_off() -> ParityScenario:
    """Chunked prefill off, tight KV, vLLM defaults (a whole prompt per admission, so the
    full-prompt admission gate and the chunk check coincide)."""
    return _random("random_chunking_off", 48, enable_chunked_prefill=False,
                   max_num_batched_tokens=512)


def random_watermark_first_chunk() -> ParityScenario:
    """Tight KV with ``watermark=0.1`` and ``scheduler_reserve_full_isl=False``."""
    return _random("random_watermark_first_chunk", 48, full_isl=False, watermark=0.1)


SCENARIOS: dict[str, Callable[[], ParityScenario]] = {
    f.__name__: f for f in (
        chunked_prefill_decode_first, max_num_seqs_limit, prefix_cache_hits,
        prefix_cache_lru_eviction, preemption_fcfs, preemption_fcfs_no_prefix_cache,
        priority_policy, chunked_prefill_off, long_prefill_threshold_shared,
        long_prefill_threshold_alone, watermark, admission_full_prompt, admission_first_chunk,
        random_roomy, random_tight, random_tight_first_chunk, random_priority,
        random_priority_first_chunk, random_chunking_off, random_watermark_first_chunk,
    )
}
