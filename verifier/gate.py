"""The chunk gate: checks a candidate chunk before it may be queued.

Today it checks what must hold for any chunk (shape, finite values); the learned scorer (safety
probability and advantage per candidate) plugs in as ``scorer`` later. A rejected chunk is not
queued: the queue keeps the previous chunk's remainder, or underruns and the loop holds.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from verifier.verdict import VerifierVerdict
from verifier.envelope import Envelope

# scorer(actions [H, A] normalized) -> (score in [0, 1], accept?)
Scorer = Callable[[np.ndarray], tuple[float, bool]]


class ChunkGate:
    def __init__(self, envelope: Envelope, scorer: Scorer | None = None):
        self.envelope = envelope
        self.scorer = scorer
        self._lock = threading.Lock()
        self.chunks_checked = 0
        self.chunks_rejected = 0
        self.last_reason = ""

    def check(self, actions: np.ndarray, horizon: int, action_dim: int) -> VerifierVerdict:
        """Verdict for one candidate; ``verdict.chosen == 0`` accepts it, ``-1`` rejects it."""
        t0 = time.perf_counter()
        actions = np.asarray(actions)
        reason, scores = "", ()
        if actions.shape != (horizon, action_dim):
            reason = f"shape {actions.shape} is not [{horizon}, {action_dim}]"
        elif not np.all(np.isfinite(actions)):
            reason = "non-finite actions"
        elif self.scorer is not None:
            score, ok = self.scorer(actions)
            scores = (float(score),)
            if not ok:
                reason = f"scorer rejected it (score {score:.3f})"
        with self._lock:
            self.chunks_checked += 1
            if reason:
                self.chunks_rejected += 1
                self.last_reason = reason
        return VerifierVerdict(candidates=1, chosen=-1 if reason else 0, rejected=int(bool(reason)),
                               scores=scores, seconds=time.perf_counter() - t0)

    def stats(self) -> dict:
        return {"chunks_checked": self.chunks_checked, "chunks_rejected": self.chunks_rejected,
                "actions_clamped": self.envelope.actions_clamped}
