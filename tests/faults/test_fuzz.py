"""Fault 6, fuzzing: malformed and adversarial gRPC messages against a real learner process.

The learner is its own process (store, registry with version 1, ``learner.service.serve`` with
its interceptors), on loopback. The fuzzer speaks raw bytes on the real method paths (gRPC
generic calls, identity serializers), so nothing on the client side can tidy a message up:
random bytes on every method, messages over the learner's size limit, NaN fields, wrong shapes
and dtypes, absurd declared sizes, wrong and mismatched ids, replayed (and altered replays of)
stored sequences, streams that turn to garbage after good batches, path traversal and bad
offsets on FetchArtifact, hostile Subscribe requests. Valid batches are mixed in.

Checked: every call ends with a status from the expected set for its kind (never UNKNOWN or
INTERNAL); the process is alive and answers a normal call afterwards; the store holds exactly
the valid records sent, each byte-identical.

Also here, the robot's side of the size limit: ``ExperienceClient`` splits a spooled batch over
the learner's message limit into pushes that fit, and quarantines a record too large for any
message, instead of retrying a RESOURCE_EXHAUSTED batch forever.
"""
import collections
import pathlib
import random
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from learner.store import ExperienceStore
from tests.faults.report import record, size
from tests.learner.helpers import simple_record
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICE = "/tether.v1.Learner/"
C = grpc.StatusCode
SERVER = """
import sys, threading
from learner.registry import Registry
from learner.service import serve
from learner.store import ExperienceStore
data, artifact = sys.argv[1], sys.argv[2]
registry = Registry(data + "/registry")
registry.import_initial(artifact)
store = ExperienceStore(data + "/experience")
server, bound = serve("127.0.0.1:0", store, registry, max_workers=16)
print("listening", bound, flush=True)
threading.Event().wait()
"""
LEARNER_LIMIT = 32 * 1024 * 1024
CHANNEL = [("grpc.max_send_message_length", 3 * LEARNER_LIMIT),
           ("grpc.max_receive_message_length", 3 * LEARNER_LIMIT)]


def start_learner(data: pathlib.Path, artifact: pathlib.Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(data), str(artifact)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().split()
    assert line[:1] == ["listening"], f"the learner did not start: {line}"
    return proc, int(line[1])


class Fuzzer:
    """Builds one adversarial message at a time; keeps the valid records it sent."""

    def __init__(self, channel: grpc.Channel, seed: int = 0):
        self.ch = channel
        self.rng = random.Random(seed)
        self.nprng = np.random.default_rng(seed)
        self.valid: dict[tuple, bytes] = {}      # (robot, episode, seq) -> record bytes
        self.sent_batches: list[pb.ExperienceBatch] = []
        self.seq = collections.Counter()
        self.codes: collections.Counter = collections.Counter()
        self.by_kind: collections.Counter = collections.Counter()
        self.unexpected: list[tuple] = []
        self.messages = 0
        self._big = None

    # -- building blocks ---------------------------------------------------------------------
    def _record(self, robot: str, **change) -> pb.ChunkRecord:
        r = simple_record(robot=robot, episode=f"e{self.seq[robot] // 4}", seq=self.seq[robot],
                          rng=self.nprng)
        self.seq[robot] += 1
        for k, v in change.items():
            setattr(r, k, v)
        return r

    def _batch(self, robot: str, records, batch_seq: int = 1) -> pb.ExperienceBatch:
        return pb.ExperienceBatch(robot_id=robot, batch_seq=batch_seq, records=records)

    def _robot(self) -> str:
        return f"fz{self.rng.randrange(4)}"

    def _random_bytes(self, n_max: int = 2048) -> bytes:
        return self.rng.randbytes(self.rng.randrange(n_max))

    # -- calls -------------------------------------------------------------------------------
    def _unary(self, method: str, payload: bytes):
        try:
            return C.OK, self.ch.unary_unary(SERVICE + method)(payload, timeout=30)
        except grpc.RpcError as e:
            return e.code(), e.details()

    def _server_stream(self, method: str, payload: bytes):
        call = self.ch.unary_stream(SERVICE + method)(payload, timeout=30)
        try:
            first = next(call)
            call.cancel()  # Subscribe never ends by itself: one answer is enough
            return C.OK, first
        except StopIteration:
            return call.code(), None
        except grpc.RpcError as e:
            return e.code(), e.details()

    def _stream(self, payloads: list[bytes]):
        call = self.ch.stream_stream(SERVICE + "StreamExperience")(iter(payloads), timeout=30)
        acks = []
        try:
            for ack in call:
                acks.append(pb.Ack.FromString(ack))
            return C.OK, acks
        except grpc.RpcError as e:
            return e.code(), acks

    def _done(self, kind: str, code, expected: set, note=""):
        self.messages += 1
        self.codes[code.name] += 1
        self.by_kind[kind] += 1
        if code not in expected:
            self.unexpected.append((kind, code.name, str(note)[:200]))

    def _push_valid(self, batch: pb.ExperienceBatch, kind: str, stream: bool) -> None:
        data = batch.SerializeToString()
        code, ack = self._stream([data]) if stream else self._unary("PushExperience", data)
        if code == C.OK:
            ack = pb.Ack.FromString(ack) if isinstance(ack, bytes) else ack[0]
            for r in batch.records:
                self.valid[(r.robot_id, r.episode_id, r.seq)] = r.SerializeToString(
                    deterministic=True)
            self.sent_batches.append(batch)
            if ack.stored != len(batch.records):
                self.unexpected.append((kind, "stored", f"{ack.stored} of {len(batch.records)}"))
        self._done(kind, code, {C.OK}, ack)

    # -- the message kinds -------------------------------------------------------------------
    def valid_batch(self):
        robot = self._robot()
        batch = self._batch(robot, [self._record(robot) for _ in range(self.rng.randint(1, 3))])
        self._push_valid(batch, "valid", stream=self.rng.random() < 0.5)

    def replay(self):
        if not self.sent_batches:
            return self.valid_batch()
        old = self.rng.choice(self.sent_batches)
        batch = pb.ExperienceBatch()
        batch.CopyFrom(old)
        altered = self.rng.random() < 0.5
        if altered:  # same keys, other contents: the stored originals must not change
            for r in batch.records:
                r.reward += 1.0
        code, ack = self._unary("PushExperience", batch.SerializeToString())
        ok = code == C.OK and pb.Ack.FromString(ack).duplicates == len(batch.records)
        self._done("replay_altered" if altered else "replay", code if ok else C.DATA_LOSS, {C.OK},
                   ack)

    def random_bytes(self):
        method = self.rng.choice(["PushExperience", "StreamExperience", "Subscribe",
                                  "FetchArtifact", "GetStats"])
        payload = self._random_bytes()
        # bytes that happen to parse as a batch of a robot with no records store nothing: OK
        if method == "PushExperience":
            code, note = self._unary(method, payload)
            expected = {C.INVALID_ARGUMENT, C.OK}
        elif method == "StreamExperience":
            code, note = self._stream([payload])
            expected = {C.INVALID_ARGUMENT, C.OK}
        elif method == "Subscribe":
            code, note = self._server_stream(method, payload)
            expected = {C.INVALID_ARGUMENT, C.OK}
        elif method == "FetchArtifact":
            code, note = self._server_stream(method, payload)
            expected = {C.INVALID_ARGUMENT, C.NOT_FOUND, C.OUT_OF_RANGE}
        else:
            code, note = self._unary(method, payload)
            expected = {C.INVALID_ARGUMENT, C.OK}
        self._done(f"random_bytes:{method}", code, expected, note)

    def bad_record(self):
        """A batch with one record that is wrong in one way; refused whole."""
        robot = self._robot()
        good = [self._record(robot) for _ in range(self.rng.randint(0, 2))]
        r = simple_record(robot=robot, episode="bad", seq=10**9 + self.rng.randrange(10**6),
                          rng=self.nprng)
        how = self.rng.choice(list(BAD_RECORD))
        BAD_RECORD[how](r, self.rng)
        batch = self._batch(robot, good + [r])
        if how == "batch_robot_mismatch":
            batch.robot_id = robot + "-other"
        data = batch.SerializeToString()
        if self.rng.random() < 0.5:
            code, note = self._unary("PushExperience", data)
        else:
            code, note = self._stream([data])
        self._done(f"bad_record:{how}", code, {C.INVALID_ARGUMENT}, note)

    def good_then_garbage_stream(self):
        """Good batches, then garbage on the same stream: the good ones are acked and stored."""
        robot = self._robot()
        batches = [self._batch(robot, [self._record(robot)], batch_seq=i + 1)
                   for i in range(self.rng.randint(1, 3))]
        payloads = [b.SerializeToString() for b in batches] + [b"\xff" + self._random_bytes(64)]
        code, acks = self._stream(payloads)
        if len(acks) == len(batches):
            for b in batches:
                for r in b.records:
                    self.valid[(r.robot_id, r.episode_id, r.seq)] = r.SerializeToString(
                        deterministic=True)
                self.sent_batches.append(b)
        else:
            self.unexpected.append(("good_then_garbage", "acks", f"{len(acks)} of {len(batches)}"))
        self._done("good_then_garbage_stream", code, {C.INVALID_ARGUMENT}, acks)

    def oversized(self):
        if self._big is None:
            self._big = self.rng.randbytes(LEARNER_LIMIT + 1024)
        method = self.rng.choice(["PushExperience", "StreamExperience"])
        code, note = (self._unary(method, self._big) if method == "PushExperience"
                      else self._stream([self._big]))
        self._done(f"oversized:{method}", code, {C.RESOURCE_EXHAUSTED}, note)

    def too_many_records(self):
        r = simple_record(robot="fz0", episode="many", seq=0, n=1, rng=self.nprng)
        r.observation.images["front"].CopyFrom(pb.Tensor(dtype="uint8", shape=[1, 1, 3],
                                                         data=b"abc"))
        records = []
        for i in range(1025):
            c = pb.ChunkRecord()
            c.CopyFrom(r)
            c.seq = 2 * 10**9 + i
            records.append(c)
        code, note = self._unary("PushExperience", self._batch("fz0", records).SerializeToString())
        self._done("too_many_records", code, {C.INVALID_ARGUMENT}, note)

    def fetch(self):
        name, version, offset, expected = self.rng.choice(FETCHES)
        code, note = self._server_stream("FetchArtifact", pb.FetchRequest(
            version=version, name=name, offset=offset).SerializeToString())
        self._done("fetch:" + expected.name, code, {expected}, note)

    def subscribe(self):
        robot_id, version, expected = self.rng.choice(SUBSCRIBES)
        code, note = self._server_stream("Subscribe", pb.SubscribeRequest(
            robot_id=robot_id, current_version=version).SerializeToString())
        self._done("subscribe:" + expected.name, code, {expected}, note)

    def one(self):
        kinds = [(self.random_bytes, 30), (self.bad_record, 30), (self.valid_batch, 12),
                 (self.replay, 6), (self.good_then_garbage_stream, 5), (self.fetch, 10),
                 (self.subscribe, 4), (self.too_many_records, 0.3), (self.oversized, 0.3)]
        fn = self.rng.choices([k for k, _ in kinds], [w for _, w in kinds])[0]
        fn()


def _nan_tensor(t: pb.Tensor, rng) -> None:
    a = np.frombuffer(t.data, t.dtype).copy()
    a.reshape(-1)[rng.randrange(a.size)] = rng.choice([np.nan, np.inf, -np.inf])
    t.data = a.tobytes()


BAD_RECORD = {
    "nan_state": lambda r, rng: _nan_tensor(r.observation.state, rng),
    "nan_actions": lambda r, rng: _nan_tensor(r.actions, rng),
    "nan_prefix": lambda r, rng: _nan_tensor(r.prefix, rng),
    "nan_reward": lambda r, rng: setattr(r, "reward", float("nan")),
    "inf_log_prob": lambda r, rng: setattr(r, "behaviour_log_prob", float("-inf")),
    "nan_timestamp": lambda r, rng: setattr(r.observation, "timestamp", float("nan")),
    "actions_short_data": lambda r, rng: setattr(r.actions, "data", r.actions.data[:-4]),
    "actions_3d": lambda r, rng: r.actions.shape.append(1),
    "actions_huge_shape": lambda r, rng: (r.actions.ClearField("shape"),
                                          r.actions.shape.extend([2**40, 2**40])),
    "negative_dim": lambda r, rng: (r.actions.ClearField("shape"), r.actions.shape.extend([-2, -4])),
    "bad_dtype": lambda r, rng: setattr(r.actions, "dtype", rng.choice(["object", "float16", "",
                                                                        "<f4", "complex64"])),
    "image_2d": lambda r, rng: r.observation.images["front"].shape.pop(),
    "image_huge_declared": lambda r, rng: (r.observation.images["front"].ClearField("shape"),
                                           r.observation.images["front"].shape.extend(
                                               [2**31, 2**31, 3])),
    "no_images": lambda r, rng: r.observation.ClearField("images"),
    "state_2d": lambda r, rng: r.observation.state.shape.append(1),
    "offsets_count": lambda r, rng: r.offsets.append(7),
    "offsets_unsorted": lambda r, rng: (r.ClearField("offsets"), r.offsets.extend([1, 0])),
    "prefix_len_too_big": lambda r, rng: setattr(r, "prefix_len", 99),
    "prefix_wrong_dim": lambda r, rng: (r.prefix.ClearField("shape"),
                                        r.prefix.shape.extend([4, 8])),
    "empty_robot_id": lambda r, rng: setattr(r, "robot_id", ""),
    "empty_episode_id": lambda r, rng: setattr(r, "episode_id", ""),
    "huge_robot_id": lambda r, rng: setattr(r, "robot_id", "x" * 10_000),
    "record_robot_mismatch": lambda r, rng: setattr(r, "robot_id", "someone-else"),
    "batch_robot_mismatch": lambda r, rng: None,
    "seq_over_int64": lambda r, rng: setattr(r, "seq", 2**64 - 1),
    "huge_instruction": lambda r, rng: setattr(r.observation, "instruction", "y" * 100_000),
    "too_many_cameras": lambda r, rng: [r.observation.images[f"c{i}"].CopyFrom(
        r.observation.images["front"]) for i in range(9)],
}

FETCHES = [(name, 1, 0, C.NOT_FOUND) for name in (
    "../../../etc/passwd", "/etc/passwd", "..", ".", "", "manifest.json/..", "policy.onnx\x00.txt",
    "versions/v000001/policy.onnx", "../LATEST", "..%2fLATEST", "policy.onnx/", "x" * 10_000,
    "../checkpoints/v000001.pt", "\\..\\..\\LATEST")]
FETCHES += [("manifest.json", v, 0, C.NOT_FOUND) for v in (0, -1, 2, 2**62, -(2**62))]
FETCHES += [("policy.onnx", 1, off, C.OUT_OF_RANGE) for off in (-1, -(2**62), 2**62, 10**9)]
FETCHES += [("manifest.json", 1, 0, C.OK)]
SUBSCRIBES = [("r" * 10_000, 0, C.INVALID_ARGUMENT), ("fz0", -5, C.OK), ("fz1", 2**62, C.OK),
              ("", 0, C.OK), ("fz2\x00\n", 1, C.OK)]


@pytest.mark.timeout(900)
def test_fuzzed_messages_never_crash_the_learner_nor_store_garbage(tiny_artifact, tmp_path):
    n = size(1_000, 10_000)
    proc, port = start_learner(tmp_path / "learner", tiny_artifact)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL)
    fuzz = Fuzzer(channel, seed=7)
    t0 = time.monotonic()
    try:
        fuzz.oversized()  # each kind at least once, then at random
        fuzz.too_many_records()
        while fuzz.messages < n:
            fuzz.one()
            assert proc.poll() is None, f"the learner died after {fuzz.messages} messages"
        elapsed = time.monotonic() - t0
        stats = pb_grpc.LearnerStub(channel).GetStats(pb.StatsRequest(), timeout=10)
        assert proc.poll() is None, "the learner died"
    finally:
        channel.close()
        proc.kill()
        proc.wait(10)
    assert not fuzz.unexpected, f"{len(fuzz.unexpected)} unexpected answers: {fuzz.unexpected[:5]}"
    assert not {"UNKNOWN", "INTERNAL"} & set(fuzz.codes), fuzz.codes

    store = ExperienceStore(tmp_path / "learner" / "experience", readonly=True)
    try:
        stored = collections.Counter()
        mismatched = []
        for _, r in store.read(0, 10**7):
            key = (r.robot_id, r.episode_id, r.seq)
            stored[key] += 1
            if fuzz.valid.get(key) != r.SerializeToString(deterministic=True):
                mismatched.append(key)
    finally:
        store.close()
    garbage = set(stored) - set(fuzz.valid)
    lost = set(fuzz.valid) - set(stored)
    duplicated = sum(c - 1 for c in stored.values())
    assert stats.records_stored == len(fuzz.valid)
    assert not garbage and not lost and not duplicated and not mismatched, \
        (sorted(garbage)[:3], sorted(lost)[:3], duplicated, mismatched[:3])
    record("fuzz", injected=fuzz.messages - fuzz.by_kind["valid"], sent=len(fuzz.valid),
           stored=sum(stored.values()), lost=len(lost), duplicated=duplicated, robot_stops=0,
           messages=fuzz.messages, status_codes=dict(fuzz.codes),
           kinds=len(fuzz.by_kind), learner_alive=True, seconds=round(elapsed, 1))


def test_client_split_matches_the_learner_limit():
    from learner.service import MAX_MESSAGE_BYTES
    from runtime.stream import LEARNER_MAX_MESSAGE_BYTES, MAX_BATCH_BYTES
    assert LEARNER_MAX_MESSAGE_BYTES == MAX_MESSAGE_BYTES == LEARNER_LIMIT
    assert MAX_BATCH_BYTES < LEARNER_MAX_MESSAGE_BYTES


def test_oversized_batches_are_split_or_quarantined_not_retried_forever(tmp_path):
    """Real sizes: a 36 MiB batch of three 12 MiB records goes in parts; a batch holding one
    36 MiB record (three 12 MiB cameras) is quarantined after its other record is stored."""
    from learner.registry import Registry
    from learner.service import serve
    from runtime.spool import CORRUPT, Spool
    from runtime.stream import ExperienceClient

    def big(seq: int, cameras: int = 1) -> pb.ChunkRecord:
        r = simple_record(robot="r-big", episode="e", seq=seq)
        img = pb.Tensor(dtype="uint8", shape=[2048, 2048, 3], data=bytes([seq % 256]) * (12 << 20))
        r.observation.images["front"].CopyFrom(img)
        for i in range(1, cameras):
            r.observation.images[f"cam{i}"].CopyFrom(img)
        return r

    store = ExperienceStore(tmp_path / "experience")
    registry = Registry(tmp_path / "registry")
    server, port = serve("127.0.0.1:0", store, registry, max_workers=8)
    spool = Spool(tmp_path / "spool", "r-big")
    spool.append([big(0), big(1), big(2)])                 # 36 MiB: split into parts
    spool.append([simple_record(robot="r-big", episode="e", seq=3)])
    spool.append([big(4, cameras=3), simple_record(robot="r-big", episode="e", seq=5)])
    spool.append([simple_record(robot="r-big", episode="e", seq=6)])
    client = ExperienceClient(f"127.0.0.1:{port}", spool, "r-big", rpc_timeout_s=30,
                              backoff_cap_s=0.2).start()
    try:
        assert client.drain(120), f"not drained: {client.stats()}"
        keys = sorted(r.seq for _, r in store.read(0, 100))
    finally:
        client.stop()
        registry.close()
        server.stop(0)
        store.close()
    assert keys == [0, 1, 2, 3, 5, 6]
    assert client.batches_split == 2 and client.batches_quarantined == 1
    assert "too large" in (client.last_error or "") or "over the learner" in client.last_error
    assert len(list((tmp_path / "spool" / CORRUPT).iterdir())) == 1
    assert client.errors == 0  # no RESOURCE_EXHAUSTED retries
