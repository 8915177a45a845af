"""Training resumes from the last complete checkpoint: model, optimizer, RNGs, version and store
position (pending episodes neither lost nor trained twice), in-process and across a kill -9."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import onnxruntime as ort
import torch

from learner.registry import Registry
from learner.store import ExperienceStore
from learner.trainer import Trainer, TrainerConfig
from runtime.artifact import load_manifest
from tests.learner.helpers import policy_episode
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

REPO = pathlib.Path(__file__).resolve().parents[2]


def episode(session, manifest, name, n=4, success=False, version=1):
    return policy_episode(session, manifest, f"robot-{name}", name, [0.5] * (n - 1) + [1.0],
                          seed=sum(map(ord, name)), success=success, version=version)


def push(store, records):
    store.append(pb.ExperienceBatch(robot_id=records[0].robot_id, records=records))


def same_tensors(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_a_new_trainer_resumes_the_old_ones_state_and_makes_the_same_next_update(tmp_path, pretrained):
    artifact, ckpt, _ = pretrained
    registry = Registry(tmp_path / "reg")
    manifest = registry.import_initial(artifact, ckpt)
    session = ort.InferenceSession(str(registry.artifact_dir(1) / "policy.onnx"),
                                   providers=["CPUExecutionProvider"])
    store = ExperienceStore(tmp_path / "exp")
    # no publish inside step(): this test publishes by hand, once
    config = TrainerConfig(staleness=2, min_new_episodes=1, publish_interval_s=1e9,
                           publish_each_update=False, epochs=2, update_episodes=2,
                           minibatch=3, replay_sample=2, seed=7)
    old = Trainer(store, registry, config)
    a, b, c = (episode(session, manifest, n, success=n == "a") for n in "abc")
    running = episode(session, manifest, "running", n=6)
    push(store, a)
    push(store, running[:3])  # an episode still running at the checkpoint
    push(store, b)
    push(store, c)
    assert old.step() and old.train_steps > 0
    old.publish()
    assert registry.latest() == 2 and set(old.feed.pending) == {("robot-running", "running")}

    new = Trainer(store, registry, config)  # the learner restarted here
    assert new.version == old.version == 2 and new.train_steps == old.train_steps
    assert same_tensors(new.model.state_dict(), old.model.state_dict())
    assert same_tensors(new.optimizer.state_dict(), old.optimizer.state_dict())
    assert torch.equal(new._gen.get_state(), old._gen.get_state())
    assert new._rng.bit_generator.state == old._rng.bit_generator.state
    assert new.feed.cursor == old.feed.cursor
    assert {k: [r.seq for r in e.records] for k, e in new.feed.pending.items()} == \
        {("robot-running", "running"): [0, 1, 2]}
    assert [e.key for e in new._replay] == [e.key for e in old._replay]
    assert (new._ret_mean, new._ret_std) == (old._ret_mean, old._ret_std)
    assert same_tensors(new.proximal.ewma_state(), old.proximal.ewma_state())
    ckpt2 = registry.load_checkpoint(2)  # plain data: read with weights_only=True
    assert ckpt2["trainer"]["position"]["cursor"] == old.feed.cursor

    # the same new data: the running episode ends, another arrives
    push(store, running[3:])
    push(store, episode(session, manifest, "d", version=2))
    m_old, m_new = old.step(), new.step()
    assert m_old and m_new
    strip = lambda m: {k: v for k, v in m.items() if k not in ("time", "seconds")}
    assert strip(old.last_metrics) == strip(new.last_metrics)
    assert old.last_metrics["episodes"] == 2 + 2  # running + d, and 2 replayed: none twice
    assert same_tensors(new.model.state_dict(), old.model.state_dict())
    store.close()


def _start(data, artifact, *extra):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "learner", "--addr", "127.0.0.1:0", "--data", str(data),
         "--init-artifact", str(artifact), "--publish-interval", "0", "--min-episodes", "1",
         "--staleness", "3", "--insecure", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    line = proc.stdout.readline()
    if not line.startswith("learner listening on "):
        proc.kill()
        raise AssertionError(line + proc.stderr.read())
    return proc, line.split()[-1]


def _updates(data) -> list[dict]:
    path = data / "updates.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_learner_killed_after_a_publish_resumes_at_that_version(tmp_path, pretrained):
    artifact, _, _ = pretrained
    data = tmp_path / "data"
    manifest = load_manifest(artifact)
    session = ort.InferenceSession(str(artifact / "policy.onnx"), providers=["CPUExecutionProvider"])
    running = episode(session, manifest, "running", n=6)
    proc, addr = _start(data, artifact)
    try:
        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.LearnerStub(channel)
            stream = stub.Subscribe(pb.SubscribeRequest(robot_id="r"), timeout=60)
            assert next(stream).version == 1
            stub.PushExperience(pb.ExperienceBatch(robot_id="robot-running", records=running[:3]))
            ep_a = episode(session, manifest, "a", success=True)
            stub.PushExperience(pb.ExperienceBatch(robot_id="robot-a", records=ep_a))
            assert next(stream).version == 2
            stream.cancel()
        deadline = time.monotonic() + 20
        while not _updates(data) and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    before = _updates(data)
    assert before and before[-1]["records"] == 4 and before[-1]["version"] == 1

    proc, addr = _start(data, artifact)
    try:
        with grpc.insecure_channel(addr) as channel:
            stub = pb_grpc.LearnerStub(channel)
            stream = stub.Subscribe(pb.SubscribeRequest(robot_id="r"), timeout=60)
            assert next(stream).version == 2  # the version survived; no re-import of v1
            stub.PushExperience(pb.ExperienceBatch(robot_id="robot-running", records=running[3:]))
            assert next(stream).version == 3
            stream.cancel()
        deadline = time.monotonic() + 20
        while len(_updates(data)) < len(before) + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
        log = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "resumed at version 2" in log
    after = _updates(data)[len(before):]
    # the episode that was running at the kill trains once, whole (its first half came back
    # from the checkpointed position), with episode a replayed from the restored window
    assert after[0]["version"] == 2 and after[0]["episodes"] == 2 and after[0]["records"] == 6 + 4
    registry = Registry(data / "registry")
    assert registry.latest() == 3
    steps = [registry.load_checkpoint(v)["trainer"]["train_steps"] for v in (2, 3)]
    assert steps[0] < steps[1]
