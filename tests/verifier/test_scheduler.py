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


def test_rank_selection_prefers_the_passing_candidate_nearest_the_policy_mean():
    """P(safe) only vetoes; with selection="rank" the passing candidate nearest the policy's
    mean wins (not the safest-looking, not the learned advantage's maximum)."""
    s = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="filter", k=4, selection="rank"))
    mean = np.full((H, A), 0.5, np.float32)
    chunk, v = s.choose(drawer([0.0, 0.45, 0.62, 3.0]), H, A, mean=mean)
    assert v.chosen == 1 and chunk[0, 0] == pytest.approx(0.45)
    assert v.rejected == 1  # 3.0 fails the veto: P(safe) = exp(-3) < 0.5
    mixed = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="filter", k=2, safety_weight=1.0,
                                                            proximity_weight=0.0,
                                                            selection="rank"))
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


class PassAll:
    threshold = 0.0

    def score(self, features, state, mean, candidates):
        return np.ones(len(candidates)), np.zeros(len(candidates))


def _likelihood_picks(noise, rows=None, n=400, k=16, seed=0):
    """(z^2 per entry of the chosen candidates, of all candidates) over ``n`` decisions."""
    rng = np.random.default_rng(seed)
    s = VerifierScheduler(PassAll(), SchedulerConfig(mode="filter", k=k, seed=seed))
    mean, log_std = np.full((H, A), 0.3, np.float32), np.full((H, A), np.log(0.25), np.float32)
    lo, hi = rows or (0, H)
    chosen, every = [], []
    for _ in range(n):
        cand = mean + 0.25 * rng.standard_normal((k, H, A)) + noise * rng.standard_normal((k, H, A))
        chunk, v = s.choose(lambda kk: cand.astype(np.float32), H, A, mean=mean,
                            log_std=log_std, rows=rows)
        z2 = ((cand - mean) / 0.25) ** 2
        chosen.append(((chunk - mean) / 0.25)[lo:hi] ** 2)
        every.append(z2[:, lo:hi])
    return float(np.mean(chosen)), float(np.mean(every))


def test_likelihood_selection_leaves_a_policy_that_matches_its_declared_spread_alone():
    """Candidates drawn as the policy declares: the chosen one is a typical draw (E z^2 = 1),
    not the one nearest the mean (which would make a healthy policy near-deterministic)."""
    chosen, every = _likelihood_picks(noise=0.0)
    assert every == pytest.approx(1.0, abs=0.05)
    assert chosen == pytest.approx(1.0, abs=0.1)


def test_likelihood_selection_pulls_wider_candidates_back_to_the_declared_spread():
    chosen, every = _likelihood_picks(noise=0.5)  # std 0.56 where the policy declares 0.25
    assert every > 4.0 and chosen < 0.7 * every  # nearest of 16 in 32 dimensions: ~0.6
    # weighing only the rows that will run denoises those rows more
    chosen_rows, _ = _likelihood_picks(noise=0.5, rows=(0, 4))
    assert chosen_rows < chosen


def test_resample_draws_more_only_for_candidates_wider_than_declared():
    rng = np.random.default_rng(1)
    mean, log_std = np.zeros((H, A), np.float32), np.full((H, A), np.log(0.25), np.float32)
    s = VerifierScheduler(PassAll(), SchedulerConfig(mode="resample", k=16, max_rounds=3,
                                                     budget_ms=1e6))

    def rounds(noise):
        draw = lambda k: (0.25 * rng.standard_normal((k, H, A))  # noqa: E731
                          + noise * rng.standard_normal((k, H, A))).astype(np.float32)
        return s.choose(draw, H, A, mean=mean, log_std=log_std)[1]

    healthy, wide = rounds(0.0), rounds(0.5)
    assert healthy.rounds == 1 and healthy.candidates == 16
    assert wide.rounds == 3 and wide.candidates == 48 and wide.accepted


def test_a_vetoing_scorer_holds_for_a_bounded_number_of_decisions():
    """Every candidate vetoed: hold (remainder) for ``max_held`` decisions, then the veto is
    lifted for one decision; the robot never stalls on a poor scorer."""
    s = VerifierScheduler(FakeScorer(), SchedulerConfig(mode="filter", k=2, max_held=2,
                                                        distrust_window=100))
    far = lambda k: np.full((k, H, A), 5.0, np.float32)  # noqa: E731 (P(safe) = exp(-5))
    out = [s.choose(far, H, A)[1] for _ in range(6)]
    assert [v.accepted for v in out] == [False, False, True, False, False, True]
    assert [v.override for v in out] == [False, False, True, False, False, True]
    st = s.stats()
    assert st["veto_overrides"] == 2 and st["chunks_rejected"] == 4
    # a passing candidate resets the count
    assert s.choose(drawer([0.1, 0.2]), H, A)[1].accepted
    assert not s.choose(far, H, A)[1].accepted


def test_a_scorer_that_vetoes_too_often_loses_its_veto_until_the_next_scorer():
    cfg = SchedulerConfig(mode="filter", k=2, max_held=1000, distrust_window=8, distrust_rate=0.5)
    first = FakeScorer()
    s = VerifierScheduler(None, cfg)
    far = lambda k: np.full((k, H, A), 5.0, np.float32)  # noqa: E731
    verdicts = [s.choose(far, H, A, scorer=first)[1] for _ in range(10)]
    assert not any(v.accepted for v in verdicts[:8])
    assert s.veto_disabled and s.stats()["scorers_distrusted"] == 1
    assert verdicts[-1].accepted and not verdicts[-1].override  # no veto: any finite one goes
    assert s.stats()["veto_disabled"] is True
    # the next version's scorer starts trusted
    v = s.choose(far, H, A, scorer=FakeScorer())[1]
    assert not v.accepted and not s.veto_disabled


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
    with pytest.raises(ValueError, match="selection"):
        SchedulerConfig(selection="best")
    with pytest.raises(ValueError, match="max_held"):
        SchedulerConfig(max_held=-1)


def test_ece_and_false_rejects():
    assert expected_calibration_error([0.9] * 10, [1] * 9 + [0]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0, 1.0], [0, 0]) == pytest.approx(1.0)
    assert false_reject_rate([0.1, 0.6, 0.9, 0.2], [True, True, True, False], 0.5) == pytest.approx(1 / 3)


def test_a_broken_scorer_in_an_artifact_means_no_scorer_not_a_refused_version(tmp_path, caplog):
    """A refused version would leave the robot behind the learner's staleness gate; a scorer
    that cannot be used is dropped instead (the envelope still checks every command)."""
    import types

    from verifier.scorer import OnnxScorer
    (tmp_path / "verifier.onnx").write_bytes(b"not an onnx graph")
    manifest = types.SimpleNamespace(version=3, files={"verifier.onnx": "sha"}, normalization={},
                                     extra={"verifier": {"file": "verifier.onnx",
                                                         "threshold": 0.2}})
    with caplog.at_level("ERROR"):
        assert OnnxScorer.from_artifact(tmp_path, manifest) is None
    assert "v3 ships a scorer that cannot be used" in caplog.text
    manifest.extra["verifier"]["threshold"] = float("nan")
    assert OnnxScorer.from_artifact(tmp_path, manifest) is None
    manifest.extra = {}
    assert OnnxScorer.from_artifact(tmp_path, manifest) is None
