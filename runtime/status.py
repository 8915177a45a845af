"""Small shared pieces of the node's bookkeeping: latency windows and the status file."""
from __future__ import annotations

import bisect
import collections
import json
import pathlib
import threading

import numpy as np

from runtime.artifact import write_atomic


class LatencyWindow:
    """Quantiles over the most recent ``size`` samples (seconds). Thread-safe.

    The control loop asks for the p95 every tick (the delay estimate), so the window keeps its
    samples sorted as they come and go (a bisect and a short memmove per sample) and a quantile
    is an index into them: numpy's default (linear) definition without a sort per call."""

    def __init__(self, size: int = 256):
        if size < 1:
            raise ValueError(f"LatencyWindow size must be >= 1, got {size}")
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self._sorted: list[float] = []
        self._lock = threading.Lock()
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        x = float(seconds)
        if x != x:  # NaN: no place in an order (a clock cannot measure one)
            return
        with self._lock:
            if len(self._samples) == self._samples.maxlen:
                del self._sorted[bisect.bisect_left(self._sorted, self._samples[0])]
            self._samples.append(x)
            bisect.insort(self._sorted, x)
            self.count += 1
            self.max = max(self.max, x)

    def __len__(self) -> int:
        return len(self._samples)

    def quantile(self, q: float, default: float = 0.0) -> float:
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile q must be in [0, 1], got {q}")
        with self._lock:
            s = self._sorted
            if not s:
                return default
            pos = q * (len(s) - 1)
            lo = int(pos)
            if lo >= len(s) - 1:
                return s[-1]
            return s[lo] + (s[lo + 1] - s[lo]) * (pos - lo)

    def summary_ms(self, prefix: str = "") -> dict:
        return {f"{prefix}p50_ms": round(1e3 * self.quantile(0.50), 3),
                f"{prefix}p95_ms": round(1e3 * self.quantile(0.95), 3),
                f"{prefix}p99_ms": round(1e3 * self.quantile(0.99), 3)}


def write_status(path: str | pathlib.Path, status: dict) -> None:
    """Atomically replace the status file, so a reader never sees half a JSON document."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(status, indent=2, sort_keys=True) + "\n").encode())
