"""Verifier metrics: calibration (ECE), false rejects, and running counters of the decisions."""
from __future__ import annotations

import collections
import threading

import numpy as np


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE of probabilities ``p`` against outcomes ``y`` in {0, 1}: equal-width bins, weighted
    by their share of the samples."""
    p, y = np.asarray(p, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    if p.shape != y.shape:
        raise ValueError(f"ECE: {p.shape[0]} probabilities but {y.shape[0]} outcomes")
    if len(p) == 0:
        return 0.0
    idx = np.minimum((p * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(p[m].mean() - y[m].mean())
    return float(ece)


def false_reject_rate(p_safe: np.ndarray, good: np.ndarray, threshold: float) -> float:
    """Share of the ``good`` chunks (safe, led to success) whose score is below ``threshold``."""
    p, good = np.asarray(p_safe, np.float64), np.asarray(good, bool)
    return float((p[good] < threshold).mean()) if good.any() else 0.0


def percentiles_ms(seconds, qs=(50, 99)) -> dict:
    s = np.asarray(list(seconds), np.float64)
    if len(s) == 0:
        return {f"p{q}": 0.0 for q in qs}
    return {f"p{q}": round(float(np.percentile(s, q)) * 1e3, 4) for q in qs}


class VerifierMetrics:
    """Counters of the scheduler's decisions, safe to read from any thread."""

    def __init__(self, window: int = 1024):
        self._lock = threading.Lock()
        self.chunks_checked = 0
        self.chunks_rejected = 0      # no candidate passed: remainder or hold
        self.candidates = 0
        self.candidates_rejected = 0
        self.resample_rounds = 0      # rounds beyond the first
        self.veto_overrides = 0       # vetoed decisions let through to bound the hold
        self.events: collections.Counter[str] = collections.Counter()
        self._seconds: collections.deque = collections.deque(maxlen=window)
        self._chosen_p: collections.deque = collections.deque(maxlen=window)

    def add(self, verdict) -> None:
        with self._lock:
            self.chunks_checked += 1
            self.chunks_rejected += int(not verdict.accepted)
            self.candidates += int(verdict.candidates)
            self.candidates_rejected += int(verdict.rejected)
            self.resample_rounds += max(0, int(verdict.rounds) - 1)
            self.veto_overrides += int(getattr(verdict, "override", False))
            self._seconds.append(float(verdict.seconds))
            if verdict.accepted and verdict.scores:
                self._chosen_p.append(float(verdict.scores[verdict.chosen]))

    def count(self, event: str, n: int = 1) -> None:
        with self._lock:
            self.events[event] += n

    def stats(self) -> dict:
        with self._lock:
            return {"chunks_checked": self.chunks_checked, "chunks_rejected": self.chunks_rejected,
                    "candidates": self.candidates, "candidates_rejected": self.candidates_rejected,
                    "resample_rounds": self.resample_rounds,
                    "veto_overrides": self.veto_overrides, **dict(self.events),
                    "chosen_p_safe_mean": round(float(np.mean(self._chosen_p)), 4)
                    if self._chosen_p else None,
                    **{f"time_{k}_ms": v for k, v in percentiles_ms(self._seconds).items()}}
