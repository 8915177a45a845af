"""The live learner trains the verifier's scorer at publish time and ships it in the artifact."""
import numpy as np

from learner.trainer import Trainer, TrainerConfig
from learner.verifier_fleet_train import FleetScorerConfig, scorer_data
from learner.verifier_train import ScorerTrainConfig
from runtime.artifact import verify_artifact
from tests.learner.helpers import policy_episode
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


def _failed(ep):
    """The episode ends in a failure signal (terminated without success), not a time limit."""
    ep[-1].truncated, ep[-1].terminated = False, True
    return ep


def test_labels_and_advantages_come_from_the_records(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(verifier=FLEET))
    won, timed_out = fleet_episodes(session, manifest, 2)
    failed = _failed(fleet_episodes(session, manifest, 2)[1])
    eps = [won, timed_out, failed]
    d = scorer_data(trainer.model, trainer.spec, eps, 0.9, lookahead=4)
    assert len(d) == 18 and d.actions.shape == d.mean.shape == (18, 8, 4)
    assert d.safe[:6].tolist() == [1.0] * 6
    # 4 ticks per chunk, T = 4: chunk 1 reaches into the clamped chunk 2; running out of time
    # is not unsafe, a failure signal makes the last chunks unsafe
    assert d.safe[6:12].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert d.safe[12:].tolist() == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert d.led_to_success.tolist() == [True] * 6 + [False] * 12
    assert d.advantage[:6].mean() > d.advantage[6:].mean()
    # the candidate looks like the robot's: committed prefix, executed rows, and fresh draws
    # from the policy's Gaussian (not its mean) on the rows that did not run
    r = won[1]
    np.testing.assert_allclose(d.actions[1, list(r.offsets)],
                               np.frombuffer(r.actions.data, np.float32).reshape(-1, 4), atol=1e-6)
    prefix = np.frombuffer(r.prefix.data, np.float32).reshape(8, 4)
    np.testing.assert_allclose(d.actions[1, :r.prefix_len], prefix[:r.prefix_len])
    rest = [i for i in range(int(r.prefix_len), 8) if i not in r.offsets]
    assert rest and not np.allclose(d.actions[1, rest], d.mean[1, rest])


def test_each_published_version_ships_a_trained_scorer(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(verifier=FLEET, epochs=1))
    assert trainer.publish().extra.get("verifier") is None  # no episodes yet: no scorer
    eps = fleet_episodes(session, manifest)
    trainer.train_on([r for ep in eps for r in ep])
    trainer.remember([r for ep in eps for r in ep])
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


def test_advantage_targets_are_in_return_units_with_the_trainers_bonus(setup):
    """The value head regresses normalized returns: the scorer's advantage target must undo
    that scaling (else it is the raw return minus a number of another unit), add the success
    bonus the trainer adds, bootstrap a truncated episode, and follow ``advantage_lambda``."""
    import torch

    from learner.batches import decode
    from learner.ppo import lambda_returns

    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(verifier=FLEET))
    eps = fleet_episodes(session, manifest, 3)
    batch = decode([r for ep in eps for r in ep], trainer.spec)
    with torch.no_grad():
        v = trainer.model.policy_and_value(*batch.inputs())[2].double().numpy()
    for lam in (0.0, 1.0):
        d = scorer_data(trainer.model, trainer.spec, eps, 0.9, lookahead=4,
                        value_scale=(3.0, 20.0), success_bonus=5.0, lam=lam)
        raw, want, i = v * 20.0 + 3.0, [], 0
        for ep in eps:
            vv = raw[i:i + len(ep)]
            i += len(ep)
            g = lambda_returns([r.reward + 5.0 * r.success for r in ep], vv, 0.9, lam,
                               0.0 if ep[-1].terminated else vv[-1])
            want.append(np.asarray(g) - vv)
        want = np.concatenate(want)
        np.testing.assert_allclose(d.advantage, (want - want.mean()) / (want.std() + 1e-8),
                                   rtol=1e-3, atol=1e-3)
