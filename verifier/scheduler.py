"""The verifier's scheduler: K candidates in, at most one chunk out, within a compute budget.

Modes:
  off       one candidate; only the invariants (shape, finite values) are checked
  filter    K candidates from one batched draw; the scorer's P(safe) must reach the threshold
            (a veto for clearly unsafe chunks); of those that pass, the best by
            ``advantage_weight * advantage + safety_weight * P(safe) - proximity_weight * d``
            wins, where d is the candidate's mean squared distance from the policy mean
            (normalized units). Ranking by P(safe) alone favours timid chunks, and the maximum
            of a learned advantage over K draws picks its extrapolation errors; the proximity
            term prefers the policy's own most likely chunk among those that pass
  resample  as filter; if none passes, draw K more while rounds and the time budget allow
If none passes, the verdict has ``chosen == -1``: the caller keeps the previous chunk's
remainder or holds. Candidates carry only actions that are not yet committed: the caller puts
the committed prefix back after the choice. The envelope still checks every command later.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from verifier.metrics import VerifierMetrics
from verifier.scorer import CandidateScorer
from verifier.verdict import VerifierVerdict

MODES = ("off", "filter", "resample")

# draw(k) -> [k, H, A] candidate chunks (normalized) for the current observation
Draw = Callable[[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    mode: str = "resample"
    k: int = 16
    threshold: float | None = None   # None: the scorer's calibrated threshold
    max_rounds: int = 4              # sampling rounds in resample mode (1 + resamples)
    budget_ms: float = 10.0          # no new round starts after this much time
    advantage_weight: float = 0.0    # ranking: weight of the predicted advantage
    safety_weight: float = 0.0       # ranking: weight of P(safe) (the threshold vetoes anyway)
    proximity_weight: float = 1.0    # ranking: weight of the distance from the policy mean

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"verifier mode must be one of {MODES}, got {self.mode!r}")
        if self.k < 1 or self.max_rounds < 1 or self.budget_ms < 0:
            raise ValueError(f"verifier needs k >= 1, max_rounds >= 1, budget_ms >= 0: {self}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"verifier threshold must be in [0, 1], got {self.threshold}")


class VerifierScheduler:
    def __init__(self, scorer: CandidateScorer | None = None,
                 config: SchedulerConfig = SchedulerConfig(), envelope=None,
                 clock: Callable[[], float] = time.perf_counter):
        self.scorer = scorer
        self.config = config
        self.envelope = envelope
        self.clock = clock
        self.metrics = VerifierMetrics()
        self.last_reason = ""
        self.last_mode = self.mode()

    def mode(self, scorer: CandidateScorer | None = None) -> str:
        """The configured mode, or "off" when there is no scorer to run."""
        return self.config.mode if (scorer or self.scorer) is not None else "off"

    def threshold(self, scorer: CandidateScorer | None = None) -> float:
        t = self.config.threshold
        return float((scorer or self.scorer).threshold if t is None else t)

    def choose(self, draw: Draw, horizon: int, action_dim: int, *, features=None, state=None,
               mean=None, scorer: CandidateScorer | None = None
               ) -> tuple[np.ndarray | None, VerifierVerdict]:
        """(the chosen chunk [H, A] or None, the verdict). ``features``, ``state`` (robot
        units), ``mean``: the policy output the candidates come from; ``scorer``: the one
        shipped with that policy version (default: the scheduler's own)."""
        t0 = self.clock()
        scorer = scorer or self.scorer
        mode, c = self.mode(scorer), self.config
        k = 1 if mode == "off" else c.k
        self.last_mode = mode
        threshold = self.threshold(scorer) if scorer is not None else 0.0
        drawn, scores, advs = [], [], []
        chosen, rounds, rejected, reason = -1, 0, 0, ""
        while True:
            rounds += 1
            cand = np.asarray(draw(k), np.float32)
            if cand.ndim == 2:
                cand = cand[None]
            if cand.shape[1:] != (horizon, action_dim):
                reason = f"candidate shape {cand.shape[1:]} is not [{horizon}, {action_dim}]"
                rejected += len(cand)
                break
            finite = np.all(np.isfinite(cand), axis=(1, 2))
            if mode == "off":
                p = np.where(finite, 1.0, 0.0)
                adv = np.zeros(len(cand))
                ok = finite
            else:
                safe_cand = np.where(finite[:, None, None], cand, 0.0)
                p, adv = scorer.score(features, state, mean, safe_cand)
                p = np.where(finite, p, 0.0)
                ok = finite & (p >= threshold)
                scores.extend(float(x) for x in p)
                advs.extend(float(x) for x in adv)
            base = sum(len(d) for d in drawn)
            drawn.append(cand)
            rejected += int((~ok).sum())
            if ok.any():
                rank = c.advantage_weight * adv + c.safety_weight * p
                if mean is not None and c.proximity_weight:
                    dev = np.where(finite[:, None, None], cand - np.asarray(mean, np.float32), 0)
                    rank = rank - c.proximity_weight * np.mean(dev * dev, axis=(1, 2))
                rank = np.where(ok, rank, -np.inf)
                chosen = base + int(np.argmax(rank))
                break
            reason = ("non-finite candidate" if not finite.any()
                      else f"no candidate reached P(safe) >= {threshold:.3f} "
                           f"(best {float(np.max(p)):.3f})")
            if (mode != "resample" or rounds >= c.max_rounds
                    or (self.clock() - t0) * 1e3 >= c.budget_ms):
                break
        all_cand = np.concatenate(drawn) if drawn else np.zeros((0, horizon, action_dim))
        verdict = VerifierVerdict(candidates=len(all_cand), chosen=chosen, rejected=rejected,
                                  scores=tuple(scores), advantages=tuple(advs), rounds=rounds,
                                  seconds=self.clock() - t0, reason="" if chosen >= 0 else reason)
        self.metrics.add(verdict)
        if chosen < 0:
            self.last_reason = reason
            return None, verdict
        return all_cand[chosen].copy(), verdict

    def stats(self) -> dict:
        out = {"mode": self.last_mode, **self.metrics.stats()}
        if self.envelope is not None:
            out["actions_clamped"] = self.envelope.actions_clamped
        return out
