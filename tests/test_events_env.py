"""sim.events: the run loop of ``sim.events.Environment`` and re-queued step-end events.

``Environment.run(until=event)`` must process events exactly as ``simpy.Environment`` does (same
order, same clock, same semantics for processes, interrupts, failures and ``StopSimulation``), and
``CallbackEvent`` must queue exactly where ``env.timeout`` / ``event.succeed()`` would.
"""

from __future__ import annotations

import heapq
import random

import pytest
import simpy
from simpy.core import NORMAL, URGENT

from sim.events import CallbackEvent, Environment


def _scenario(env: simpy.Environment, seed: int) -> tuple[list, simpy.Event]:
    """A mix of generic SimPy machinery and CallbackEvents; returns (log, until event)."""
    rng = random.Random(seed)
    log: list = []
    done = env.event()

    def worker(name: int):
        try:
            for _ in range(rng.randint(1, 6)):
                yield env.timeout(rng.choice([0.0, 0.5, 1.0, rng.random()]))
                log.append(("w", name, env.now))
                if rng.random() < 0.2:
                    ev = env.event()
                    CallbackEvent(env, lambda e, ev=ev: ev.succeed(name), delay=rng.random())
                    v = yield ev
                    log.append(("got", name, v, env.now))
        except simpy.Interrupt as i:
            log.append(("int", name, i.cause, env.now))

    def chain(k: int):
        def cb(e):
            log.append(("cb", k, env.now))
            if k < 30:
                at = env.now + rng.choice([0.0, 0.25, 1.0])
                CallbackEvent(env, chain(k + 1), at=at, priority=rng.choice([NORMAL, URGENT]))
            else:
                done.succeed("finished")
        return cb

    procs = [env.process(worker(i)) for i in range(8)]

    def interrupter():
        yield env.timeout(0.75)
        for p in procs[:3]:
            if p.is_alive:
                p.interrupt("stop")
        c = CallbackEvent(env, lambda e: log.append(("never",)), delay=0.1)
        c.cancel()
        yield env.all_of([env.timeout(0.3), env.timeout(0.2)])
        log.append(("all_of", env.now))

    env.process(interrupter())
    CallbackEvent(env, chain(0), priority=URGENT)
    return log, done


@pytest.mark.parametrize("seed", range(20))
def test_run_loop_same_as_simpy(seed):
    a, b = simpy.Environment(), Environment()
    log_a, done_a = _scenario(a, seed)
    log_b, done_b = _scenario(b, seed)
    assert a.run(until=done_a) == b.run(until=done_b) == "finished"
    assert log_a == log_b
    assert a.now == b.now
    assert [(t, p, i) for t, p, i, _ in sorted(a._queue)] == [(t, p, i) for t, p, i, _ in sorted(b._queue)]
    # Both go on the same way after the stop (the rest of the run).
    a.run()
    b.run()
    assert log_a == log_b and a.now == b.now


def test_failed_event_crashes_the_run():
    env = Environment()
    done = env.event()

    def p():
        yield env.timeout(1)
        raise ValueError("boom")

    env.process(p())
    with pytest.raises(ValueError, match="boom"):
        env.run(until=done)


def test_defused_failure_and_interrupt_handled():
    env = Environment()
    done = env.event()
    seen = []

    def victim():
        try:
            yield env.timeout(10)
        except simpy.Interrupt as i:
            seen.append((i.cause, env.now))
        done.succeed(7)

    v = env.process(victim())

    def killer():
        yield env.timeout(2)
        v.interrupt("fail")

    env.process(killer())
    assert env.run(until=done) == 7
    assert seen == [("fail", 2)]


def test_until_without_events_raises():
    env = Environment()
    with pytest.raises(RuntimeError, match="No scheduled events left"):
        env.run(until=env.event())


def test_until_already_processed_and_numeric_until():
    env = Environment()
    ev = env.timeout(1, value="v")
    env.run(until=ev)
    assert env.run(until=ev) == "v"
    env.run(until=5)
    assert env.now == 5


def test_callback_event_keys_match_simpy():
    """CallbackEvent(delay=d) is queued with the key env.timeout(d) gets; at= and eid= as documented."""
    env = simpy.Environment()
    env.timeout(1.5)
    CallbackEvent(env, lambda e: None, delay=1.5)
    CallbackEvent(env, lambda e: None, at=0.25, priority=URGENT)
    eid = next(env._eid)
    CallbackEvent(env, lambda e: None, eid=eid)
    keys = sorted((t, p, i) for t, p, i, _ in env._queue)
    assert keys == [(0.0, NORMAL, 3), (0.25, URGENT, 2), (1.5, NORMAL, 0), (1.5, NORMAL, 1)]
    ev = env._queue[0][3]
    assert ev.triggered and ev.ok and ev.value is None and not ev.processed


def test_requeued_step_end_event():
    """A processed CallbackEvent queued again (what Replica._arm does) fires again; a cancelled
    one whose callback list is shared does not clear that list."""
    env = Environment()
    fired = []
    cbs = []

    def cb(e):
        fired.append(env.now)
        if len(fired) < 3:
            e.callbacks = cbs
            heapq.heappush(env._queue, (env.now + 1.0, URGENT, next(env._eid), e))
    cbs.append(cb)
    ev = CallbackEvent(env, cb, delay=1.0)
    env.run(until=10)
    assert fired == [1.0, 2.0, 3.0]
    ev2 = CallbackEvent(env, cb, delay=1.0)
    ev2.callbacks = cbs
    ev2.cancel()
    assert cbs == [cb] and ev2.callbacks == []
    env.run(until=20)
    assert fired == [1.0, 2.0, 3.0]
    assert ev.processed
