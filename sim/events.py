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
    """

    __slots__ = ()

    def __init__(self, env: simpy.Environment, callback: Callable[[Event], None], *, delay: float = 0.0,
                 at: float | None = None, priority: int = NORMAL) -> None:
        self.env = env
        self.callbacks = [callback]
        self._value = None
        self._ok = True
        if at is None:
            env.schedule(self, priority, delay)
            return
        queue = getattr(env, "_queue", None)
        if queue is not None:  # SimPy 4: what Environment.schedule does, at an absolute time
            heappush(queue, (at, priority, next(env._eid), self))
        else:  # pragma: no cover - another SimPy layout: relative delay (exact up to an ulp)
            env.schedule(self, priority, at - env.now)

    def cancel(self) -> None:
        """Processed as a no-op (SimPy cannot take an event out of its queue)."""
        if self.callbacks:
            self.callbacks.clear()
