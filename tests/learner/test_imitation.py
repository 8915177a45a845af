"""The aggregated imitation set (learner/imitation.py) and the trainer's imitation optimizer:
demonstrations kept for good, the fleet's successful and operator chunks added once each, a
bounded ring, pretraining's objective, and its optimizer state in the checkpoint."""
import numpy as np
import pytest
import torch

from learner.batches import decode
from learner.demos import DemoSet
from learner.imitation import ImitationSet
from learner.trainer import Trainer, TrainerConfig
from runtime.tensors import to_proto
from tests.learner.helpers import policy_episode, simple_record


def demo_set(episodes=2, ticks=5, seed=0) -> DemoSet:
    rng = np.random.default_rng(seed)
    n = episodes * ticks
    return DemoSet(images=rng.integers(0, 255, (n, 48, 48, 3), dtype=np.uint8),
                   state=rng.normal(size=(n, 4)).astype(np.float32),
                   actions=rng.uniform(-1, 1, (n, 4)).astype(np.float32),
                   task_index=np.zeros(n, np.int64), episode=np.repeat(np.arange(episodes), ticks),
                   step=np.tile(np.arange(ticks), episodes), episode_task=np.zeros(episodes, np.int64),
                   episode_success=np.ones(episodes, bool), tasks=("reach",),
                   instructions=("reach the goal",))


def chunk(seq, d, n, robot="r1"):
    """A record continuing d committed rows (its prefix) with n executed rows at offsets d..."""
    r = simple_record(robot=robot, seq=seq, n=n, rng=np.random.default_rng(seq))
    prefix = np.zeros((8, 4), np.float32)
    prefix[:d] = np.random.default_rng(100 + seq).uniform(-1, 1, (d, 4))
    r.prefix.CopyFrom(to_proto(prefix))
    r.prefix_len = d
    del r.offsets[:]
    r.offsets.extend(range(d, d + n))
    return r


def test_a_fleet_chunk_goes_in_once_as_its_prefix_then_its_executed_rows(setup):
    _, registry, _, _ = setup
    trainer = Trainer(None, registry, TrainerConfig())
    data = ImitationSet(trainer.spec.config, capacity=3)
    records = [chunk(1, d=2, n=3), chunk(2, d=0, n=4), chunk(3, d=1, n=2)]
    batch = decode(records, trainer.spec)
    keys = [(r.robot_id, r.seq) for r in records]
    take = torch.tensor([True, True, False])
    human = torch.tensor([False, True, False])
    assert data.add(batch, take, human, keys) == 2
    assert data.add(batch, take, human, keys) == 0  # replayed in a later update: not again
    assert data.fleet == 2 and data.added == {"demonstration": 0, "intervention": 1, "success": 1}
    target, valid = data._fleet["target"][0], data._fleet["valid"][0]
    np.testing.assert_array_equal(target[:2], batch.prefix[0, :2].numpy())
    np.testing.assert_array_equal(target[2:5], batch.actions[0, 2:5].numpy())
    assert valid.tolist() == [True] * 5 + [False] * 3
    assert data._fleet["valid"][1].tolist() == [True] * 4 + [False] * 4
    np.testing.assert_array_equal(data._fleet["image_front"][0].transpose(1, 2, 0),
                                  np.frombuffer(records[0].observation.images["front"].data,
                                                np.uint8).reshape(48, 48, 3))
    # the ring: the oldest chunk makes room, and may come back later
    more = [chunk(4, 0, 2), chunk(5, 0, 2)]
    data.add(decode(more, trainer.spec), torch.tensor([True, True]), torch.tensor([False, False]),
             [(r.robot_id, r.seq) for r in more])
    assert data.fleet == 3 and ("r1", 1) not in data._held and ("r1", 5) in data._held
    only_first = torch.tensor([True, False, False])
    assert data.add(batch, only_first, human, keys) == 1  # seq 1 was pushed out: back in
    assert ("r1", 1) in data._held and ("r1", 2) not in data._held  # ... in seq 2's place


def test_demonstrations_are_kept_and_sampled_with_the_fleet(setup):
    _, registry, _, _ = setup
    trainer = Trainer(None, registry, TrainerConfig())
    data = ImitationSet(trainer.spec.config, capacity=4)
    demos = demo_set()
    assert data.add_demos(demos, trainer.spec) == 10 and len(data) == 10
    np.testing.assert_allclose(data._demos["state"],
                               (demos.state - trainer.spec.state_mean) / trainer.spec.state_std,
                               rtol=1e-6)
    records = [chunk(i, 0, 6) for i in range(6)]
    data.add(decode(records, trainer.spec), torch.ones(6, dtype=torch.bool),
             torch.zeros(6, dtype=torch.bool), [(r.robot_id, r.seq) for r in records])
    assert len(data) == 10 + 4 and data.demonstrations == 10  # the ring is full; demos stay
    rng = np.random.default_rng(0)
    s = data.sample(400, rng)
    assert s["image_front"].shape == (400, 3, 48, 48) and s["target"].shape == (400, 8, 4)
    from_fleet = s["valid"].sum(1) == 6  # fleet chunks here have 6 known rows, demos 1..5
    assert 0.15 < from_fleet.mean() < 0.45  # ~4 / 14 of the draws
    with pytest.raises(ValueError, match="do not fit"):
        data.add_demos(DemoSet(**{**demo_set().__dict__,
                                  "state": np.zeros((10, 3), np.float32)}), trainer.spec)


def test_the_imitation_optimizer_fits_the_set_and_is_checkpointed(setup):
    store, registry, manifest, session = setup
    config = TrainerConfig(imitation_lr=1e-3, imitation_steps=20, imitation_batch=16, epochs=1)
    trainer = Trainer(store, registry, config, demos=demo_set())
    fixed = trainer.imitation.sample(64, np.random.default_rng(1))

    def fit() -> float:
        with torch.no_grad():
            return float(trainer.imitation.loss(trainer.model, fixed,
                                                torch.Generator().manual_seed(0), 0.0))

    before = fit()
    won = policy_episode(session, manifest, "robot-a", "a", [0.5, 0.5, 1.0], seed=3, success=True)
    lost = policy_episode(session, manifest, "robot-b", "b", [0.5, 0.5, 0.5], seed=4)
    m = trainer.train_on(won + lost)
    assert m["imitation_fleet"] == len(won) and m["imitation_set"] == 10 + len(won)
    assert trainer.imitation_steps == 20 and m["loss_imitation"] > 0
    assert fit() < 0.8 * before
    trainer.publish()
    ckpt = registry.load_checkpoint()
    saved = ckpt["trainer"]["imitation_optimizer"]
    assert saved["state"] and saved["param_groups"][0]["lr"] == 1e-3
    resumed = Trainer(store, registry, config, demos=demo_set())
    a, b = resumed.imitation_optimizer.state_dict()["state"], saved["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[k]["exp_avg"], b[k]["exp_avg"]) for k in a)


def test_imitation_lr_zero_leaves_only_the_policy_gradients_imitation_term(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(imitation_lr=0.0), demos=demo_set())
    won = policy_episode(session, manifest, "robot-a", "a", [1.0], seed=3, success=True)
    m = trainer.train_on(won)
    assert trainer.imitation is None and "loss_imitation" not in m and m["loss_bc"] != 0


def test_the_learner_reads_the_demonstrations_next_to_its_initial_artifact(setup, tmp_path):
    from learner.server import find_demos

    store, registry, _, _ = setup
    artifact = tmp_path / "pre" / "artifact"
    artifact.mkdir(parents=True)
    assert find_demos(str(artifact), None) == ""  # none there: the set starts with the fleet's
    demo_set().save(artifact.parent / "demos.npz")
    path = find_demos(str(artifact), None)
    assert path == str(artifact.parent / "demos.npz")
    trainer = Trainer(store, registry, TrainerConfig(demos=path, imitation_steps=8))
    assert trainer.imitation.demonstrations == 10
    # with the imitation steps off (the default) the set, and so the file, is not needed
    assert Trainer(store, registry, TrainerConfig(demos=path)).imitation is None
    with pytest.raises(SystemExit, match="does not exist"):
        find_demos(str(artifact), str(tmp_path / "missing.npz"))
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(RuntimeError, match="cannot be read"):
        Trainer(store, registry, TrainerConfig(demos=str(tmp_path / "torn.npz"), imitation_steps=8))
