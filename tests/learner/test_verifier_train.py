import numpy as np
import pytest

from learner.verifier_train import (ScorerData, ScorerTrainConfig, auc, chunk_labels, fit_platt,
                                    fit_temperature, pick_threshold, predict, train_scorer,
                                    veto_evidence)
from verifier.scorer import OnnxScorer


def test_labels_mark_interventions_and_failure_within_lookahead():
    clamped = np.zeros(20, bool)
    clamped[9] = True
    chunks = [(0, 4), (4, 4), (8, 4), (12, 4), (16, 4)]
    ok = chunk_labels(chunks, clamped, 20, failed=False, lookahead=2)
    assert ok.tolist() == [1, 0, 0, 1, 1]  # chunk 1 ends at 8, tick 9 is within T=2
    failed = chunk_labels(chunks, np.zeros(20, bool), 20, failed=True, lookahead=4)
    assert failed.tolist() == [1, 1, 1, 0, 0]
    # a time limit is not a failure: without a failure signal only interventions count
    timed_out = chunk_labels(chunks, np.zeros(20, bool), 20, failed=False, lookahead=4)
    assert timed_out.tolist() == [1, 1, 1, 1, 1]


def test_threshold_and_temperature():
    p = np.linspace(0, 1, 101)
    assert (p[p >= pick_threshold(p, np.ones(101, bool), 0.05)]).size >= 95
    rng = np.random.default_rng(0)
    logit = rng.normal(0, 3, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-logit / 3))).astype(float)
    assert fit_temperature(logit, y) == pytest.approx(3.0, rel=0.2)
    # Platt also fits the base rate a temperature cannot move
    y = (rng.random(4000) < 1 / (1 + np.exp(-(0.5 * logit - 1.0)))).astype(float)
    scale, bias = fit_platt(logit, y)
    assert scale == pytest.approx(0.5, rel=0.15) and bias == pytest.approx(-1.0, abs=0.15)
    assert fit_platt(logit, np.ones(4000)) == (1.0, 0.0)  # one class: identity
    # held-out chunks that rank the other way round: no trust in the logit, the base rate
    y = (rng.random(4000) < 1 / (1 + np.exp(logit))).astype(float)
    scale, bias = fit_platt(logit, y)
    assert scale == 0.0 and 1 / (1 + np.exp(-bias)) == pytest.approx(y.mean())


def _synthetic(n=600, seed=0):
    """Chunks far from the policy mean are unsafe."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(-0.5, 0.5, (n, 8, 4)).astype(np.float32)
    dev = rng.normal(0, 1, (n, 1, 1)) * rng.normal(0, 1, (n, 8, 4))
    actions = (mean + 0.5 * dev).astype(np.float32)
    d = np.abs(actions - mean).mean(axis=(1, 2))
    safe = (d < np.quantile(d, 0.7)).astype(np.float32)
    return ScorerData(features=rng.normal(size=(n, 64)).astype(np.float32),
                      state=rng.normal(size=(n, 4)).astype(np.float32), mean=mean,
                      actions=actions, safe=safe, advantage=(-d).astype(np.float32),
                      led_to_success=safe > 0, episode=np.arange(n) // 10)


def test_scorer_learns_exports_and_scores_batched(tmp_path):
    trained = train_scorer(_synthetic(), ScorerTrainConfig(epochs=40))
    path = tmp_path / "verifier.onnx"
    path.write_bytes(trained.onnx_bytes())
    scorer = OnnxScorer(path, trained.threshold)
    test = _synthetic(200, seed=1)
    ps = []
    for i in range(0, 200, 16):  # K = 16 candidates per call
        p, adv = scorer.score(test.features[i], test.state[i], test.mean[i], test.actions[i:i + 16])
        assert p.shape == adv.shape == (len(test.actions[i:i + 16]),)
        ps.append(p)
    p = np.concatenate(ps)
    assert np.all((p >= 0) & (p <= 1))
    # ranks safe chunks above unsafe ones much better than chance
    assert p[test.safe > 0].mean() > p[test.safe == 0].mean() + 0.2
    entry = trained.manifest_entry()
    assert entry["file"] == "verifier.onnx" and 0 <= entry["threshold"] <= 1
    # it separates the classes on held-out episodes, so it earns its veto
    assert trained.metrics["calib_auc_low"] >= 0.7 and entry["veto"] and not entry["veto_withheld"]
    assert trained.threshold > 0


def test_a_scorer_that_learned_nothing_vetoes_nothing():
    """Random labels (75% safe): calibrated P(safe) sits near the base rate for every chunk;
    a quantile-based threshold alone would veto on noise, the cap keeps the veto for chunks
    that are more likely unsafe than safe."""
    d = _synthetic(400, seed=2)
    rng = np.random.default_rng(3)
    d.safe = (rng.random(len(d)) < 0.75).astype(np.float32)
    d.led_to_success = np.ones(len(d), bool)
    trained = train_scorer(d, ScorerTrainConfig(epochs=5))
    assert trained.threshold <= 0.5
    p, _ = predict(trained.model, _synthetic(200, seed=4))
    assert (p < trained.threshold).mean() < 0.05


def test_auc_counts_ranked_pairs_and_ties():
    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auc([0.5, 0.5, 0.5, 0.5], [False, True, False, True]) == 0.5
    assert auc([0.1, 0.6, 0.4, 0.9], [False, False, True, True]) == 0.75
    assert np.isnan(auc([0.1, 0.2], [True, True]))


def test_a_veto_needs_held_out_evidence():
    cfg = ScorerTrainConfig(min_unsafe_episodes=3, min_auc=0.7)
    # 12 episodes of 10 chunks; episodes 0-5 end in 3 unsafe chunks the logit ranks low
    episode = np.repeat(np.arange(12), 10)
    safe = np.ones(120)
    for e in range(6):
        safe[e * 10 + 7:e * 10 + 10] = 0
    good = np.where(safe > 0, 2.0, -2.0) + np.random.default_rng(0).normal(0, 0.1, 120)
    a, low, why = veto_evidence(good, safe, episode, cfg)
    assert a == 1.0 and low == 1.0 and why == ""
    a, low, why = veto_evidence(-good, safe, episode, cfg)     # ranked the wrong way round
    assert a == 0.0 and "below the 0.7" in why
    two = episode < 8                                          # unsafe in 2 episodes only
    safe2 = np.where(episode >= 2, 1.0, safe)
    a, low, why = veto_evidence(good[two], safe2[two], episode[two], cfg)
    assert "in 2 of 8 held-out episodes" in why
    # right on the pooled chunks but by luck of one episode: the bootstrap bound says so
    lucky = np.where(episode == 0, good, -good)
    a, low, why = veto_evidence(lucky, safe, episode, cfg)
    assert low < a and why


def test_a_scorer_without_evidence_ships_advisory():
    """Too few held-out episodes with unsafe chunks: it trains and scores, but vetoes nothing."""
    d = _synthetic(60, seed=5)   # 6 episodes, 2 held out: about 6 unsafe chunks
    trained = train_scorer(d, ScorerTrainConfig(epochs=3, min_unsafe_episodes=50))
    assert trained.threshold == 0.0 and "at least 50" in trained.veto_withheld
    entry = trained.manifest_entry()
    assert entry["veto"] is False and entry["veto_withheld"] == trained.veto_withheld
    p, _ = predict(trained.model, _synthetic(50, seed=6))
    assert (p < trained.threshold).sum() == 0
