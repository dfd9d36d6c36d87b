"""SimPy events that call a function when processed, without a process around them.

Why: the simulator's innermost happenings (an engine step ends, a request arrives, an idle replica
wakes) run millions of times; a generator resume per event (SimPy's process) costs more than the
work they do. A :class:`CallbackEvent` is a triggered event scheduled exactly as SimPy would
schedule the equivalent ``env.timeout(delay)`` or ``event.succeed()`` (same time, priority and next
event id), so the order of events is unchanged.
"""

from __future__ import annotations

from heapq import heappush
from typing import Callable

import simpy
from simpy.core import NORMAL
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

    def __init__(self, env: simpy.Environment, callback: Callable[[Event], None], *, delay: float = 0.0,
                 at: float | None = None, priority: int = NORMAL, eid: int | None = None) -> None:
        self.env = env
        self.callbacks = [callback]
        self._value = None
        self._ok = True
        if at is None:
            if eid is None:
                env.schedule(self, priority, delay)
                return
            at = env._now + delay
        queue = getattr(env, "_queue", None)
        if queue is not None:  # SimPy 4: what Environment.schedule does, at an absolute time
            heappush(queue, (at, priority, next(env._eid) if eid is None else eid, self))
        else:  # pragma: no cover - another SimPy layout: relative delay (exact up to an ulp)
            env.schedule(self, priority, at - env.now)

    def cancel(self) -> None:
        """Processed as a no-op (SimPy cannot take an event out of its queue)."""
        if self.callbacks:
            self.callbacks.clear()


def can_reserve_eids(env: simpy.Environment) -> bool:
    """Whether ``env`` has SimPy 4's queue layout (``_queue`` heap of ``(time, priority, eid,
    event)`` and the ``_eid`` counter), which reserving event ids and ``CallbackEvent(eid=...)`` need."""
    return isinstance(getattr(env, "_queue", None), list) and hasattr(getattr(env, "_eid", None), "__next__")

