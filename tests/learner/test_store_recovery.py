"""kill -9 the learner under load, restart it, and check the store: every acknowledged record is
there exactly once, and no batch is half visible.

The learner is a real process (the store, the registry and the gRPC service of
``learner.service.serve``) with small segments, so kills also land mid-seal. Robots are real
spools and ``ExperienceClient`` streams in this process: a batch counts as acknowledged once its
spool file is gone (the client deletes it only on the learner's ack).
"""
import collections
import pathlib
import random
import subprocess
import sys
import threading
import time

from learner.store import ExperienceStore
from runtime.spool import Spool
from runtime.stream import ExperienceClient
from tests.learner.helpers import simple_record

ROOT = pathlib.Path(__file__).resolve().parents[2]
ROBOTS = 4
RECORDS_PER_BATCH = 16
KILLS = 3
SERVER = """
import sys, threading
from learner.registry import Registry
from learner.service import serve
from learner.store import ExperienceStore
data, port = sys.argv[1], sys.argv[2]
store = ExperienceStore(data + "/experience", readonly=False, segment_bytes=256 * 1024)
server, bound = serve("127.0.0.1:" + port, store, Registry(data + "/registry"))
print("listening", bound, flush=True)
threading.Event().wait()
"""


def start_learner(data: pathlib.Path, port: int = 0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(data), str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["listening"], f"the learner did not start: {line}"
    return proc, int(line[1])


class Robot:
    """A spool fed by a producer thread, drained by a streaming ExperienceClient."""

    def __init__(self, root: pathlib.Path, name: str, addr: str):
        self.name = name
        self.spool = Spool(root / name, name)
        self.client = ExperienceClient(addr, self.spool, name, rpc_timeout_s=2.0,
                                       backoff_cap_s=0.2, window=4)
        self.batches: dict[int, list[tuple]] = {}  # batch_seq -> record keys
        self.lock = threading.Lock()
        self.template = simple_record(robot=name)
        self.producing = threading.Event()
        self.thread = threading.Thread(target=self._produce, daemon=True)

    def start(self) -> None:
        self.producing.set()
        self.client.start()
        self.thread.start()

    def _produce(self) -> None:
        episode = 0
        while self.producing.is_set():
            records = []
            for i in range(RECORDS_PER_BATCH):
                r = type(self.template)()
                r.CopyFrom(self.template)
                r.seq, r.episode_id = self.spool.next_record_seq(), f"e{episode}"
                r.terminated = i == RECORDS_PER_BATCH - 1 and episode % 2 == 0
                records.append(r)
            episode += 1
            with self.lock:  # registered before it exists on disk: acked = registered - spooled
                batch_seq = self.spool.append(records)
                self.batches[batch_seq] = [(self.name, r.episode_id, r.seq) for r in records]
            time.sleep(0.01)

    def acknowledged(self) -> tuple[set, dict]:
        """(keys of acknowledged batches, all batches registered) at this moment."""
        with self.lock:
            batches = dict(self.batches)
        pending = {seq for seq, _ in self.spool.peek(10**6)}
        return {k for seq, keys in batches.items() if seq not in pending for k in keys}, batches


def stored_keys(data: pathlib.Path) -> collections.Counter:
    store = ExperienceStore(data / "experience", readonly=True)  # what a restart would see
    try:
        return collections.Counter((r.robot_id, r.episode_id, r.seq) for _, r in
                                   store.read(0, 10**7))
    finally:
        store.close()


def check(data: pathlib.Path, robots: list[Robot]) -> int:
    stored = stored_keys(data)
    duplicated = [k for k, n in stored.items() if n > 1]
    assert not duplicated, f"stored more than once: {duplicated[:5]}"
    acked_total = 0
    for robot in robots:
        acked, batches = robot.acknowledged()
        missing = acked - set(stored)
        assert not missing, f"{len(missing)} acknowledged records lost, e.g. {sorted(missing)[:3]}"
        for seq, keys in batches.items():
            present = sum(k in stored for k in keys)
            assert present in (0, len(keys)), f"{robot.name} batch {seq}: {present}/{len(keys)}"
        acked_total += len(acked)
    return acked_total


def test_kill_9_under_load_loses_and_duplicates_nothing(tmp_path):
    rng = random.Random(5)
    data = tmp_path / "learner"
    proc, port = start_learner(data)
    robots = [Robot(tmp_path / "robots", f"r{i}", f"127.0.0.1:{port}") for i in range(ROBOTS)]
    for robot in robots:
        robot.start()
    acked_before = 0
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(1.0, 2.5))
            proc.kill()  # SIGKILL: no close, no flush, at whatever point the writer was
            proc.wait()
            acked = check(data, robots)
            assert acked > acked_before, "no batch was acknowledged between two kills"
            acked_before = acked
            proc, _ = start_learner(data, port)
        for robot in robots:
            robot.producing.clear()
            robot.thread.join()
        for robot in robots:
            assert robot.client.drain(30.0), f"{robot.name} could not deliver its spool"
    finally:
        for robot in robots:
            robot.producing.clear()
            robot.client.stop()
        proc.kill()
        proc.wait()
    stored = stored_keys(data)
    sent = {k for robot in robots for keys in robot.batches.values() for k in keys}
    assert set(stored) == sent and max(stored.values()) == 1  # everything, exactly once
    assert sum(r.client.batches_quarantined for r in robots) == 0
    assert list((data / "experience" / "segments").glob("*.parquet")), "no segment was sealed"
