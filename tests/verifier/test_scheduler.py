import numpy as np
import pytest

from verifier.metrics import expected_calibration_error, false_reject_rate
from verifier.scheduler import SchedulerConfig, VerifierScheduler

H, A = 8, 4


class FakeScorer:
    """P(safe) falls with the candidate's distance from zero; advantage = -distance."""
    threshold = 0.5

    def __init__(self):
        self.calls = []

    def score(self, features, state, mean, candidates):
        self.calls.append(len(candidates))
        d = np.abs(candidates).mean(axis=(1, 2))
        return np.exp(-d), -d


def drawer(values):
    it = iter(values)
    return lambda k: np.stack([np.full((H, A), next(it), np.float32) for _ in range(k)])


def test_off_mode_checks_invariants_only():
    s = VerifierScheduler(None, SchedulerConfig(mode="filter"))
    chunk, v = s.choose(drawer([5.0]), H, A)
    assert v.accepted and v.candidates == 1 and chunk[0, 0] == 5.0
    chunk, v = s.choose(lambda k: np.full((k, H, A), np.nan), H, A)
    assert chunk is None and not v.accepted and v.reason
    chunk, v = s.choose(lambda k: np.zeros((k, H - 1, A)), H, A)
    assert chunk is None and "shape" in v.reason


def test_filter_picks_the_best_passing_candidate_from_one_batched_call():
    scorer = FakeScorer()
    s = VerifierScheduler(scorer, SchedulerConfig(mode="filter", k=4, advantage_weight=1.0,
                                                  proximity_weight=0.0))
    chunk, v = s.choose(drawer([2.0, 0.3, 0.1, np.inf]), H, A)
    assert scorer.calls == [4] and v.candidates == 4 and v.rounds == 1
    assert v.chosen == 2 and chunk[0, 0] == pytest.approx(0.1)
    assert v.rejected == 2 and len(v.scores) == 4 and v.scores[3] == 0.0


def test_default_ranking_prefers_the_passing_candidate_nearest_the_policy_mean():
    """P(safe) only vetoes; among the passing candidates the one nearest the policy's mean
    wins by default (not the safest-looking, not the learned advantage's maximum)."""
    s = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="filter", k=4))
    mean = np.full((H, A), 0.5, np.float32)
    chunk, v = s.choose(drawer([0.0, 0.45, 0.62, 3.0]), H, A, mean=mean)
    assert v.chosen == 1 and chunk[0, 0] == pytest.approx(0.45)
    assert v.rejected == 1  # 3.0 fails the veto: P(safe) = exp(-3) < 0.5
    mixed = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="filter", k=2, safety_weight=1.0,
                                                            proximity_weight=0.0))
    assert mixed.choose(drawer([0.4, 0.1]), H, A, mean=mean)[1].chosen == 1


def test_filter_holds_when_none_passes_and_resample_draws_again():
    filt = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="filter", k=2))
    chunk, v = filt.choose(drawer([3.0, 4.0]), H, A)
    assert chunk is None and v.chosen == -1 and "P(safe)" in v.reason
    res = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="resample", k=2, max_rounds=3,
                                                          budget_ms=1e6))
    chunk, v = res.choose(drawer([3.0, 4.0, 5.0, 0.2, 9.0, 9.0]), H, A)
    assert v.accepted and v.rounds == 2 and v.candidates == 4 and v.chosen == 3
    assert res.metrics.resample_rounds == 1


def test_resample_stops_at_rounds_and_budget():
    res = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="resample", k=1, max_rounds=3,
                                                          budget_ms=1e6))
    chunk, v = res.choose(lambda k: np.full((k, H, A), 7.0), H, A)
    assert chunk is None and v.rounds == 3
    t = iter(np.arange(0, 100, 0.004))  # every clock read advances 4 ms
    timed = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="resample", k=1, max_rounds=50,
                                                            budget_ms=10), clock=lambda: next(t))
    _, v = timed.choose(lambda k: np.full((k, H, A), 7.0), H, A)
    assert v.rounds < 50


def test_metrics_count_decisions():
    s = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="filter", k=2))
    s.choose(drawer([0.0, 0.1]), H, A)
    s.choose(drawer([5.0, 6.0]), H, A)
    st = s.stats()
    assert st["chunks_checked"] == 2 and st["chunks_rejected"] == 1
    assert st["candidates"] == 4 and st["candidates_rejected"] == 2 and st["mode"] == "filter"


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        SchedulerConfig(mode="sometimes")
    with pytest.raises(ValueError, match="threshold"):
        SchedulerConfig(threshold=1.5)


def test_ece_and_false_rejects():
    assert expected_calibration_error([0.9] * 10, [1] * 9 + [0]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == pytest.approx(1.0)
    assert false_reject_rate([0.1, 0.6, 0.9, 0.2], [True, True, True, False], 0.5) == pytest.approx(1 / 3)
