"""The live learner trains the verifier's scorer at publish time and ships it in the artifact."""
import numpy as np

from learner.trainer import Trainer, TrainerConfig
from learner.verifier_fleet_train import FleetScorerConfig, scorer_data
from learner.verifier_train import ScorerTrainConfig
from runtime.artifact import verify_artifact
from tests.learner.helpers import policy_episode
from tests.learner.test_trainer import pretrained, setup  # noqa: F401 (fixtures)
from verifier.scorer import OnnxScorer

FLEET = FleetScorerConfig(min_chunks=16, min_episodes=4,
                          train=ScorerTrainConfig(epochs=2, lookahead_ticks=4))


def fleet_episodes(session, manifest, n=6):
    out = []
    for i in range(n):
        won = i % 2 == 0
        ep = policy_episode(session, manifest, f"r{i}", f"e{i}", [float(won)] * 6, seed=i,
                            success=won)
        if not won:
            ep[2].verifier.actions_clamped = 3  # the envelope intervened in chunk 2
        out.append(ep)
    return out


def test_labels_and_advantages_come_from_the_records(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(verifier=FLEET))
    eps = fleet_episodes(session, manifest, 2)
    d = scorer_data(trainer.model, trainer.spec, eps, 0.9, lookahead=4)
    assert len(d) == 12 and d.actions.shape == d.mean.shape == (12, 8, 4)
    won, lost = d.safe[:6], d.safe[6:]
    assert won.tolist() == [1.0] * 6
    # 4 ticks per chunk, T = 4: chunk 1 reaches into the clamped chunk 2; the last chunks of a
    # failed episode are unsafe
    assert lost.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert d.led_to_success.tolist() == [True] * 6 + [False] * 6
    assert d.advantage[:6].mean() > d.advantage[6:].mean()
    # executed rows keep the executed actions; the rest of the chunk is the policy mean
    r = eps[0][1]
    np.testing.assert_allclose(d.actions[1, list(r.offsets)],
                               np.frombuffer(r.actions.data, np.float32).reshape(-1, 4), atol=1e-6)
    rest = [i for i in range(8) if i not in r.offsets]
    np.testing.assert_allclose(d.actions[1, rest], d.mean[1, rest])


def test_each_published_version_ships_a_trained_scorer(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(verifier=FLEET, epochs=1))
    assert trainer.publish().extra.get("verifier") is None  # no episodes yet: no scorer
    eps = fleet_episodes(session, manifest)
    trainer.train_on([r for ep in eps for r in ep])
    trainer._replay.extend(eps)
    m = trainer.publish()
    assert "verifier.onnx" in m.files and 0 <= m.extra["verifier"]["threshold"] <= 1
    m = verify_artifact(registry.artifact_dir(m.version))
    scorer = OnnxScorer.from_artifact(registry.artifact_dir(m.version), m)
    p, adv = scorer.score(np.zeros(scorer.features, np.float32), np.zeros(4, np.float32),
                          np.zeros((8, 4), np.float32), np.zeros((16, 8, 4), np.float32))
    assert p.shape == adv.shape == (16,) and np.all((p >= 0) & (p <= 1))
    # with the window emptied, the next version keeps the last trained scorer
    trainer._replay.clear()
    assert "verifier.onnx" in trainer.publish().files
    off = Trainer(store, registry, TrainerConfig(verifier=FleetScorerConfig(every=0)))
    assert "verifier.onnx" not in off.publish().files
