"""Clocks: the engine asks a clock for the time instead of reading the wall itself.

The environment and the benchmarks use the virtual clock: time moves by each iteration's
measured latency, so results do not depend on how long a policy thinks. A server uses the
wall clock.
"""

from __future__ import annotations

import time

from mypy_extensions import mypyc_attr


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)  # (compiled: copied with the env)
class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time cannot go backwards")
        self._now += seconds

    def advance_to(self, t: float) -> None:
        self._now = max(self._now, t)


@mypyc_attr(serializable=True, allow_interpreted_subclasses=True)
class WallClock:
    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self._t0

    def advance(self, seconds: float) -> None:
        pass  # wall time advanced by itself while the iteration ran

    def advance_to(self, t: float) -> None:
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)
