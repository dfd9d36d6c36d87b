"""The V1 scheduler: token budget, decode-first, chunked prefill, preemption by recompute."""

from hypothesis import given, settings
from hypothesis import strategies as st

from sim.engine import Engine, EngineConfig, EngineRequest
from traces.schema import engine_block_hashes


def _req(idx, prompt, out, hash_ids=None, priority=0, arrival=0.0):
    h = engine_block_hashes(prompt, 16, hash_ids=hash_ids, hash_block_size=16, unique_key=idx)
    return EngineRequest(idx, arrival, prompt, out, h, priority)


def _drain(engine, t=0.0, dt=0.01, max_steps=100_000, check=None):
    done = []
    steps = 0
    while engine.has_work():
        plan = engine.schedule(t)
        # An empty step is legal only right after a self-preemption (vLLM does the same).
        assert not plan.empty or plan.preempted, "engine stalled"
        if check:
            check(engine, plan)
        t += dt
        done += engine.update(plan, t)
        steps += 1
        assert steps < max_steps
    return done, t


def test_single_request_prefill_then_decodes():
    e = Engine(EngineConfig(num_gpu_blocks=100, max_num_batched_tokens=2048))
    r = _req(0, 100, 5)
    e.add_request(r, 0.0)
    p = e.schedule(0.0)
    assert p.num_tokens == [100] and p.shape.prefill_tokens == 100 and p.shape.decode_seqs == 0
    e.update(p, 1.0)
    assert r.first_token_s == 1.0 and r.num_output_tokens == 1
    for k in range(4):
        p = e.schedule(1.0 + k)
        assert p.num_tokens == [1] and p.shape.decode_seqs == 1 and p.shape.decode_context == 101 + k
        e.update(p, 2.0 + k)
    assert r.finish_s == 5.0 and not e.has_work()
    assert e.kv.num_free_blocks == 99


def test_chunked_prefill_splits_long_prompt_by_budget():
    e = Engine(EngineConfig(num_gpu_blocks=200, max_num_batched_tokens=256))
    r = _req(0, 600, 2)
    e.add_request(r, 0.0)
    chunks = []
    while r.num_output_tokens == 0:
        p = e.schedule()
        chunks.append(p.num_tokens[0])
        e.update(p, 0.0)
    assert chunks == [256, 256, 88]


def test_no_chunking_waits_for_budget():
    e = Engine(EngineConfig(num_gpu_blocks=200, max_num_batched_tokens=256, enable_chunked_prefill=False))
    e.add_request(_req(0, 200, 3), 0.0)
    e.add_request(_req(1, 100, 3), 0.0)
    p = e.schedule()
    assert p.num_tokens == [200]  # the second prompt does not fit the remaining 56 tokens


def test_decode_first_then_new_prefill_fills_budget():
    e = Engine(EngineConfig(num_gpu_blocks=200, max_num_batched_tokens=64))
    a = _req(0, 32, 10)
    e.add_request(a, 0.0)
    e.update(e.schedule(), 0.1)
    e.add_request(_req(1, 500, 3), 0.1)
    p = e.schedule()
    assert [r.idx for r in p.requests] == [0, 1]
    assert p.num_tokens == [1, 63]


def test_max_num_seqs_limits_admission():
    e = Engine(EngineConfig(num_gpu_blocks=500, max_num_batched_tokens=4096, max_num_seqs=3))
    for i in range(5):
        e.add_request(_req(i, 20, 5), 0.0)
    p = e.schedule()
    assert len(p.requests) == 3 and e.num_waiting == 2


def test_preemption_fcfs_evicts_last_admitted_and_requeues_at_front():
    # 1 null + 8 usable blocks; two requests of 64 prompt tokens (4 blocks each) fill the pool.
    e = Engine(EngineConfig(num_gpu_blocks=9, max_num_batched_tokens=4096))
    a, b, c = _req(0, 64, 20), _req(1, 64, 20), _req(2, 16, 2)
    for r in (a, b, c):
        e.add_request(r, 0.0)
    p = e.schedule()
    assert [r.idx for r in p.requests] == [0, 1]  # c waits: no blocks
    e.update(p, 0.1)
    # Next step both need a 5th block: b (last admitted) is preempted so a can continue.
    p = e.schedule()
    assert [r.idx for r in p.preempted] == [1]
    assert [r.idx for r in p.requests] == [0]
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert e.waiting_requests()[0] is b  # front of the queue, ahead of c
    done, _ = _drain(e, 0.2)
    assert {r.idx for r in done} == {0, 1, 2}
    assert b.num_output_tokens == 20 and b.first_token_s > 0


def test_no_admission_in_a_step_with_preemption():
    e = Engine(EngineConfig(num_gpu_blocks=9, max_num_batched_tokens=4096))
    e.add_request(_req(0, 64, 20), 0.0)
    e.add_request(_req(1, 64, 20), 0.0)
    e.update(e.schedule(), 0.1)
    e.add_request(_req(2, 1, 2), 0.1)
    p = e.schedule()
    assert p.preempted and all(r.idx != 2 for r in p.requests)


def test_priority_policy_preempts_lowest_priority():
    e = Engine(EngineConfig(num_gpu_blocks=9, max_num_batched_tokens=4096, scheduling_policy="priority"))
    lo = _req(0, 64, 20, priority=5, arrival=0.0)
    hi = _req(1, 64, 20, priority=0, arrival=1.0)
    e.add_request(lo, 0.0)
    e.add_request(hi, 0.0)
    p = e.schedule()
    assert [r.idx for r in p.requests] == [1, 0]  # priority queue admits hi first
    e.update(p, 0.1)
    p = e.schedule()
    assert [r.idx for r in p.preempted] == [0]


def test_prefix_hits_on_repeated_prompt():
    e = Engine(EngineConfig(num_gpu_blocks=200, max_num_batched_tokens=4096))
    a = _req(0, 160, 2, hash_ids=list(range(10)))
    e.add_request(a, 0.0)
    _drain(e)
    b = _req(1, 160, 2, hash_ids=list(range(10)))
    e.add_request(b, 1.0)
    p = e.schedule()
    assert b.cached_tokens == 144 and p.num_tokens == [16]
    assert e.kv.prefix_hits == 144 and e.kv.prefix_queries == 320


@settings(max_examples=40, deadline=None)
@given(
    reqs=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 30), st.integers(0, 4)), min_size=1, max_size=25),
    budget=st.integers(16, 512),
    blocks=st.integers(25, 80),
    max_seqs=st.integers(1, 16),
    policy=st.sampled_from(["fcfs", "priority"]),
    caching=st.booleans(),
)
def test_property_budget_blocks_and_completion(reqs, budget, blocks, max_seqs, policy, caching):
    """Any workload that fits the pool completes; budgets, seq limits and blocks are never exceeded."""
    cfg = EngineConfig(num_gpu_blocks=blocks, max_num_batched_tokens=budget, max_num_seqs=max_seqs,
                       scheduling_policy=policy, enable_prefix_caching=caching,
                       max_model_len=(blocks - 1) * 16)
    e = Engine(cfg)
    objs = []
    for i, (prompt, out, fam) in enumerate(reqs):
        if prompt + out > cfg.max_model_len:
            continue
        r = _req(i, prompt, out, hash_ids=[fam * 1000 + j for j in range(prompt // 16 + 1)], priority=fam)
        objs.append(r)
        e.add_request(r, 0.0)

    def check(engine, plan):
        assert sum(plan.num_tokens) <= budget
        assert len(engine.running) <= max_seqs
        assert all(n > 0 for n in plan.num_tokens)
        engine.kv.pool.check_invariants()
        for r, n in zip(plan.requests, plan.num_tokens):
            assert len(r.blocks) * 16 >= r.num_computed_tokens + n

    done, _ = _drain(e, check=check)
    assert len(done) == len(objs)
    assert all(r.num_output_tokens == r.max_output_tokens for r in objs)
    assert e.kv.num_free_blocks == blocks - 1


def test_full_sequence_admission_gate_waits_for_room_for_the_whole_prompt():
    """vLLM's scheduler_reserve_full_isl: a waiting request whose first chunk fits but whose whole
    prompt does not is not admitted (default on); with the gate off the chunk alone decides."""
    admitted = {}
    for gate in (True, False):
        cfg = EngineConfig(num_gpu_blocks=12, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=256,
                           scheduler_reserve_full_isl=gate)
        e = Engine(cfg)
        e.add_request(_req(0, 64, 30), 0.0)  # 4 blocks, decodes for a while
        plan = e.schedule(0.0)
        e.update(plan, 0.01)
        e.update(e.schedule(0.01), 0.02)  # request 0 is now decoding: 4-5 blocks held
        e.add_request(_req(1, 160, 5), 0.02)  # needs 10 blocks in all, its first chunk 2
        plan = e.schedule(0.02)
        admitted[gate] = any(r.idx == 1 for r in plan.requests)
    assert admitted == {True: False, False: True}


def test_full_sequence_gate_admits_once_the_prompt_fits():
    cfg = EngineConfig(num_gpu_blocks=12, max_num_batched_tokens=32, max_num_seqs=4, max_model_len=256)
    assert cfg.scheduler_reserve_full_isl  # vLLM 0.32's default
    e = Engine(cfg)
    e.add_request(_req(0, 64, 3), 0.0)
    e.add_request(_req(1, 160, 2), 0.0)
    done, _ = _drain(e)
    assert sorted(r.idx for r in done) == [0, 1]
    # Request 1 is only admitted after request 0 finished and freed its blocks.
    assert done[0].idx == 0 and done[1].first_scheduled_s >= done[0].finish_s
