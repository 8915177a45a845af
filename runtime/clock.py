"""The one injectable clock every component takes its time from.

``now()`` returns seconds (float) on a monotonic timeline; ``sleep_until(t)`` blocks until the
clock reads at least ``t``. On robots: the monotonic wall clock. In simulation: a virtual clock
that only moves when the simulator advances it, so asynchronous runs are reproducible.
"""
from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class WallClock:
    """``time.monotonic``; sleeps coarse then spins the last ~1 ms for tick accuracy."""

    spin_s = 0.001

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        while True:
            left = t - time.monotonic()
            if left <= 0:
                return
            if left > self.spin_s:
                time.sleep(left - self.spin_s)
            # final stretch: yield without oversleeping
            elif left > 0:
                time.sleep(0)


class VirtualClock:
    """Time advances only through ``advance``; ``sleep_until`` waits for another thread to
    advance the clock past ``t`` (or advances it itself when ``auto_advance`` is set)."""

    def __init__(self, start: float = 0.0, auto_advance: bool = True):
        self._t = float(start)
        self._cond = threading.Condition()
        self.auto_advance = auto_advance

    def now(self) -> float:
        with self._cond:
            return self._t

    def advance(self, dt: float) -> float:
        if dt < 0:
            raise ValueError(f"a virtual clock cannot go back: advance({dt})")
        with self._cond:
            self._t += dt
            self._cond.notify_all()
            return self._t

    def sleep_until(self, t: float) -> None:
        with self._cond:
            if self.auto_advance:
                self._t = max(self._t, t)
                self._cond.notify_all()
                return
            self._cond.wait_for(lambda: self._t >= t)


CLOCKS = {"wall": WallClock, "virtual": VirtualClock}


def make_clock(name: str) -> Clock:
    try:
        return CLOCKS[name]()
    except KeyError:
        raise ValueError(f"unknown clock {name!r}; choose one of {sorted(CLOCKS)}") from None
