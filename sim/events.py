"""SimPy events that call a function when processed, without a process around them.

Why: the simulator's innermost happenings (an engine step ends, a request arrives, an idle replica
wakes) run millions of times; a generator resume per event (SimPy's process) costs more than the
work they do. A :class:`CallbackEvent` is a triggered event scheduled exactly as SimPy would
schedule the equivalent ``env.timeout(delay)`` or ``event.succeed()`` (same time, priority and next
event id), so the order of events is unchanged.
"""

from __future__ import annotations

from heapq import heappop, heappush
from typing import Callable

import simpy
from simpy.core import NORMAL, EmptySchedule, StopSimulation
from simpy.events import Event


class CallbackEvent(Event):
    """A triggered event that calls ``callback(event)`` when SimPy processes it.

    Placed ``delay`` after now (as ``env.timeout(delay)``), or at the absolute time ``at``: a
    fast-forwarded decode run ends at a float computed from the run's start, which
    ``now + (at - now)`` may miss by an ulp. ``priority`` is SimPy's (NORMAL or URGENT).

    ``eid``: an event id taken earlier as ``next(env._eid)`` (SimPy 4 layout only): the event is
    queued exactly where an event scheduled at the moment of that reservation would have been (see
    ``Cluster._run_wakes``, which runs such events directly when nothing sorts before them).
    """

    __slots__ = ()

    # Always triggered successfully with no value: class attributes, not two instance-dict writes
    # per event (``Event`` has no slots). What SimPy reads (``_ok``, ``_value``) is the same.
    _ok = True
    _value = None

    def __init__(self, env: simpy.Environment, callback: Callable[[Event], None], *, delay: float = 0.0,
                 at: float | None = None, priority: int = NORMAL, eid: int | None = None) -> None:
        self.env = env
        self.requeue([callback], env._now + delay if at is None else at, priority, eid, delay)

    def requeue(self, callbacks: list, at: float, priority: int = NORMAL, eid: int | None = None,
                delay: float | None = None) -> None:
        """Queue this event at time ``at`` with ``callbacks`` (again, once SimPy has processed it:
        SimPy reads nothing of a processed event, so re-queuing it is the same as a new one)."""
        self.callbacks = callbacks
        env = self.env
        try:  # SimPy 4: what Environment.schedule does, at an absolute time
            heappush(env._queue, (at, priority, next(env._eid) if eid is None else eid, self))
        except AttributeError:  # pragma: no cover - another SimPy layout: relative delay (exact up to an ulp)
            if eid is not None:
                raise
            env.schedule(self, priority, at - env.now if delay is None else delay)

    def cancel(self) -> None:
        """Processed as a no-op (SimPy cannot take an event out of its queue).

        The callback list is replaced, not cleared: it may be shared (``Replica._arm`` re-queues
        processed events with one list it keeps)."""
        if self.callbacks:
            self.callbacks = []


def can_reserve_eids(env: simpy.Environment) -> bool:
    """Whether ``env`` has SimPy 4's queue layout (``_queue`` heap of ``(time, priority, eid,
    event)`` and the ``_eid`` counter), which reserving event ids and ``CallbackEvent(eid=...)`` need."""
    return isinstance(getattr(env, "_queue", None), list) and hasattr(getattr(env, "_eid", None), "__next__")



class Environment(simpy.Environment):
    """``simpy.Environment`` whose ``run(until=event)`` processes events in one loop instead of a
    ``step()`` call per event: the loop body is ``Environment.step``'s (SimPy 4.1), so events are
    processed in the same order with the same semantics (clock, callbacks, failed events crashing
    the run, ``StopSimulation`` re-queuing the rest of its event's callbacks). ``run()`` with no
    or a numeric ``until``, and ``step()``, are SimPy's own.

    Why: the simulator processes ~3 events per request; the call saves ~40 ns of each.
    """

    def run(self, until=None):
        if not isinstance(until, Event):
            return super().run(until)
        if until.callbacks is None:  # already processed
            return until.value
        until.callbacks.append(StopSimulation.callback)
        queue = self._queue
        try:
            while True:
                try:
                    self._now, _, _, event = heappop(queue)
                except IndexError:
                    raise EmptySchedule from None
                callbacks, event.callbacks = event.callbacks, None
                try:
                    for callback in callbacks:
                        callback(event)
                except StopSimulation:
                    event.callbacks = callbacks[callbacks.index(callback) + 1:]
                    self.schedule(event, -1)  # EventPriority(-1), as Environment.step
                    raise
                if not event._ok and not hasattr(event, "_defused"):
                    exc = type(event._value)(*event._value.args)
                    exc.__cause__ = event._value
                    raise exc
        except StopSimulation as exc:
            return exc.args[0]  # == until.value
        except EmptySchedule:
            assert not until.triggered
            raise RuntimeError(f'No scheduled events left but "until" event was not triggered: {until}') from None
