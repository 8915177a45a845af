"""The time-indexed action queue between inference and the control loop.

Each slot is one control tick holding ``(chunk, offset)``: the action ``chunk.actions[offset]``
(normalized) executes at that tick. Row ``i`` of a chunk belongs to tick ``chunk.start_tick + i``.
Merge strategies are registered by name:

``latest``  the new chunk replaces the queue from ``from_tick`` on (policies without a prefix).
``prefix``  ticks before ``start_tick + prefix_len`` keep the committed actions the chunk was
            conditioned on; the new chunk takes over from there (prefix-conditioned policies).

A reset starts a new epoch: everything queued is dropped and chunks of an older epoch that
arrive later (inferred before the reset) are refused.
"""
from __future__ import annotations

import difflib
import threading
from typing import Callable

import numpy as np

from runtime.types import Chunk

Slots = dict  # tick -> (chunk, offset)


def _take_over(slots: Slots, chunk: Chunk, first: int) -> None:
    for t in [t for t in slots if t >= first]:
        del slots[t]  # the newer chunk supersedes everything after `first`, also past its end
    for row in range(max(0, first - chunk.start_tick), chunk.horizon):
        slots[chunk.start_tick + row] = (chunk, row)


def merge_latest(slots: Slots, chunk: Chunk, from_tick: int) -> None:
    _take_over(slots, chunk, from_tick)


def merge_prefix(slots: Slots, chunk: Chunk, from_tick: int) -> None:
    takeover = max(from_tick, chunk.start_tick + chunk.prefix_len)
    # committed ticks the old chunk no longer covers (it ran out) fall back to the new chunk's
    # rows, which are the same committed actions (the worker writes the prefix into them)
    for t in range(from_tick, takeover):
        if t not in slots:
            slots[t] = (chunk, t - chunk.start_tick)
    _take_over(slots, chunk, takeover)


STRATEGIES: dict[str, Callable[[Slots, Chunk, int], None]] = {
    "latest": merge_latest,
    "prefix": merge_prefix,
}


def check_strategy(name: str) -> str:
    if name not in STRATEGIES:
        near = difflib.get_close_matches(name, STRATEGIES, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown merge strategy {name!r}{hint} (known: {sorted(STRATEGIES)})")
    return name


class ActionQueue:
    """Thread-safe: the inference worker inserts while the control loop pops."""

    def __init__(self, action_dim: int | None = None):
        self.action_dim = action_dim
        self._slots: Slots = {}
        self._lock = threading.Lock()
        self.epoch = 0
        self._next_tick = 0    # the tick after the last one popped: earlier slots are stale
        self.inserted = 0
        self.refused_stale = 0
        self.underruns = 0

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
            merge(self._slots, chunk, start)
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
            chunk, offset = slot
            return chunk, offset, chunk.actions[offset]

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
                rows.append(slot[0].actions[slot[1]])
        if rows:
            return np.stack(rows).astype(np.float32)
        return np.zeros((0, self.action_dim or 0), np.float32)

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
