"""The trainer on synthetic episodes sampled from the exported policy itself (robot-side numpy
log-probs from ONNX Runtime outputs), so the first ratios must be 1."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import torch

from learner.batches import Batch, decode
from learner.model import ReferenceVLA, gaussian_log_prob
from learner.trainer import Trainer, TrainerConfig
from runtime.artifact import load_manifest, verify_artifact
from tests.learner.helpers import policy_episode
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc


def episodes(session, manifest):
    good = policy_episode(session, manifest, "r1", "good", [1.0] * 6, seed=1, success=True)
    bad = policy_episode(session, manifest, "r2", "bad", [-1.0] * 6, seed=2)
    return good, bad


def logp(trainer, records):
    with torch.no_grad():
        b = decode(records, trainer.spec)
        mean, log_std, _ = trainer.model(*b.inputs())
        return gaussian_log_prob(mean, log_std, b.actions, b.row_mask).double()


def test_first_ratio_is_one_and_policy_gradient_favours_positive_advantages(setup):
    store, registry, manifest, session = setup
    good, bad = episodes(session, manifest)
    config = TrainerConfig(bc_coef=0.0, value_coef=0.0, lr=1e-3, epochs=1, minibatch=64)
    trainer = Trainer(store, registry, config)
    before_good, before_bad = logp(trainer, good), logp(trainer, bad)
    # torch log-probs of the executed rows match the robot's numpy ones on the ONNX outputs
    np.testing.assert_allclose(before_good.numpy(), [r.behaviour_log_prob for r in good], atol=2e-4)
    m = trainer.train_on(good + bad)
    assert abs(m["ratio_start"] - 1) < 1e-3 and m["masked_frac"] == 0 and m["ess"] > 0.999
    assert m["records"] == 12 and m["episodes"] == 2 and m["steps"] == 1 and m["staleness"] == 0
    assert trainer.train_steps == 1
    assert (logp(trainer, good) - before_good).mean() > 0  # positive advantage: more likely
    assert (logp(trainer, bad) - before_bad).mean() < 0


def test_the_update_weighs_the_policys_rows_not_the_commands_the_envelope_saturated(setup):
    """Executed rows pinned at a bound are not samples of the chunk's Gaussian: the learner
    takes its probabilities of the recorded policy rows, so the first ratios are still 1."""
    store, registry, manifest, session = setup
    good = policy_episode(session, manifest, "r1", "good", [1.0] * 6, seed=1, success=True,
                          bound=0.05)
    b = decode(good, Trainer(store, registry, TrainerConfig()).spec)
    rows = b.row_mask > 0
    assert b.executed[rows].abs().max() <= 0.05 < b.actions[rows].abs().max()
    trainer = Trainer(store, registry, TrainerConfig(epochs=1, minibatch=64))
    np.testing.assert_allclose(logp(trainer, good).numpy(),
                               [r.behaviour_log_prob for r in good], atol=2e-4)
    m = trainer.train_on(good)
    assert abs(m["ratio_start"] - 1) < 1e-3 and m["masked_frac"] == 0


def test_behaviour_weights_above_the_threshold_are_masked(setup):
    store, registry, manifest, session = setup
    good, bad = episodes(session, manifest)
    for r in bad:
        r.behaviour_log_prob -= 5.0  # as if the robot's policy found these far less likely
    trainer = Trainer(store, registry, TrainerConfig(max_is_ratio=2.0, epochs=1))
    m = trainer.train_on(good + bad)
    assert m["masked_frac"] == pytest.approx(0.5)
    stale = policy_episode(session, manifest, "r3", "old", [0.0] * 3, seed=3, version=-20)
    assert trainer.train_on(stale)["dropped"]["stale"] == 3


def test_background_loop_trains_on_complete_episodes_and_publishes(setup):
    store, registry, manifest, session = setup
    good, bad = episodes(session, manifest)
    trainer = Trainer(store, registry, TrainerConfig(min_new_episodes=2, publish_interval_s=0.0,
                                                     update_episodes=1,
                                                     poll_s=0.05, epochs=1, seed=3))
    # one complete episode and most of a second one: no publish yet
    store.append(pb.ExperienceBatch(robot_id="r1", records=good))
    store.append(pb.ExperienceBatch(robot_id="r2", records=bad[:-1]))
    trainer.start()
    try:
        deadline = time.monotonic() + 20
        while trainer.train_steps == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert trainer.train_steps > 0 and registry.latest() == 1
        store.append(pb.ExperienceBatch(robot_id="r2", records=bad[-1:]))
        assert registry.wait_for_newer(1, timeout=30) == 2
    finally:
        trainer.stop()
    assert trainer.error is None and trainer.versions_published == 1
    m2 = verify_artifact(registry.artifact_dir(2))
    assert (m2.version, m2.parent_version) == (2, 1)
    assert m2.normalization == manifest.normalization
    assert registry.load_checkpoint(2)["optimizer"] is not None
    # a restarted trainer resumes from the published weights
    again = Trainer(store, registry, TrainerConfig())
    assert again.version == 2
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(),
                                                 trainer.model.state_dict().values()))


def test_an_asynchronous_update_waits_for_update_episodes_unless_a_publish_is_due(setup):
    """S > 0: no update until ``update_episodes`` complete episodes are ready; a due publish
    trains on what is ready instead of holding it."""
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(staleness=2, update_episodes=3,
                                                     min_new_episodes=1, publish_interval_s=60.0,
                                                     publish_each_update=False, epochs=1, seed=3))
    rewards = [0.5] * 3
    for i in range(2):
        store.append(pb.ExperienceBatch(robot_id=f"r{i}", records=policy_episode(
            session, manifest, f"r{i}", f"e{i}", rewards, seed=i)))
    now = trainer._last_publish + 1.0  # no publish due for another 59 s
    trainer.step(now)
    assert trainer.train_steps == 0 and len(trainer._ready) == 2
    store.append(pb.ExperienceBatch(robot_id="r2", records=policy_episode(
        session, manifest, "r2", "e2", rewards, seed=2)))
    trainer.step(now)
    assert trainer.train_steps > 0 and not trainer._ready and registry.latest() == 1
    steps = trainer.train_steps
    store.append(pb.ExperienceBatch(robot_id="r3", records=policy_episode(
        session, manifest, "r3", "e3", rewards, seed=3)))
    trainer.step(now)
    assert trainer.train_steps == steps  # 1 of 3 ready, nothing due
    trainer.step(now + 60.0)  # the publish is due: train on the one episode, then publish
    assert trainer.train_steps > steps and registry.latest() == 2


@pytest.mark.parametrize("each", [True, False])
def test_an_asynchronous_update_is_published_at_once_with_publish_each_update(setup, each):
    """S > 0 with ``publish_each_update``: the update's version goes out as soon as it is
    trained, not when ``publish_interval_s`` comes round (without it, the version waits)."""
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(staleness=2, update_episodes=2,
                                                     min_new_episodes=1, publish_interval_s=60.0,
                                                     publish_each_update=each, epochs=1, seed=3))
    for i in range(2):
        store.append(pb.ExperienceBatch(robot_id=f"r{i}", records=policy_episode(
            session, manifest, f"r{i}", f"e{i}", [0.5] * 3, seed=i)))
    trainer.step(trainer._last_publish + 1.0)
    assert trainer.train_steps > 0
    assert registry.latest() == (2 if each else 1)
    trainer.step(trainer._last_publish + 1.0)  # nothing new: no further version either way
    assert registry.latest() == (2 if each else 1)


def test_trainer_is_deterministic_given_a_seed(setup):
    store, registry, manifest, session = setup
    good, bad = episodes(session, manifest)
    runs = []
    for _ in range(2):
        t = Trainer(store, registry, TrainerConfig(seed=5, epochs=2, minibatch=5))
        m = t.train_on(good + bad)
        runs.append({k: v for k, v in m.items() if k not in ("time", "seconds")})
    assert runs[0] == runs[1]


def test_server_process_serves_trains_and_exits_cleanly(tmp_path, pretrained):
    artifact, _, _ = pretrained  # model.pt lies next to the artifact: found without a flag
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "learner", "--addr", "127.0.0.1:0", "--data", str(data),
         "--init-artifact", str(artifact), "--publish-interval", "0", "--insecure",
         "--verifier-every", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=pathlib.Path(__file__).resolve().parents[2], env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = proc.stdout.readline()
        assert line.startswith("learner listening on 127.0.0.1:"), line + proc.stderr.read()
        addr = line.split()[-1]
        deadline = time.monotonic() + 20
        while not (data / "learner.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = json.loads((data / "learner.json").read_text())
        assert status["addr"] == addr and status["latest_version"] == 1
        # a robot's view: subscribe, push two complete episodes, see version 2 announced
        manifest = load_manifest(artifact)
        session = ort.InferenceSession(str(artifact / "policy.onnx"), providers=["CPUExecutionProvider"])
        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.LearnerStub(channel)
            stream = stub.Subscribe(pb.SubscribeRequest(robot_id="r1"), timeout=60)
            assert next(stream).version == 1
            for robot, ep in zip(("r1", "r2"), episodes(session, manifest)):
                assert stub.PushExperience(pb.ExperienceBatch(robot_id=robot, records=ep)).stored == 6
            assert next(stream).version == 2
            stats = stub.GetStats(pb.StatsRequest())
            assert stats.train_steps > 0 and stats.versions_published == 1
            # SIGTERM with a subscriber still attached: the stream ends, the process exits 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, proc.stderr.read()
            # --verifier-every 1 reached the trainer: it tried to retrain the scorer at the
            # publish (two short episodes are too few, so the version shipped without one)
            assert "verifier scorer not retrained" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_rolled_back_canary_sends_the_trainer_back_to_the_stable_weights(setup):
    from learner.canary import CanaryConfig, RolloutController
    from learner.verifier_fleet_train import FleetScorerConfig
    from tests.learner.test_canary import _records
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(epochs=1, minibatch=64,
                                                     verifier=FleetScorerConfig(every=0)))
    stable = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rollout = RolloutController(registry, None, CanaryConfig(fraction=0.5, episodes=2),
                                on_rollback=trainer.revert_to)
    for robot in ("a", "b"):
        rollout.join(robot)
    good, bad = episodes(session, manifest)
    trainer.train_on(good + bad)
    assert trainer.publish().version == 2
    assert {rollout.assignment(r).version for r in "ab"} == {1, 2}  # v2 is the canary
    trainer.train_on(good + bad)
    assert trainer.publish().version == 3  # trained on from v2's weights while v2 is out
    rollout.observe(_records("x", 1, [True] * 6))
    rollout.observe(_records("y", 2, [False, False], start=10))
    assert rollout.evaluate() == "rolled back"
    assert rollout.rolled_back == {2, 3} and rollout.decisions[-1]["descendants_rolled_back"] == [3]
    assert {rollout.assignment(r).version for r in "ab"} == {1}  # v3 is never announced
    # the next publish drops the update made on the rolled back lineage and reverts instead
    assert trainer.publish() is None and trainer.reverts == 1
    assert all(torch.equal(stable[k], v) for k, v in trainer.model.state_dict().items())
    assert trainer.publish().version == 4  # versions stay monotonic
    assert {rollout.assignment(r).version for r in "ab"} == {1, 4}  # v4 goes out as a canary


def test_frozen_modules_keep_their_cloned_weights_while_the_rest_trains(setup):
    store, registry, manifest, session = setup
    good, bad = episodes(session, manifest)
    config = TrainerConfig(frozen=["encoders", "embed"], lr=1e-3, epochs=1, minibatch=64)
    trainer = Trainer(store, registry, config)
    assert config.frozen == ("encoders", "embed")  # a JSON list is kept as a tuple
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_on(good + bad)
    after = dict(trainer.model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    frozen = {n for n in before if n.startswith(("encoders.", "embed."))}
    assert frozen and not moved & frozen
    assert "mean_head.weight" in moved and "trunk.0.weight" in moved
    with pytest.raises(ValueError, match="'encoder' names no parameter.*encoders"):
        Trainer(store, registry, TrainerConfig(frozen=["encoder"]))
    # () trains every module, the encoders too
    trainer = Trainer(store, registry, TrainerConfig(frozen=(), lr=1e-3, epochs=1, minibatch=64))
    trainer.train_on(good + bad)
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in frozen)


def test_an_encoded_batch_gives_the_images_outputs_and_only_to_its_own_encoders(setup):
    """``Batch.encoded``: the network's outputs from the cached encoder features equal those
    from the images; a model with other encoder weights is handed the images."""
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(seed=1))
    good, bad = episodes(session, manifest)
    batch = decode(good + bad, trainer.spec)
    encoded = batch.encoded(trainer.model)
    with torch.no_grad():
        raw = trainer.model(*batch.inputs())
        fast = trainer.model(*encoded.select(torch.arange(len(batch))).inputs_for(trainer.model))
    for a, b in zip(raw, fast):
        assert torch.allclose(a, b, atol=1e-6)
    other = ReferenceVLA(trainer.model.config)
    other.load_state_dict(trainer.model.state_dict())
    assert encoded.inputs_for(other)[0] is encoded.features  # bit for bit the same encoders
    with torch.no_grad():
        other.encoders["front"].proj.bias.add_(0.1)
    assert encoded.inputs_for(other)[0] is encoded.images


def test_an_update_with_frozen_encoders_is_the_same_with_the_images_encoded_once(setup, monkeypatch):
    """The trainer encodes a batch once when the encoders are frozen; the update must be the
    one it makes from the images on every pass (same losses, same weights after)."""
    store, registry, manifest, session = setup
    good, bad = episodes(session, manifest)
    runs = []
    for encode in (True, False):
        if not encode:
            monkeypatch.setattr(Batch, "encoded", lambda self, model, size=256: self)
        t = Trainer(store, registry, TrainerConfig(seed=5, epochs=2, minibatch=5))
        assert t.config.frozen == ("encoders",)
        m = t.train_on(good + bad)
        runs.append((m, [p.detach().clone() for p in t.model.parameters()]))
    (m1, w1), (m2, w2) = runs
    for k in ("loss_pg", "loss_value", "kl_update", "clip_frac"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-4, abs=1e-7), k
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(w1, w2))


def test_a_registry_keeping_fewer_versions_than_the_staleness_window_is_named(setup, caplog):
    store, registry, *_ = setup
    registry.keep_versions = 4
    with caplog.at_level("WARNING", logger="tether.learner"):
        Trainer(store, registry, TrainerConfig(staleness=3))
    assert not [r for r in caplog.records if "keep-versions" in r.getMessage()]
    with caplog.at_level("WARNING", logger="tether.learner"):
        Trainer(store, registry, TrainerConfig(staleness=4))
    assert [r for r in caplog.records if "--keep-versions 5 keeps them all" in r.getMessage()]
