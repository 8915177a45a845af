"""The durable experience store: SQLite in WAL mode, fsync on every commit.

A batch is validated as a whole before anything is written, then stored in one transaction;
``append`` returns only after the commit, so an acknowledged batch survives a process kill.
Records are keyed by (robot_id, episode_id, seq): a resend of an acknowledged batch (the robot
did not see the ack) is dropped and counted, never stored twice.
"""
from __future__ import annotations

import math
import pathlib
import sqlite3
import threading

import numpy as np

from runtime.tensors import from_proto
from tether.wire import tether_pb2 as pb

MAX_RECORDS_PER_BATCH = 1024
MAX_ID_CHARS = 128
MAX_TASK_CHARS = 256
MAX_INSTRUCTION_CHARS = 1024
MAX_ACTION_ROWS = 256
MAX_ACTION_DIM = 64
MAX_CAMERAS = 8
MAX_SEQ = 2**63 - 1  # SQLite integers are signed 64-bit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    rowid INTEGER PRIMARY KEY AUTOINCREMENT,
    robot_id TEXT NOT NULL,
    episode_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    task TEXT NOT NULL,
    reward REAL NOT NULL,
    success INTEGER NOT NULL,
    terminated INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    n_actions INTEGER NOT NULL,
    record BLOB NOT NULL,
    UNIQUE (robot_id, episode_id, seq)
);
"""


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}; it must be a finite number")


def _check_id(name: str, value: str) -> None:
    if not value:
        raise ValueError(f"{name} is empty; every record needs a non-empty {name}")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{name} has {len(value)} characters (limit {MAX_ID_CHARS})")


def _check_array(name: str, t: pb.Tensor) -> np.ndarray:
    try:
        a = from_proto(t)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return a


def validate_record(r: pb.ChunkRecord) -> None:
    """Raise ValueError naming the first thing wrong with one record."""
    _check_id("robot_id", r.robot_id)
    _check_id("episode_id", r.episode_id)
    if r.seq > MAX_SEQ:
        raise ValueError(f"seq {r.seq} exceeds {MAX_SEQ}")
    if len(r.task) > MAX_TASK_CHARS:
        raise ValueError(f"task has {len(r.task)} characters (limit {MAX_TASK_CHARS})")
    for name, value in (("reward", r.reward), ("behaviour_log_prob", r.behaviour_log_prob)):
        _finite(name, value)
    obs = r.observation
    if len(obs.instruction) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"instruction has {len(obs.instruction)} characters (limit {MAX_INSTRUCTION_CHARS})")
    _finite("observation.timestamp", obs.timestamp)
    if not obs.images or len(obs.images) > MAX_CAMERAS:
        raise ValueError(f"observation has {len(obs.images)} camera images; need 1..{MAX_CAMERAS}")
    for cam, t in obs.images.items():
        img = _check_array(f"observation.images[{cam!r}]", t)
        if img.dtype != np.uint8 or img.ndim != 3:
            raise ValueError(f"observation.images[{cam!r}] is {img.dtype} {img.shape}; "
                             f"images are HxWxC uint8")
    state = _check_array("observation.state", obs.state)
    if state.ndim != 1 or state.dtype.kind != "f":
        raise ValueError(f"observation.state is {state.dtype} {state.shape}; expected a float vector")
    actions = _check_array("actions", r.actions)
    if actions.ndim != 2 or actions.dtype.kind != "f":
        raise ValueError(f"actions is {actions.dtype} {actions.shape}; expected float [n, A]")
    n, a_dim = actions.shape
    if not (1 <= n <= MAX_ACTION_ROWS and 1 <= a_dim <= MAX_ACTION_DIM):
        raise ValueError(f"actions shape {actions.shape}: need 1..{MAX_ACTION_ROWS} rows and "
                         f"1..{MAX_ACTION_DIM} dims")
    offsets = list(r.offsets)
    if len(offsets) != n:
        raise ValueError(f"{len(offsets)} offsets for {n} executed actions; need one per action")
    if offsets[0] < 0 or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets {offsets} must be >= 0 and strictly increasing")
    if r.HasField("prefix"):
        prefix = _check_array("prefix", r.prefix)
        if prefix.ndim != 2 or prefix.shape[1] != a_dim:
            raise ValueError(f"prefix shape {prefix.shape} does not match actions dim {a_dim}; "
                             f"expected [H, {a_dim}]")
        if not 0 <= r.prefix_len <= prefix.shape[0] or offsets[-1] >= prefix.shape[0]:
            raise ValueError(f"prefix_len {r.prefix_len} / offsets {offsets} do not fit a "
                             f"chunk of {prefix.shape[0]} rows")
    elif r.prefix_len != 0:
        raise ValueError(f"prefix_len {r.prefix_len} without a prefix tensor")


def validate_batch(batch: pb.ExperienceBatch) -> None:
    """Refuse the whole batch (ValueError naming the record) if any record is bad."""
    _check_id("batch robot_id", batch.robot_id)
    if len(batch.records) > MAX_RECORDS_PER_BATCH:
        raise ValueError(f"batch holds {len(batch.records)} records (limit "
                         f"{MAX_RECORDS_PER_BATCH}); send smaller batches")
    for i, r in enumerate(batch.records):
        where = f"record {i} (episode {r.episode_id!r}, seq {r.seq})"
        if r.robot_id != batch.robot_id:
            raise ValueError(f"{where}: robot_id {r.robot_id!r} differs from the batch's "
                             f"{batch.robot_id!r}; a robot may only write its own experience")
        try:
            validate_record(r)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


class ExperienceStore:
    """Thread-safe: one connection guarded by a lock (the gRPC pool and the trainer share it)."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); "
                               f"put the store on a local filesystem")
        self._db.execute("PRAGMA synchronous=FULL")  # fsync on commit: ack = durable
        self._db.executescript(_SCHEMA)
        self.duplicates_dropped = 0  # since this process opened the store

    def append(self, batch: pb.ExperienceBatch) -> tuple[int, int]:
        """Validate, store in one transaction, return (stored, duplicates) after the commit."""
        validate_batch(batch)
        rows = [(r.robot_id, r.episode_id, int(r.seq), int(r.policy_version), r.task,
                 float(r.reward), int(r.success), int(r.terminated), int(r.truncated),
                 len(r.offsets), r.SerializeToString(deterministic=True)) for r in batch.records]
        with self._lock:
            stored = 0
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    cur = self._db.execute(
                        "INSERT OR IGNORE INTO records (robot_id, episode_id, seq, policy_version, "
                        "task, reward, success, terminated, truncated, n_actions, record) "
                        "VALUES (?,?,?,?,?,?,?,?,?,?,?)", row)
                    stored += cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self.duplicates_dropped += len(rows) - stored
        return stored, len(rows) - stored

    def read(self, after_rowid: int = 0, limit: int = 256) -> list[tuple[int, pb.ChunkRecord]]:
        """Records in insertion order with rowid > after_rowid."""
        with self._lock:
            rows = self._db.execute("SELECT rowid, record FROM records WHERE rowid > ? "
                                    "ORDER BY rowid LIMIT ?", (int(after_rowid), int(limit))).fetchall()
        return [(rowid, pb.ChunkRecord.FromString(blob)) for rowid, blob in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def stats(self) -> dict[str, dict[str, int]]:
        """{robot_id: {records, episodes, successes}}; successes counts successful episodes."""
        with self._lock:
            rows = self._db.execute(
                "SELECT robot_id, COUNT(*), COUNT(DISTINCT episode_id), "
                "COUNT(DISTINCT CASE WHEN success THEN episode_id END) "
                "FROM records GROUP BY robot_id ORDER BY robot_id").fetchall()
        return {r: {"records": n, "episodes": e, "successes": s} for r, n, e, s in rows}

    def close(self) -> None:
        with self._lock:
            self._db.close()
