"""The verifier's scheduler: K candidates in, at most one chunk out, within a compute budget.

Modes:
  off       one candidate; only the invariants (shape, finite values) are checked
  filter    K candidates from one batched draw; the scorer's P(safe) must reach the threshold
            (a veto for clearly unsafe chunks); one of those that pass is chosen (below)
  resample  as filter; draw K more while rounds and the time budget allow if none passes, or
            (likelihood selection) if the candidates are much wider than the policy declares
            (rho > ``widen_resample``, below): more draws to pick from is what denoises them

Choosing among the passing candidates (``selection``):
  likelihood  (default) self-normalized importance resampling towards the policy's own Gaussian
            (``mean``, ``log_std``): the candidates' spread is measured against the declared
            one, rho = mean z^2 over the weighed rows, and a candidate is drawn with weight
            ``exp(-0.5 * max(0, 1 - 1/rho) * sum z^2 + advantage_weight * adv
            + safety_weight * p)``.
            Candidates drawn as the policy declares (rho ~ 1) are chosen uniformly, so a healthy
            policy's behaviour is unchanged; candidates wider than declared (a noisy sampler or
            actuator path) are pulled back to the declared distribution. Picking the single
            nearest candidate instead makes a healthy policy near-deterministic, which cost the
            reference policy 3 to 11 points in our runs.
  rank      the argmax of ``advantage_weight * adv + safety_weight * p - proximity_weight * d``,
            d = the candidate's mean squared distance from the policy mean.
``rows`` says which rows the selection weighs: those that will run (not the committed prefix,
not the rows past the execution horizon); default all.

If none passes, the verdict has ``chosen == -1``: the caller keeps the previous chunk's
remainder or holds. That hold is bounded: after ``max_held`` such decisions in a row the next
one lifts the veto and takes the selection's choice among all finite candidates (counted as a
``veto_override``; the envelope still checks every command), and a scorer that leaves more than
``distrust_rate`` of the last ``distrust_window`` decisions without a passing candidate is
evidently miscalibrated for this robot: its veto is ignored until the next scorer arrives
(logged, ``veto_disabled`` in the stats). A poor scorer can cost some quality, never liveness.
Candidates carry only actions that are not yet committed: the caller puts the committed prefix
back after the choice. The envelope still checks every command later.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Callable

import numpy as np

from verifier.metrics import VerifierMetrics
from verifier.scorer import CandidateScorer
from verifier.verdict import VerifierVerdict

log = logging.getLogger(__name__)

MODES = ("off", "filter", "resample")
SELECTIONS = ("likelihood", "rank")

# draw(k) -> [k, H, A] candidate chunks (normalized) for the current observation
Draw = Callable[[int], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    mode: str = "resample"
    k: int = 64                      # candidates per round (one batched scorer call)
    threshold: float | None = None   # None: the scorer's calibrated threshold
    max_rounds: int = 4              # sampling rounds in resample mode (1 + resamples)
    budget_ms: float = 2.0           # no new round starts after this much time
    widen_resample: float = 1.5      # resample: rho above this draws another round
    selection: str = "likelihood"    # how a passing candidate is chosen (module docstring)
    advantage_weight: float = 0.0    # weight of the predicted advantage
    safety_weight: float = 0.0       # weight of P(safe) (the threshold vetoes anyway)
    proximity_weight: float = 1.0    # "rank" only: weight of the distance from the policy mean
    max_held: int = 2                # vetoed decisions in a row before the veto is lifted once
    distrust_window: int = 32        # decisions over which a scorer's veto rate is judged
    distrust_rate: float = 0.5       # vetoed share above which the scorer's veto is ignored
    seed: int = 0                    # the likelihood selection's draws

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"verifier mode must be one of {MODES}, got {self.mode!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"verifier selection must be one of {SELECTIONS}, "
                             f"got {self.selection!r}")
        if self.k < 1 or self.max_rounds < 1 or self.budget_ms < 0:
            raise ValueError(f"verifier needs k >= 1, max_rounds >= 1, budget_ms >= 0: {self}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"verifier threshold must be in [0, 1], got {self.threshold}")
        if self.max_held < 0 or self.distrust_window < 1 or not 0 < self.distrust_rate <= 1:
            raise ValueError(f"verifier needs max_held >= 0, distrust_window >= 1 and "
                             f"distrust_rate in (0, 1]: {self}")


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
        self._rng = np.random.default_rng(config.seed)
        self._held = 0                       # vetoed decisions in a row
        self._judged = None                  # the scorer whose veto rate is being tracked
        self._vetoes: collections.deque = collections.deque(maxlen=config.distrust_window)
        self.veto_disabled = False

    def mode(self, scorer: CandidateScorer | None = None) -> str:
        """The configured mode, or "off" when there is no scorer to run."""
        return self.config.mode if (scorer or self.scorer) is not None else "off"

    def threshold(self, scorer: CandidateScorer | None = None) -> float:
        t = self.config.threshold
        return float((scorer or self.scorer).threshold if t is None else t)

    def choose(self, draw: Draw, horizon: int, action_dim: int, *, features=None, state=None,
               mean=None, log_std=None, rows: tuple[int, int] | None = None,
               scorer: CandidateScorer | None = None
               ) -> tuple[np.ndarray | None, VerifierVerdict]:
        """(the chosen chunk [H, A] or None, the verdict). ``features``, ``state`` (robot
        units), ``mean``, ``log_std``: the policy output the candidates come from; ``rows``:
        [start, stop) of the rows that will run; ``scorer``: the one shipped with that policy
        version (default: the scheduler's own)."""
        t0 = self.clock()
        scorer = scorer or self.scorer
        mode, c = self.mode(scorer), self.config
        k = 1 if mode == "off" else c.k
        self.last_mode = mode
        if mode != "off":
            self._track(scorer)
        veto = mode != "off" and not self.veto_disabled
        threshold = self.threshold(scorer) if veto else 0.0
        drawn, scores, advs, passed = [], [], [], []
        chosen, rounds, rejected, reason, override = -1, 0, 0, "", False
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
                p, adv = np.where(finite, 1.0, 0.0), np.zeros(len(cand))
            else:
                safe_cand = np.where(finite[:, None, None], cand, 0.0)
                p, adv = scorer.score(features, state, mean, safe_cand)
                p = np.where(finite, p, 0.0)
                scores.extend(float(x) for x in p)
                advs.extend(float(x) for x in adv)
            ok = finite & (p >= threshold)
            drawn.append(cand)
            passed.append(ok)
            rejected += int((~ok).sum())
            if (mode != "resample" or rounds >= c.max_rounds
                    or (self.clock() - t0) * 1e3 >= c.budget_ms):
                break
            if ok.any():
                if c.selection != "likelihood" or log_std is None or mean is None:
                    break
                _, rho = self._spread(np.concatenate(drawn), mean, log_std, rows)
                if rho <= c.widen_resample:
                    break
        ok = np.concatenate(passed) if passed else np.zeros(0, bool)
        if not ok.any() and drawn:
            p_all = np.asarray(scores) if scores else np.zeros(0)
            finite_any = any(np.isfinite(d).all(axis=(1, 2)).any() for d in drawn)
            reason = reason or ("non-finite candidate" if not finite_any
                                else f"no candidate reached P(safe) >= {threshold:.3f} "
                                     f"(best {float(np.max(p_all)) if len(p_all) else 0.0:.3f})")
        all_cand = np.concatenate(drawn) if drawn else np.zeros((0, horizon, action_dim))
        if mode != "off" and len(ok):
            vetoed = not ok.any()
            self._vetoes.append(vetoed)
            self._held = self._held + 1 if vetoed else 0
            finite = np.all(np.isfinite(all_cand), axis=(1, 2))
            if vetoed and self._held > c.max_held and finite.any():
                ok, override = finite, True   # bounded hold: lift the veto for this decision
                self._held = 0
        if ok.any():
            chosen = self._select(all_cand, ok, np.asarray(scores), np.asarray(advs), mean,
                                  log_std, rows)
        verdict = VerifierVerdict(candidates=len(all_cand), chosen=chosen, rejected=rejected,
                                  scores=tuple(scores), advantages=tuple(advs), rounds=rounds,
                                  seconds=self.clock() - t0, reason="" if chosen >= 0 else reason,
                                  override=override)
        self.metrics.add(verdict)
        if chosen < 0:
            self.last_reason = reason
            return None, verdict
        return all_cand[chosen].copy(), verdict

    def _select(self, cand, ok, p, adv, mean, log_std, rows) -> int:
        c = self.config
        n = len(cand)
        p = p if len(p) == n else np.ones(n)
        adv = adv if len(adv) == n else np.zeros(n)
        score = np.zeros(n)
        for weight, term in ((c.advantage_weight, adv), (c.safety_weight, p)):
            if weight:  # a NaN from the scorer ranks last instead of poisoning every weight
                score = score + weight * np.nan_to_num(term, nan=-1e9)
        if c.selection == "rank" or mean is None:
            if mean is not None and c.proximity_weight:
                lo, hi = _rows(rows, cand.shape[1])
                dev = (np.where(np.isfinite(cand), cand, 0.0) - np.asarray(mean)[None])[:, lo:hi]
                score = score - c.proximity_weight * np.mean(dev * dev, axis=(1, 2))
            return int(np.argmax(np.where(ok, score, -np.inf)))
        if log_std is not None:
            z2, rho = self._spread(cand, mean, log_std, rows)
            score = score - 0.5 * max(0.0, 1.0 - 1.0 / max(rho, 1e-9)) * z2
        score = np.where(ok, score, -np.inf)
        w = np.exp(score - score.max())
        return int(self._rng.choice(n, p=w / w.sum()))

    @staticmethod
    def _spread(cand, mean, log_std, rows) -> tuple[np.ndarray, float]:
        """(sum of z^2 over the weighed rows per candidate, rho = the mean z^2 per entry over
        the finite candidates, vetoed ones included: the sampler's spread over the declared)."""
        lo, hi = _rows(rows, cand.shape[1])
        finite = np.all(np.isfinite(cand), axis=(1, 2))
        dev = (np.where(finite[:, None, None], cand, 0.0) - np.asarray(mean)[None])[:, lo:hi]
        z2 = (dev / np.exp(np.asarray(log_std, np.float32))[None, lo:hi]) ** 2
        rho = float(z2[finite].mean()) if finite.any() else 1.0
        return z2.sum(axis=(1, 2)), rho

    def _track(self, scorer) -> None:
        """Judge each scorer's veto rate on this robot; a new scorer starts trusted."""
        if scorer is not self._judged:
            self._judged, self.veto_disabled = scorer, False
            self._vetoes.clear()
            self._held = 0
            return
        c = self.config
        if (not self.veto_disabled and len(self._vetoes) == c.distrust_window
                and np.mean(self._vetoes) > c.distrust_rate):
            self.veto_disabled = True
            self.metrics.count("scorers_distrusted")
            log.warning("verifier: the scorer vetoed %.0f%% of the last %d chunks (allowed "
                        "%.0f%%); its veto is ignored until the next policy version ships "
                        "another (SchedulerConfig.distrust_rate)", 100 * np.mean(self._vetoes),
                        c.distrust_window, 100 * c.distrust_rate)

    def stats(self) -> dict:
        out = {"mode": self.last_mode, "veto_disabled": self.veto_disabled,
               **self.metrics.stats()}
        if self.envelope is not None:
            out["actions_clamped"] = self.envelope.actions_clamped
        return out


def _rows(rows, horizon: int) -> tuple[int, int]:
    lo, hi = rows if rows is not None else (0, horizon)
    return (lo, hi) if 0 <= lo < hi <= horizon else (0, horizon)
