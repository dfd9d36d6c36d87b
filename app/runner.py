"""Run a scenario off the page's thread so the page can show progress meanwhile.

A full built-in trace takes tens of seconds to simulate; a page frozen that long looks broken.
:class:`BackgroundRun` runs :func:`sim.run` in a worker thread and exposes ``fraction`` (0..1,
or ``None`` when the core gives no progress signal) and the elapsed wall time, which the page
polls to redraw a progress bar.

Progress signal: if :func:`sim.run` accepts an ``on_progress(ended, total, sim_time_s)``
keyword, it is used; otherwise the run is indeterminate and the page shows elapsed time only.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any, Callable


def accepts_progress_callback(run: Callable) -> bool:
    try:
        return "on_progress" in inspect.signature(run).parameters
    except (TypeError, ValueError):
        return False


class BackgroundRun:
    """One simulation running in a daemon thread; poll :attr:`done`, then read ``result``/``error``."""

    def __init__(self, scenario: Any, *, run: Callable | None = None, label: str = ""):
        if run is None:
            import sim

            run = sim.run
        self.scenario = scenario
        self.label = label
        self.fraction: float | None = None
        self.sim_time_s: float | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self._done = threading.Event()
        self._run = run
        self._thread = threading.Thread(target=self._work, name="fleetsim-run", daemon=True)
        self._thread.start()

    def _on_progress(self, ended: int, total: int, sim_time_s: float | None = None) -> None:
        self.fraction = min(1.0, ended / total) if total else None
        self.sim_time_s = sim_time_s

    def _work(self) -> None:
        kwargs: dict[str, Any] = {}
        if accepts_progress_callback(self._run):
            kwargs["on_progress"] = self._on_progress
        try:
            self.result = self._run(self.scenario, **kwargs)
            self.fraction = 1.0
        except BaseException as e:  # handed to the page, which shows it; never lost in the thread
            self.error = e
        finally:
            self.finished = time.monotonic()
            self._done.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def status_text(self) -> str:
        pct = ""
        if self.fraction is not None and not self.done:
            at = f" at t={self.sim_time_s:,.0f} s simulated" if self.sim_time_s is not None else ""
            pct = f"{self.fraction:.0%} of requests done{at} · "
        return f"Simulating{' ' + self.label if self.label else ''}… {pct}{self.elapsed_s:.0f} s"
