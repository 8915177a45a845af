"""Small shared pieces of the node's bookkeeping: latency windows and the status file."""
from __future__ import annotations

import collections
import json
import pathlib
import threading

import numpy as np

from runtime.artifact import write_atomic


class LatencyWindow:
    """Quantiles over the most recent ``size`` samples (seconds). Thread-safe."""

    def __init__(self, size: int = 256):
        if size < 1:
            raise ValueError(f"LatencyWindow size must be >= 1, got {size}")
        self._samples: collections.deque[float] = collections.deque(maxlen=size)
        self._lock = threading.Lock()
        self.count = 0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        with self._lock:
            self._samples.append(float(seconds))
            self.count += 1
            self.max = max(self.max, float(seconds))

    def __len__(self) -> int:
        return len(self._samples)

    def quantile(self, q: float, default: float = 0.0) -> float:
        with self._lock:
            if not self._samples:
                return default
            return float(np.quantile(np.fromiter(self._samples, float), q))

    def summary_ms(self, prefix: str = "") -> dict:
        return {f"{prefix}p50_ms": round(1e3 * self.quantile(0.50), 3),
                f"{prefix}p95_ms": round(1e3 * self.quantile(0.95), 3),
                f"{prefix}p99_ms": round(1e3 * self.quantile(0.99), 3)}


def write_status(path: str | pathlib.Path, status: dict) -> None:
    """Atomically replace the status file, so a reader never sees half a JSON document."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(status, indent=2, sort_keys=True) + "\n").encode())
