"""An experience client process for the fault tests: simulated robots without a simulator.

``python -m tests.faults.stream_client --addr HOST:PORT --dir D --robots r0,r1 ...`` runs, per
robot, a real ``Spool`` and a real ``ExperienceClient`` (the robot-side code), fed by a producer
thread with episodes the learner can train on (the pretrained model's shapes). Each acknowledged
batch is appended to ``D/<robot>/acked.log`` and fsynced before the spool deletes it, so what a
client counts as acknowledged survives any crash and can be checked against the store. Prints
``ready``, streams until it reads ``stop DRAIN_S`` on stdin, drains, and prints one JSON line of
results per process (tests/faults/procs.py ``Clients`` drives it).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import sys
import threading
import time


def _record_templates(n: int, seed: int):
    """Records the pretrained model can train on: one 48x48 camera, state 4, 4 actions of dim
    4 at offsets 0..3 of a horizon of 16 (the pretrained reference VLA, learner/pretrain.py)."""
    import numpy as np

    from runtime.tensors import to_proto
    from tether.wire import tether_pb2 as pb
    rng = np.random.default_rng(seed)
    return [pb.ChunkRecord(
        policy_version=1, task="reach-v3", observation=pb.Observation(
            images={"front": to_proto(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))},
            state=to_proto(rng.normal(size=4).astype(np.float32)), instruction="reach the goal"),
        prefix=to_proto(np.zeros((16, 4), np.float32)), prefix_len=0,
        actions=to_proto(rng.uniform(-1, 1, (4, 4)).astype(np.float32)), offsets=[0, 1, 2, 3],
        behaviour_log_prob=-3.0, reward=float(rng.uniform(0, 1))) for _ in range(n)]


class _LoggedSpool:
    """Mixin for runtime.spool.Spool: every acknowledged batch is logged durably first."""

    def init_log(self, path: pathlib.Path) -> None:
        self.keys: dict[int, tuple[str, int, int]] = {}  # batch_seq -> (episode, first seq, n)
        self._log = open(path, "a")
        self._log_lock = threading.Lock()

    def ack(self, batch_seq: int) -> None:
        key = self.keys.pop(batch_seq, None)  # a second ack of a resend is not news
        if key is not None:
            with self._log_lock:
                self._log.write(f"{batch_seq} {key[0]} {key[1]} {key[2]}\n")
                self._log.flush()
                os.fsync(self._log.fileno())
        super().ack(batch_seq)


def main(argv=None) -> int:
    from runtime.spool import Spool
    from runtime.stream import ExperienceClient

    p = argparse.ArgumentParser(prog="python -m tests.faults.stream_client")
    p.add_argument("--addr", required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--robots", required=True)
    p.add_argument("--per-batch", type=int, default=16)
    p.add_argument("--interval", type=float, default=0.1)
    p.add_argument("--episode-records", type=int, default=40)
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    LoggedSpool = type("LoggedSpool", (_LoggedSpool, Spool), {})
    stop = threading.Event()
    robots = []
    for i, robot in enumerate(a.robots.split(",")):
        home = pathlib.Path(a.dir) / robot
        spool = LoggedSpool(home / "spool", robot)
        spool.init_log(home / "acked.log")
        client = ExperienceClient(a.addr, spool, robot, rpc_timeout_s=5.0, backoff_cap_s=0.5)
        client._latencies = collections.deque(maxlen=1 << 20)  # every ack, for the p99
        thread = threading.Thread(target=_producer, daemon=True, args=(
            spool, stop, robot, a.per_batch, a.interval, a.episode_records, i))
        robots.append((robot, spool, client, thread))
    print("ready", flush=True)
    for _, _, client, thread in robots:
        client.start()
        thread.start()
    line = sys.stdin.readline().split()  # "stop DRAIN_S" (or EOF: the test went away)
    drain_s = float(line[1]) if len(line) > 1 else 30.0
    stop.set()
    for _, _, _, thread in robots:
        thread.join()
    deadline = time.monotonic() + drain_s
    results = []
    for robot, spool, client, _ in robots:
        drained = client.drain(max(0.1, deadline - time.monotonic()))
        client.stop()
        results.append({"robot": robot, "drained": drained, "spooled": spool.records_spooled,
                        "pending": spool.pending(), "quarantined": spool.records_quarantined,
                        "batches_acked": client.batches_acked, "errors": client.errors,
                        "latencies_ms": [round(1e3 * x, 3) for x in client._latencies]})
    print(json.dumps(results), flush=True)
    return 0


def _producer(spool, stop: threading.Event, robot: str, per_batch: int, interval_s: float,
              episode_records: int, seed: int) -> None:
    """Batches of one episode at a time (seqs contiguous within an episode, as on a robot);
    each batch's keys are registered before it reaches the spool, so an ack always finds them."""
    templates = _record_templates(8, seed)
    episode, in_episode = 0, 0
    next_at = time.monotonic()
    while not stop.is_set():
        ep = f"{robot}-{os.getpid()}-{episode:05d}"
        n = min(per_batch, episode_records - in_episode)
        records = []
        for k in range(n):
            r = type(templates[0])()
            r.CopyFrom(templates[(in_episode + k) % len(templates)])
            r.robot_id, r.episode_id, r.seq = robot, ep, spool.next_record_seq()
            r.observation.timestamp = time.time()
            records.append(r)
        in_episode += n
        if in_episode >= episode_records:
            last = records[-1]
            last.terminated = last.success = episode % 2 == 0
            last.truncated = not last.terminated
            episode, in_episode = episode + 1, 0
        # keys registered before the batch exists, so its ack (which may come at once) finds
        # them; the spool's write lock (re-entrant) keeps its next batch_seq ours meanwhile
        with spool._io:
            batch_seq = spool._next_batch
            spool.keys[batch_seq] = (ep, records[0].seq, n)
            if spool.append(records) != batch_seq:
                raise RuntimeError(f"{robot}: spool batch_seq moved under the producer")
        next_at += interval_s
        stop.wait(max(0.0, next_at - time.monotonic()))


if __name__ == "__main__":
    sys.exit(main())
