"""The one injectable clock every component takes its time from.

``now()`` returns seconds (float) on a monotonic timeline; ``sleep_until(t)`` blocks until the
clock reads at least ``t``. On robots: the monotonic wall clock. In simulation: a virtual clock
that only moves when the simulator advances it, so asynchronous runs are reproducible; or, for
simulated robots run against wall time, a clock that runs a fixed factor faster than the wall.
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
        _sleep_until_monotonic(t, self.spin_s)


def _sleep_until_monotonic(t: float, spin_s: float) -> None:
    while True:
        left = t - time.monotonic()
        if left <= 0:
            return
        if left > spin_s:
            time.sleep(left - spin_s)
        # final stretch: yield without oversleeping
        else:
            time.sleep(0)


class ScaledClock:
    """Simulated robots only: time runs ``speed`` times as fast as the monotonic wall clock
    (reads equal at creation). A simulated fleet thus collects ``speed`` times the experience
    per wall-clock minute where the cores allow it; physics per tick is unchanged, and an
    inference of L wall seconds spans ``speed * L`` of the robot's seconds, so asynchronous
    chunking covers a longer delay in ticks than at real time, never a shorter one."""

    spin_s = WallClock.spin_s

    def __init__(self, speed: float):
        if not 0 < speed < float("inf"):
            raise ValueError(f"ScaledClock: speed must be a finite number > 0, got {speed}")
        self.speed = float(speed)
        self._origin = time.monotonic()

    def now(self) -> float:
        return self._origin + (time.monotonic() - self._origin) * self.speed

    def wall_time(self, t: float) -> float:
        """The monotonic wall time at which this clock reads ``t``."""
        return self._origin + (t - self._origin) / self.speed

    def sleep_until(self, t: float) -> None:
        _sleep_until_monotonic(self.wall_time(t), self.spin_s)


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
