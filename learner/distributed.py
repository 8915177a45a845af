"""Data-parallel training with torch.distributed: gloo on CPUs, NCCL on GPUs.

Rank 0 is the learner as one process runs it (store, gRPC service, registry, publishing) and
drives the others, which only train. Per update rank 0 chooses the records as usual, sends them
to every rank as serialized ChunkRecords (a uint8 tensor; no pickle), and each rank trains on an
equal share with the same number of minibatch steps. Between backward() and the optimizer step
(``Trainer.after_backward``) the gradients are averaged with all_reduce, so every rank takes the
same step and the replicas stay bit-identical -- checked after every update.

Commands from rank 0 (a small int64 header, then its payload, all broadcasts):

    HELLO    the trainer config (JSON)         VERSION  a version's manifest + checkpoint
    BUILD    build the trainer, then params    TRAIN    records for one update
    HEARTBEAT  nothing to do yet               STOP     exit cleanly

A rank that dies or stops answering makes the others fail within ``timeout_s`` with a
DistributedError that says so; rank 0 then stops training (ingest goes on) like any trainer error.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import pathlib
import socket
import subprocess
import sys
import time

import torch

from learner.distributed_group import (DistConfig, DistributedError, DistributedTrainer, Group,
                                       Worker, log)
from learner.trainer import Trainer

__all__ = ["DistConfig", "DistributedError", "DistributedTrainer", "Group", "Worker",
           "add_arguments", "from_args", "trainer_class", "worker_main", "exit_rank",
           "spawn_local", "stop_local"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data-parallel training (torch.distributed)")
    g.add_argument("--world-size", type=int, default=None,
                   help="trainer ranks; alone, starts ranks 1..N-1 on this machine "
                        "(default: $WORLD_SIZE under torchrun, else 1)")
    g.add_argument("--rank", type=int, default=None, help="this process's rank (default: $RANK)")
    g.add_argument("--dist-addr", default=None,
                   help="HOST:PORT where rank 0 meets the others (default: MASTER_ADDR:MASTER_PORT)")
    g.add_argument("--dist-backend", default="auto", help="auto | gloo | nccl")
    g.add_argument("--dist-timeout", type=float, default=DistConfig.timeout_s,
                   help="seconds a rank waits for the others before failing")


def from_args(args: argparse.Namespace, env: dict | None = None) -> DistConfig:
    """Flags first, then torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK)."""
    env = os.environ if env is None else env
    world = args.world_size if args.world_size is not None else int(env.get("WORLD_SIZE", 1))
    under_torchrun = args.rank is None and "RANK" in env
    rank = args.rank if args.rank is not None else int(env.get("RANK", 0))
    addr = args.dist_addr or ""
    if not addr and not under_torchrun and args.rank is not None and world > 1:
        raise ValueError("--rank needs --dist-addr HOST:PORT (rank 0's address) or torchrun's "
                         "MASTER_ADDR/MASTER_PORT")
    spawn = world > 1 and args.rank is None and not under_torchrun
    heartbeat = min(DistConfig.heartbeat_s, args.dist_timeout / 4)
    local_world = world if spawn else int(env.get("LOCAL_WORLD_SIZE", 1))
    return DistConfig(rank=rank, world_size=world, addr=addr, backend=args.dist_backend,
                      timeout_s=args.dist_timeout, heartbeat_s=heartbeat, spawn_local=spawn,
                      local_rank=int(env.get("LOCAL_RANK", 0)), local_world=local_world)


def trainer_class(config: DistConfig):
    """What rank 0 runs: the plain Trainer alone, DistributedTrainer with other ranks."""
    if not config.enabled:
        return Trainer
    return functools.partial(DistributedTrainer, dist_config=config)


def worker_main(config: DistConfig, data: str | pathlib.Path) -> int:
    """``tether learner --rank R`` for R > 0: train with rank 0 until it says stop."""
    home = pathlib.Path(data) / "ranks" / f"rank{config.rank}"
    try:
        return Worker(config, home).run()
    except DistributedError as e:
        print(f"tether learner: {e}", file=sys.stderr)
        return 1


def exit_rank(code: int):
    """End a trainer rank's process (rank > 0) after ``worker_main``: its group is closed and
    there is nothing left to write, so flush and leave without the interpreter's teardown, where
    C++ threads and destructors can abort a finished process. A gloo rank once died in CI of
    SIGABRT ("terminate called without an active exception"; docs/scale.md, Known limits); a
    rank's exit status should say how its work ended."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or gone: nothing to lose
            pass
    os._exit(code)


# -- ranks started by rank 0 on this machine ---------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_local(config: DistConfig, data: str | pathlib.Path
                ) -> tuple[DistConfig, list[subprocess.Popen]]:
    """Start ranks 1..N-1 as ``tether learner --rank R`` processes; rank 0's config to use."""
    if not config.spawn_local:
        return config, []
    config = dataclasses.replace(config, addr=config.addr or f"127.0.0.1:{free_port()}")
    logs = pathlib.Path(data) / "ranks"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(1, config.world_size):
        cmd = [sys.executable, "-m", "tether.cli", "learner", "--data", str(data),
               "--rank", str(rank), "--world-size", str(config.world_size),
               "--dist-addr", config.addr, "--dist-backend", config.resolved_backend,
               "--dist-timeout", str(config.timeout_s)]
        env = dict(os.environ, LOCAL_RANK=str(rank % max(1, torch.cuda.device_count())))
        with open(logs / f"rank{rank}.log", "w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env))
    log.info("started trainer ranks 1..%d (logs in %s)", config.world_size - 1, logs)
    return config, procs


def stop_local(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """Ranks normally exit on rank 0's STOP; anything left is terminated, then killed."""
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.terminate()
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
