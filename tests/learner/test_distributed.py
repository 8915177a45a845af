"""Data-parallel training across real processes (gloo, world size 2, loopback).

Each rank is its own process, as in a deployment; results come back through files.
"""
import faulthandler
import hashlib
import json
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from learner.distributed import (DistConfig, DistributedTrainer, Group, Worker, exit_rank,
                                 free_port)
from learner.distributed_state import DistributedError, shard_bounds
from learner.trainer import Trainer, TrainerConfig

REPO = pathlib.Path(__file__).resolve().parents[2]
SPAWN = multiprocessing.get_context("spawn")
CONFIG = TrainerConfig(epochs=2, minibatch=64, lr=1e-3, seed=3, staleness=1)


def digest(model, optimizer) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.numpy().tobytes())
    for slots in optimizer.state_dict()["state"].values():
        for k in sorted(slots):
            h.update(torch.as_tensor(slots[k]).numpy().tobytes())
    return h.hexdigest()


def make_registry(root: pathlib.Path):
    """A registry with the tiny pretrained policy as version 1, and an ONNX session on it."""
    import onnxruntime as ort
    from learner.registry import Registry
    from tests.learner.helpers import make_artifact
    artifact, ckpt, _ = make_artifact(root)
    registry = Registry(root / "registry")
    manifest = registry.import_initial(artifact, ckpt)
    session = ort.InferenceSession(str(registry.artifact_dir(1) / "policy.onnx"),
                                   providers=["CPUExecutionProvider"])
    return registry, manifest, session


def episodes(session, manifest, seed: int, version: int = 1):
    """Three episodes, 19 records."""
    from tests.learner.helpers import policy_episode
    return [r for i, (n, ok) in enumerate([(6, True), (5, False), (8, False)])
            for r in policy_episode(session, manifest, f"r{i}", f"e{seed}-{i}",
                                    [1.0 if ok else -0.5] * n, seed=seed + i, success=ok,
                                    version=version)]


def run_rank0(addr, root, timeout, mode):
    torch.set_num_threads(1)
    root = pathlib.Path(root)
    registry, manifest, session = make_registry(root)
    if mode == "resume":  # a learner that trained alone before: its checkpoint has Adam state,
        alone = Trainer(None, registry, CONFIG)  # RNG, EWMA, return statistics
        alone.train_on(episodes(session, manifest, seed=0))
        alone.publish()
    trainer = DistributedTrainer(None, registry, CONFIG, dist_config=DistConfig(
        rank=0, world_size=2, addr=addr, timeout_s=timeout, heartbeat_s=timeout / 4,
        backend="gloo"))
    out = {"start": digest(trainer.model, trainer.optimizer)}
    t0 = time.monotonic()
    try:
        trainer.join()
        (root / "joined").touch()
        if mode == "die":  # the test kills or freezes rank 1 now
            while not (root / "go").exists():
                time.sleep(0.05)
            t0 = time.monotonic()
        m1 = trainer.train_on(episodes(session, manifest, seed=10))
        trainer.publish()  # rank 1 mirrors the new version's checkpoint
        trainer.sync_versions()
        # at version 3 with staleness 1, a version-1 episode is too stale: rank 0 drops it
        # before sharing out, as the trainer would, so both ranks still get 9 records
        stale = episodes(session, manifest, seed=30)[:6]
        m2 = trainer.train_on(stale + episodes(session, manifest, seed=20, version=3))
        trainer.group.stop_others()
        out.update(steps=[m1["steps"], m2["steps"]], records=[m1["records"], m2["records"]],
                   all_ranks=m1["records_all_ranks"], version=trainer.version,
                   dropped=m2["records_dropped_before_sharing"])
    except DistributedError as e:
        out.update(error=str(e), seconds=time.monotonic() - t0)
    out["end"] = digest(trainer.model, trainer.optimizer)
    trainer.group.close()
    (root / "rank0.json").write_text(json.dumps(out))


def run_rank1(addr, root, timeout):
    torch.set_num_threads(1)
    worker = Worker(DistConfig(rank=1, world_size=2, addr=addr, timeout_s=timeout,
                               heartbeat_s=timeout / 4, backend="gloo"), pathlib.Path(root) / "rank1")
    out = {}
    try:
        out["rc"] = worker.run()
        out.update(end=digest(worker.trainer.model, worker.trainer.optimizer),
                   version=worker.trainer.version, updates=worker.updates,
                   mirrored=sorted(p.name for p in (worker.registry.root / "checkpoints").iterdir()))
    except DistributedError as e:
        out["error"] = str(e)
    (pathlib.Path(root) / "rank1.json").write_text(json.dumps(out))


def as_rank(target, *args):
    """A rank's process: a crash prints its Python stack, and a rank that finished exits as
    `tether learner --rank` does (learner.distributed.exit_rank)."""
    faulthandler.enable()
    target(*args)
    exit_rank(0)


def start(target, *args):
    p = SPAWN.Process(target=as_rank, args=(target, *args), daemon=True)
    p.start()
    return p


def test_ranks_hold_bit_identical_parameters_after_updates(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    procs = [start(run_rank0, addr, str(tmp_path), 30.0, "resume"),
             start(run_rank1, addr, str(tmp_path), 30.0)]
    for p in procs:
        p.join(90)
        assert p.exitcode == 0, p.exitcode
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert "error" not in r0 and "error" not in r1, (r0, r1)
    # 19 records, 2 ranks: 9 each (the first record of the first episode is left over)
    assert r0["records"] == [9, 9] and r0["all_ranks"] == 18 and r0["dropped"] == 6
    assert r0["steps"] == [2, 2]  # 2 epochs x 1 minibatch per update, on both ranks
    assert r0["end"] != r0["start"]  # the updates moved the weights...
    assert r1["end"] == r0["end"]  # ...identically on both ranks (parameters and Adam state)
    # rank 0 resumed at version 2 and published 3; rank 1 mirrored their checkpoints
    assert r1["rc"] == 0 and r1["updates"] == 2 and r1["version"] == r0["version"] == 3
    assert r1["mirrored"] == ["v000001.pt", "v000002.pt", "v000003.pt"]


def run_grad_rank(rank, addr, out):
    """One SGD step of the imitation loss on this rank's half, gradients averaged by the hook."""
    torch.set_num_threads(1)
    model, opt, batch = grad_setup()
    group = Group(DistConfig(rank=rank, world_size=2, addr=addr, timeout_s=30, heartbeat_s=5,
                             backend="gloo"))
    group.join()
    group.attach(model, opt)
    lo, hi = shard_bounds(len(batch), rank, 2)
    loss = imitation_loss(model, batch.select(torch.arange(lo, hi)))
    opt.zero_grad()
    loss.backward()
    group.average_gradients(model)
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    group.finish_update()
    group.close()
    np.savez(out, **{f"grad/{n}": g for n, g in grads.items()},
             **{f"param/{n}": p.detach().numpy() for n, p in model.named_parameters()})


def grad_setup():
    from learner.batches import DecodeSpec, decode
    from learner.model import ReferenceVLA, VLAConfig
    from tests.learner.helpers import simple_record
    torch.manual_seed(5)
    config = VLAConfig()
    model = ReferenceVLA(config)
    spec = DecodeSpec(config, np.zeros(4, np.float32), np.ones(4, np.float32),
                      {"kind": "bytes", "max_len": config.max_tokens})
    records = [simple_record("r", f"e{i // 4}", i, n=3) for i in range(12)]
    return model, torch.optim.SGD(model.parameters(), lr=0.5), decode(records, spec)


def imitation_loss(model, batch):
    from learner.model import gaussian_log_prob
    mean, log_std, value = model.policy_and_value(*batch.inputs())
    logp = gaussian_log_prob(mean, log_std, batch.actions, batch.row_mask)
    return -(logp / batch.row_mask.sum(-1)).mean() + value.square().mean()


def test_averaged_gradient_step_equals_a_single_process_step_on_the_union(tmp_path):
    addr = f"127.0.0.1:{free_port()}"
    procs = [start(run_grad_rank, r, addr, str(tmp_path / f"rank{r}.npz")) for r in (0, 1)]
    torch.set_num_threads(1)
    model, opt, batch = grad_setup()  # meanwhile: the same step in one process on all 12
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    imitation_loss(model, batch).backward()
    opt.step()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    assert set(ranks[0].files) == set(ranks[1].files)
    compared = 0
    for n, p in model.named_parameters():
        for r in ranks:
            assert np.array_equal(r[f"param/{n}"], ranks[0][f"param/{n}"])  # bit-identical
            np.testing.assert_allclose(r[f"param/{n}"], p.detach().numpy(), rtol=1e-5, atol=1e-6)
        if p.grad is None:  # parameters this loss does not touch keep grad None on every rank
            assert f"grad/{n}" not in ranks[0].files
        else:
            np.testing.assert_allclose(ranks[0][f"grad/{n}"], p.grad.numpy(), rtol=1e-4, atol=1e-6)
            compared += int(p.grad.abs().max() > 0)
    assert compared >= 10
    # and the step was not a no-op: a rank that ignored the other's half would fail above
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_a_rank_that_dies_or_hangs_fails_the_others_with_a_clear_error(tmp_path, fault):
    timeout = 4.0
    addr = f"127.0.0.1:{free_port()}"
    rank0 = start(run_rank0, addr, str(tmp_path), timeout, "die")
    rank1 = start(run_rank1, addr, str(tmp_path), timeout)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "joined").exists():
            assert time.monotonic() < deadline and rank0.is_alive(), "rank 0 did not join"
            time.sleep(0.1)
        os.kill(rank1.pid, fault)
        (tmp_path / "go").touch()
        rank0.join(timeout + 30)
        assert rank0.exitcode == 0, "rank 0 hung or crashed instead of failing cleanly"
    finally:
        if rank1.is_alive():
            os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(5)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    assert "another rank died or stopped answering" in r0["error"], r0
    assert "Restart every rank" in r0["error"]
    assert r0["seconds"] < timeout + 10
    assert r0["end"] == r0["start"]  # no half-averaged step was applied


def test_config_from_flags_and_torchrun_env():
    from learner.distributed import add_arguments, from_args
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    local = from_args(p.parse_args(["--world-size", "3"]), env={})
    assert local.spawn_local and local.world_size == 3 and local.rank == 0 and local.local_world == 3
    assert not from_args(p.parse_args([]), env={}).enabled
    env = {"RANK": "2", "WORLD_SIZE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
           "LOCAL_RANK": "1"}
    run = from_args(p.parse_args([]), env=env)
    assert (run.rank, run.world_size, run.local_rank, run.addr, run.spawn_local) == (2, 4, 1, "", False)
    with pytest.raises(ValueError, match="--dist-addr"):
        from_args(p.parse_args(["--rank", "1", "--world-size", "2"]), env={})
    with pytest.raises(ValueError, match="rank < world_size"):
        DistConfig(rank=2, world_size=2)


def test_tether_learner_world_size_2_trains_with_a_local_second_rank(tmp_path):
    """The command a team runs: rank 0 starts rank 1 itself; both train, rank 1 stops with it."""
    import grpc
    import onnxruntime as ort
    from runtime.artifact import load_manifest
    from tests.learner.helpers import make_artifact
    from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc
    artifact, _, _ = make_artifact(tmp_path)
    data = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", "learner", "--addr", "127.0.0.1:0", "--data", str(data),
         "--init-artifact", str(artifact), "--publish-interval", "0", "--min-episodes", "1",
         "--canary-fraction", "0", "--world-size", "2", "--dist-timeout", "30", "--dist-backend", "gloo",
         "--insecure"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        line = proc.stdout.readline()
        assert line.startswith("learner listening on"), line + proc.stderr.read()
        manifest = load_manifest(artifact)
        session = ort.InferenceSession(str(artifact / "policy.onnx"), providers=["CPUExecutionProvider"])
        with grpc.insecure_channel(line.split()[-1]) as channel:
            stub = pb_grpc.LearnerStub(channel)
            for update in (1, 2):  # two updates, each published
                records = episodes(session, manifest, seed=10 * update)
                for robot in sorted({r.robot_id for r in records}):
                    batch = [r for r in records if r.robot_id == robot]
                    assert stub.PushExperience(pb.ExperienceBatch(robot_id=robot, records=batch),
                                               timeout=30).stored == len(batch)
                deadline = time.monotonic() + 60
                while stub.GetStats(pb.StatsRequest(), timeout=10).versions_published < update:
                    if time.monotonic() > deadline or proc.poll() is not None:
                        proc.kill()
                        pytest.fail(f"no version {update + 1}: {proc.communicate()[1][-3000:]}")
                    time.sleep(0.2)
        status = json.loads((data / "learner.json").read_text())
        assert status["trainer_error"] is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.communicate()[1][-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    updates = [json.loads(line) for line in (data / "updates.jsonl").read_text().splitlines()]
    assert len(updates) >= 2 and all(u["steps"] > 0 for u in updates)
    assert json.loads((data / "learner.json").read_text())["last_update"]["world_size"] == 2
    rank1 = (data / "ranks" / "rank1.log").read_text()
    assert "rank 1: update 2 at version" in rank1, rank1[-2000:]
    assert "stopped by rank 0 after" in rank1, rank1[-2000:]  # a clean exit, not a timeout
