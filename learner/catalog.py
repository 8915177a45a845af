"""The store's catalog: SQLite in WAL mode with synchronous=FULL, so a commit is durable.

The catalog commit is the store's acknowledgement point. It says which segment bytes count
(``frames``: offset and length of each committed IPC frame), and indexes what the segments hold:
robots, episodes (task, sequence range, record count, outcome, policy versions), per-version
sequence ranges, and one key per record for deduplication across restarts.
"""
from __future__ import annotations

import pathlib
import sqlite3

SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    format TEXT NOT NULL,                  -- 'ipc' (frames) or 'parquet' (sealed)
    sealed INTEGER NOT NULL DEFAULT 0,     -- no more frames; waiting for (or done with) Parquet
    first_rowid INTEGER NOT NULL,
    last_rowid INTEGER NOT NULL,
    n_records INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS frames (
    segment INTEGER NOT NULL,
    first_rowid INTEGER NOT NULL,
    n INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    PRIMARY KEY (segment, first_rowid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS robots (
    robot_id TEXT PRIMARY KEY,
    records INTEGER NOT NULL,
    first_rowid INTEGER NOT NULL,
    last_rowid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS episodes (
    id INTEGER PRIMARY KEY,
    robot_id TEXT NOT NULL,
    episode_id TEXT NOT NULL,
    task TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    n_records INTEGER NOT NULL,
    success INTEGER NOT NULL,
    terminated INTEGER NOT NULL,
    truncated INTEGER NOT NULL,
    min_version INTEGER NOT NULL,
    max_version INTEGER NOT NULL,
    first_rowid INTEGER NOT NULL,
    last_rowid INTEGER NOT NULL,
    UNIQUE (robot_id, episode_id)
);
CREATE TABLE IF NOT EXISTS episode_versions (
    episode INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    n_records INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (episode, policy_version)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS record_keys (
    episode INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (episode, seq)
) WITHOUT ROWID;
"""

_UPSERT_EPISODE = """
INSERT INTO episodes (robot_id, episode_id, task, first_seq, last_seq, n_records, success,
                      terminated, truncated, min_version, max_version, first_rowid, last_rowid)
VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)
ON CONFLICT (robot_id, episode_id) DO UPDATE SET
    first_seq = min(first_seq, excluded.first_seq), last_seq = max(last_seq, excluded.last_seq),
    n_records = n_records + excluded.n_records, success = max(success, excluded.success),
    terminated = max(terminated, excluded.terminated),
    truncated = max(truncated, excluded.truncated),
    min_version = min(min_version, excluded.min_version),
    max_version = max(max_version, excluded.max_version), last_rowid = excluded.last_rowid
RETURNING id
"""
_UPSERT_VERSION = """
INSERT INTO episode_versions (episode, policy_version, n_records, first_seq, last_seq)
VALUES (?,?,?,?,?)
ON CONFLICT (episode, policy_version) DO UPDATE SET
    n_records = n_records + excluded.n_records, first_seq = min(first_seq, excluded.first_seq),
    last_seq = max(last_seq, excluded.last_seq)
"""
_UPSERT_ROBOT = """
INSERT INTO robots (robot_id, records, first_rowid, last_rowid) VALUES (?,?,?,?)
ON CONFLICT (robot_id) DO UPDATE SET records = records + excluded.records,
    last_rowid = excluded.last_rowid
"""

EPISODE_COLUMNS = ("id", "robot_id", "episode_id", "task", "first_seq", "last_seq", "n_records",
                   "success", "terminated", "truncated", "min_version", "max_version",
                   "first_rowid", "last_rowid")


def connect(path: pathlib.Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise RuntimeError(f"{path}: SQLite refused WAL mode (got {mode!r}); put the store on a "
                           f"local filesystem")
    db.execute("PRAGMA synchronous=FULL")  # fsync the WAL on every commit: commit = durable
    db.executescript(SCHEMA)
    return db


class Transaction:
    """``with Transaction(db):`` BEGIN IMMEDIATE ... COMMIT, ROLLBACK on any error."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            try:
                self.db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the connection is gone; the transaction died with it


def upsert_episode(db: sqlite3.Connection, values: tuple) -> int:
    return int(db.execute(_UPSERT_EPISODE, values).fetchone()[0])


def upsert_versions(db: sqlite3.Connection, rows: list[tuple]) -> None:
    db.executemany(_UPSERT_VERSION, rows)


def upsert_robots(db: sqlite3.Connection, rows: list[tuple]) -> None:
    db.executemany(_UPSERT_ROBOT, rows)


def episode_id_of(db: sqlite3.Connection, robot_id: str, episode_id: str) -> int | None:
    row = db.execute("SELECT id FROM episodes WHERE robot_id=? AND episode_id=?",
                     (robot_id, episode_id)).fetchone()
    return None if row is None else int(row[0])


def stored_seqs(db: sqlite3.Connection, episode: int, lo: int, hi: int) -> set[int]:
    return {s for (s,) in db.execute(
        "SELECT seq FROM record_keys WHERE episode=? AND seq BETWEEN ? AND ?", (episode, lo, hi))}


def select_episodes(db: sqlite3.Connection, *, robot: str | None = None,
                    task: str | None = None, min_version: int | None = None,
                    successful_only: bool = False, complete_only: bool = False) -> list[dict]:
    """Catalog rows of the episodes matching every given condition, oldest first."""
    where, args = [], []
    if robot is not None:
        where.append("robot_id = ?")
        args.append(robot)
    if task is not None:
        where.append("task = ?")
        args.append(task)
    if min_version is not None:
        where.append("min_version >= ?")
        args.append(int(min_version))
    if successful_only:
        where.append("success")
    if complete_only:
        where.append("(terminated OR truncated)")
    sql = f"SELECT {', '.join(EPISODE_COLUMNS)} FROM episodes"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = db.execute(sql + " ORDER BY first_rowid", args).fetchall()
    return [dict(zip(EPISODE_COLUMNS, row)) for row in rows]
