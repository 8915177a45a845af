"""Data-parallel trainer throughput: seconds per update with 1..N gloo ranks on one machine.

Each rank is a process with one torch thread; rank 0 is the real DistributedTrainer (world
size 1: the plain Trainer) and the others real Workers. The update is the trainer's own
(decoupled PPO, 2 epochs, minibatch 64 per rank) on synthetic episodes whose behaviour
log-probabilities are the policy's own, so nothing is masked.

    .venv/bin/python -m sim.bench_distributed --ranks 1,2 --records 1024
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import pathlib
import tempfile
import time


def _records(n: int, episode_len: int = 16):
    import numpy as np
    from runtime.tensors import to_proto
    from tether.wire import tether_pb2 as pb
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        seq, last = i % episode_len, i % episode_len == episode_len - 1
        out.append(pb.ChunkRecord(
            robot_id=f"r{i // episode_len % 8}", episode_id=f"e{i // episode_len}", seq=seq,
            policy_version=1, task="reach", reward=float(rng.normal()), terminated=last,
            success=last and i % 3 == 0,
            observation=pb.Observation(
                images={"front": to_proto(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))},
                state=to_proto(rng.normal(size=4).astype(np.float32)),
                instruction="reach the goal", timestamp=float(seq)),
            prefix=to_proto(np.zeros((8, 4), np.float32)), prefix_len=0,
            actions=to_proto(rng.uniform(-1, 1, (4, 4)).astype(np.float32)), offsets=[0, 1, 2, 3]))
    return out


def _registry(root: pathlib.Path):
    import torch
    from learner.export import export_artifact
    from learner.model import ReferenceVLA, VLAConfig
    from learner.registry import Registry
    torch.manual_seed(0)
    model = ReferenceVLA(VLAConfig())
    norm = {"state_mean": [0.0] * 4, "state_std": [1.0] * 4,
            "action_mean": [0.0] * 4, "action_std": [1.0] * 4}
    export_artifact(model, root / "art", version=1, parent_version=0, normalization=norm,
                    robot="sawyer_metaworld", control_rate_hz=25.0)
    torch.save(model.state_dict(), root / "model.pt")
    registry = Registry(root / "registry")
    registry.import_initial(root / "art", root / "model.pt")
    return registry


def _rank(rank: int, world: int, addr: str, root: str, records: int, updates: int, out: str):
    import torch
    torch.set_num_threads(1)
    from learner.distributed import DistConfig, DistributedTrainer, Worker
    from learner.proximal import batch_log_probs
    from learner.batches import decode
    from learner.trainer import Trainer, TrainerConfig
    config = DistConfig(rank=rank, world_size=world, addr=addr, backend="gloo", timeout_s=300)
    if rank > 0:
        Worker(config, pathlib.Path(root) / f"rank{rank}").run()
        return
    registry = _registry(pathlib.Path(root))
    tc = TrainerConfig(epochs=2, minibatch=64, staleness=4)
    trainer = Trainer(None, registry, tc) if world == 1 else \
        DistributedTrainer(None, registry, tc, dist_config=config)
    data = _records(records)
    logp = batch_log_probs(trainer.model, decode(data, trainer.spec), 64)
    for r, lp in zip(data, logp.tolist()):
        r.behaviour_log_prob = lp
    if world > 1:
        trainer.join()
    trainer.train_on(data)  # warm-up
    t0 = time.perf_counter()
    steps = sum(trainer.train_on(data)["steps"] for _ in range(updates))
    seconds = (time.perf_counter() - t0) / updates
    if world > 1:
        trainer.group.stop_others()
        trainer.group.close()
    pathlib.Path(out).write_text(json.dumps({
        "ranks": world, "records": records, "seconds_per_update": round(seconds, 3),
        "records_per_s": round(records / seconds, 1),
        "steps_per_update_per_rank": steps // updates}))


def run(world: int, records: int = 1024, updates: int = 3) -> dict:
    from learner.distributed import free_port
    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as root:
        addr, out = f"127.0.0.1:{free_port()}", pathlib.Path(root) / "result.json"
        procs = [ctx.Process(target=_rank, args=(r, world, addr, root, records, updates, str(out)))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode for p in procs):
            raise RuntimeError(f"a rank failed: exit codes {[p.exitcode for p in procs]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.bench_distributed",
                                description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2", help="comma-separated world sizes")
    p.add_argument("--records", type=int, default=1024, help="records per update")
    p.add_argument("--updates", type=int, default=3, help="timed updates (after one warm-up)")
    a = p.parse_args(argv)
    results = [run(int(w), a.records, a.updates) for w in a.ranks.split(",")]
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
