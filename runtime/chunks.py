"""The time-indexed action queue between inference and the control loop.

Each slot is one control tick holding ``(chunk, offset, action, weight, count)``: by default the
action ``chunk.actions[offset]`` (normalized) executes at that tick; row ``i`` of a chunk belongs
to tick ``chunk.start_tick + i``. Blending strategies store the blended action instead, and
``chunk``/``offset`` name the newest chunk that contributed (provenance). Merge strategies are
registered by name:

``latest``    the new chunk replaces the queue from ``from_tick`` on (latest-only).
``prefix``    ticks before ``start_tick + prefix_len`` keep the committed actions the chunk was
              conditioned on; the new chunk takes over from there (prefix-conditioned policies).
``ensemble``  ACT temporal ensembling: every prediction for a tick is kept in an exponentially
              weighted mean, ``w_i = exp(-m * i)`` with ``i = 0`` the oldest prediction.
``average``   weighted average of the queued action and the new chunk's (LeRobot's async
              ``weighted_average``: ``(1 - w) * old + w * new``, ``w = new_weight``).

A reset starts a new epoch: everything queued is dropped and chunks of an older epoch that
arrive later (inferred before the reset) are refused.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import threading
from typing import Callable

import numpy as np

from runtime.types import Chunk

Slots = dict  # tick -> (chunk, offset, action, weight_sum, predictions)


@dataclasses.dataclass(frozen=True)
class MergeOptions:
    """``ensemble_m``: ACT's decay per older prediction (0 = plain mean, larger = trust the
    oldest more; ACT uses 0.01). ``new_weight``: the new chunk's share under ``average``."""
    ensemble_m: float = 0.01
    new_weight: float = 0.7

    def __post_init__(self):
        if self.ensemble_m < 0:
            raise ValueError(f"ensemble_m must be >= 0, got {self.ensemble_m}")
        if not 0.0 < self.new_weight <= 1.0:
            raise ValueError(f"new_weight must be in (0, 1], got {self.new_weight}")


def _slot(chunk: Chunk, row: int) -> tuple:
    return (chunk, row, chunk.actions[row], 1.0, 1)


def _take_over(slots: Slots, chunk: Chunk, first: int) -> None:
    for t in [t for t in slots if t >= first]:
        del slots[t]  # the newer chunk supersedes everything after `first`, also past its end
    for row in range(max(0, first - chunk.start_tick), chunk.horizon):
        slots[chunk.start_tick + row] = _slot(chunk, row)


def merge_latest(slots: Slots, chunk: Chunk, from_tick: int, options: MergeOptions) -> None:
    _take_over(slots, chunk, from_tick)


def merge_prefix(slots: Slots, chunk: Chunk, from_tick: int, options: MergeOptions) -> None:
    takeover = max(from_tick, chunk.start_tick + chunk.prefix_len)
    # committed ticks the old chunk no longer covers (it ran out) fall back to the new chunk's
    # rows, which are the same committed actions (the worker writes the prefix into them)
    for t in range(from_tick, takeover):
        if t not in slots:
            slots[t] = _slot(chunk, t - chunk.start_tick)
    _take_over(slots, chunk, takeover)


def _blend(slots: Slots, chunk: Chunk, from_tick: int, weight: Callable[[tuple], tuple]) -> None:
    for row in range(max(0, from_tick - chunk.start_tick), chunk.horizon):
        t = chunk.start_tick + row
        old = slots.get(t)
        if old is None:
            slots[t] = _slot(chunk, row)
            continue
        action, wsum = weight(old, chunk.actions[row])
        slots[t] = (chunk, row, action.astype(np.float32), wsum, old[4] + 1)


def merge_ensemble(slots: Slots, chunk: Chunk, from_tick: int, options: MergeOptions) -> None:
    def weight(old, new):
        w = math.exp(-options.ensemble_m * old[4])  # the (n+1)-th prediction for this tick
        return (old[2] * old[3] + w * new) / (old[3] + w), old[3] + w
    _blend(slots, chunk, from_tick, weight)


def merge_average(slots: Slots, chunk: Chunk, from_tick: int, options: MergeOptions) -> None:
    w = options.new_weight
    _blend(slots, chunk, from_tick, lambda old, new: ((1 - w) * old[2] + w * new, 1.0))


STRATEGIES: dict[str, Callable[[Slots, Chunk, int, MergeOptions], None]] = {
    "latest": merge_latest,
    "prefix": merge_prefix,
    "ensemble": merge_ensemble,
    "average": merge_average,
}


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        near = difflib.get_close_matches(name, STRATEGIES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown merge strategy {name!r}{hint} (known: {sorted(STRATEGIES)})")
    return name


class ActionQueue:
    """Thread-safe: the inference worker inserts while the control loop pops."""

    def __init__(self, action_dim: int | None = None, options: MergeOptions = MergeOptions()):
        self.action_dim = action_dim
        self.options = options
        self._slots: Slots = {}
        self._lock = threading.Lock()
        self.epoch = 0
        self._next_tick = 0    # the tick after the last one popped: earlier slots are stale
        self.inserted = 0
        self.refused_stale = 0
        self.underruns = 0

    @property
    def next_tick(self) -> int:
        """The next tick the control loop will pop (the first one a new chunk can still reach)."""
        with self._lock:
            return self._next_tick

    def insert(self, chunk: Chunk, from_tick: int | None = None, strategy: str = "latest") -> bool:
        """Queue ``chunk`` from ``from_tick`` (default: the next tick to execute). Returns False
        (and queues nothing) when the chunk belongs to another epoch."""
        merge = STRATEGIES[check_strategy(strategy)]
        with self._lock:
            if chunk.epoch != self.epoch:
                self.refused_stale += 1
                return False
            start = max(chunk.start_tick, self._next_tick,
                        self._next_tick if from_tick is None else int(from_tick))
            merge(self._slots, chunk, start, self.options)
            self.inserted += 1
            return True

    def pop(self, tick: int) -> tuple[Chunk, int, np.ndarray] | None:
        """The action for ``tick`` as (chunk, offset, action), or None on an underrun."""
        with self._lock:
            for t in [t for t in self._slots if t < tick]:
                del self._slots[t]
            self._next_tick = max(self._next_tick, tick + 1)
            slot = self._slots.pop(tick, None)
            if slot is None:
                self.underruns += 1
                return None
            return slot[0], slot[1], slot[2]

    def remaining(self, tick: int) -> int:
        """Consecutive queued ticks starting at ``tick``."""
        with self._lock:
            n = 0
            while tick + n in self._slots:
                n += 1
            return n

    def committed(self, tick: int, d: int) -> np.ndarray:
        """The next (up to) ``d`` queued actions for ticks ``tick..tick+d-1``, [n, A] with n <= d
        (stops at the first gap): the prefix the next chunk must continue."""
        rows = []
        with self._lock:
            for t in range(tick, tick + max(0, d)):
                slot = self._slots.get(t)
                if slot is None:
                    break
                rows.append(slot[2])
        if rows:
            return np.stack(rows).astype(np.float32)
        return np.zeros((0, self.action_dim or 0), np.float32)

    def drop_from(self, tick: int) -> int:
        """Drop every queued action at ``tick`` or later (synchronous execution stops the robot
        before it infers again); returns how many were dropped."""
        with self._lock:
            gone = [t for t in self._slots if t >= tick]
            for t in gone:
                del self._slots[t]
            return len(gone)

    def reset(self, epoch: int) -> None:
        """Drop everything; from now on only chunks of ``epoch`` are accepted."""
        with self._lock:
            if epoch < self.epoch:
                raise ValueError(f"epoch must not go back: {epoch} < {self.epoch}")
            self.epoch = int(epoch)
            self._slots.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)
