"""The durable experience store: Arrow/Parquet segments plus a SQLite catalog, group-committed.

Layout under ``path`` (a directory)::

    catalog.sqlite      robots, episodes, versions, sequence ranges, record keys, segments, frames
    segments/           seg-NNNNNNNN.arrows (active/unsealed frames), seg-NNNNNNNN.parquet (sealed)
    LOCK                held (flock) by the one process that writes

``append``/``submit`` validate a batch whole (``learner.validate``), in the caller's thread or,
given a ``ValidatorPool`` and the batch's bytes, in child processes (``learner.ingest_pool``),
as a table of the segment's columns, then hand it to one writer thread that coalesces everything queued into a single group commit: one
Arrow IPC frame appended to the active segment and fsynced, then one catalog transaction (the
acknowledgement point). Each caller is released after that commit, so an acknowledged batch
survives kill -9. Segment bytes the catalog does not reference (a crash between the fsync and
the commit) are cut off or deleted when the store opens. Records are keyed by (robot_id,
episode_id, seq): a resend is dropped and counted, never stored twice, across restarts too.
Full segments are sealed into Parquet by a background thread when ingest is quiet (see
``learner.segments``); reads go through ``learner.store_reader``.

A second ``ExperienceStore`` on a directory another one writes (another process, e.g. an export,
or the same process) opens a read-only view: it sees every committed record and writes nothing.
"""
from __future__ import annotations

import collections
import fcntl
import logging
import os
import pathlib
import sqlite3
import threading
import time
from typing import Iterator

import numpy as np
import pyarrow as pa

from learner import catalog, segments as seg
from learner.store_reader import SegmentReader
from learner.validate import validate_batch, validate_record  # noqa: F401 (public re-export)
from tether.wire import tether_pb2 as pb

log = logging.getLogger("tether.learner.store")

SEGMENT_BYTES = 64 * 1024 * 1024
MAX_GROUP_RECORDS = 2048      # records per group commit (one frame)
MAX_QUEUED_RECORDS = 65536    # submit() blocks beyond this: the writer is full (backpressure)
SEAL_WHEN_IDLE_S = 1.0        # seal full segments after this long without a commit ...
SEAL_BACKLOG = 8              # ... or when this many wait, busy or not


class StoreUnavailable(OSError):
    """The store takes no writes: closed, read-only, or its writer failed. Nothing was stored."""


class PendingAppend:
    """A submitted batch; ``wait()`` returns (stored, duplicates) once it is durable.

    A held lock, released when done, is the cheapest completion CPython has (an Event builds a
    Condition per batch), and ingest makes hundreds of these a second."""

    __slots__ = ("table", "n", "_lock", "_result", "_error")

    def __init__(self, table: pa.Table | None):
        self.table = table  # the batch's rows (segments.SCHEMA), rowids set at the commit
        self.n = 0 if table is None else table.num_rows
        self._lock = threading.Lock()
        self._lock.acquire()
        self._result: tuple[int, int] | None = None
        self._error: BaseException | None = None

    def _finish(self, result=None, error=None) -> None:
        self._result, self._error = result, error
        self.table = None
        self._lock.release()

    def done(self) -> bool:
        return not self._lock.locked()

    def wait(self, timeout: float | None = None) -> tuple[int, int]:
        if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise TimeoutError(f"the batch was not stored within {timeout} s")
        self._lock.release()  # later waits return at once
        if self._error is not None:
            raise self._error
        return self._result


_AGGREGATED = ("robot_id", "episode_id", "seq", "policy_version", "task", "success",
               "terminated", "truncated")
_SEQ, _VERSION, _TASK, _SUCCESS, _TERMINATED, _TRUNCATED = range(2, 8)


def _aggregate(table: pa.Table, first_rowid: int):
    """Catalog updates for a table stored with rowids from ``first_rowid``: per episode (values
    for ``catalog.upsert_episode`` after the key, and the seqs), per episode version, per robot."""
    rows = list(zip(*(table.column(c).to_pylist() for c in _AGGREGATED)))
    index: dict[tuple[str, str], list[int]] = {}
    for i, row in enumerate(rows):
        index.setdefault((row[0], row[1]), []).append(i)
    episodes, versions, robots = {}, {}, {}
    for key, idx in index.items():
        ep = [rows[i] for i in idx]
        seqs = [r[_SEQ] for r in ep]
        vers = [r[_VERSION] for r in ep]
        episodes[key] = ((ep[0][_TASK], min(seqs), max(seqs), len(ep),
                          int(any(r[_SUCCESS] for r in ep)),
                          int(any(r[_TERMINATED] for r in ep)),
                          int(any(r[_TRUNCATED] for r in ep)), min(vers), max(vers),
                          first_rowid + idx[0], first_rowid + idx[-1]), seqs)
        for v, s in zip(vers, seqs):
            agg = versions.get((*key, v))
            versions[(*key, v)] = [1, s, s] if agg is None else [agg[0] + 1, min(agg[1], s),
                                                                 max(agg[2], s)]
        rb = robots.get(key[0])
        robots[key[0]] = ([len(ep), first_rowid + idx[0], first_rowid + idx[-1]] if rb is None
                          else [rb[0] + len(ep), rb[1], max(rb[2], first_rowid + idx[-1])])
    return episodes, versions, robots


class ExperienceStore:
    """Thread-safe. ``readonly``: None = write if no one else does, True = never, False = must."""

    def __init__(self, path: str | os.PathLike, *, readonly: bool | None = None,
                 segment_bytes: int = SEGMENT_BYTES, max_group_records: int = MAX_GROUP_RECORDS,
                 max_queued_records: int = MAX_QUEUED_RECORDS, validators=None):
        """``validators``: a ``learner.ingest_pool.ValidatorPool`` for ``submit(batch, raw)``;
        the store closes it."""
        self.path = pathlib.Path(path)
        self.validators = validators
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file; the experience store is a directory (the "
                             f"single-file SQLite store of earlier versions is not read)")
        if segment_bytes <= 0 or max_group_records <= 0 or max_queued_records < max_group_records:
            raise ValueError(f"ExperienceStore needs segment_bytes > 0 and max_queued_records >= "
                             f"max_group_records > 0, got {segment_bytes}, {max_queued_records}, "
                             f"{max_group_records}")
        self.segment_bytes, self.max_group_records = segment_bytes, max_group_records
        self.max_queued_records = max_queued_records
        self.segment_dir = self.path / "segments"
        self.segment_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        self.writable = False
        if not readonly:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.writable = True
            except BlockingIOError:
                if readonly is False:
                    os.close(self._lock_fd)
                    raise StoreUnavailable(f"{self.path} is being written by another process (or "
                                           f"store); stop it first, or open read-only") from None
                log.info("%s is written by another store; opened read-only", self.path)
        self.duplicates_dropped = 0  # since this store was opened
        self.segments_sealed = 0
        self._last_commit = time.monotonic()
        self._seal_now = False
        self._closed = False
        self._failed: BaseException | None = None
        self._cond = threading.Condition()
        self._queue: collections.deque[PendingAppend] = collections.deque()
        self._queued_records = 0
        self._episode_ids: collections.OrderedDict = collections.OrderedDict()
        self._reader = SegmentReader(self.segment_dir, self.path / "catalog.sqlite")
        self._active: seg.ActiveSegment | None = None
        self._threads: list[threading.Thread] = []
        if self.writable:
            self._wdb = catalog.connect(self.path / "catalog.sqlite")
            self._load_state(cleanup=True)
            self._seal_wakeup = threading.Event()
            for target, name in ((self._writer_loop, "store-writer"),
                                 (self._sealer_loop, "store-sealer")):
                t = threading.Thread(target=target, name=name, daemon=True)
                t.start()
                self._threads.append(t)

    # -- opening and recovery ------------------------------------------------------------------
    def _load_state(self, cleanup: bool) -> None:
        """Writer state from the catalog; with ``cleanup`` (at open) drop what it does not own."""
        db = self._wdb
        rows = db.execute("SELECT id, format, sealed FROM segments ORDER BY id").fetchall()
        owned = set()
        for sid, fmt, _ in rows:
            suffix = seg.IPC_SUFFIX if fmt == "ipc" else seg.PARQUET_SUFFIX
            owned.add(seg.segment_name(sid, suffix))
            if not (self.segment_dir / seg.segment_name(sid, suffix)).exists():
                raise RuntimeError(f"{self.path}: segment {sid} ({fmt}) is in the catalog but its "
                                   f"file is missing; acknowledged experience was lost or moved. "
                                   f"Restore segments/ from a backup")
        active = [(sid, s) for sid, fmt, s in rows if fmt == "ipc" and not s]
        if len(active) > 1:
            raise RuntimeError(f"{self.path}: {len(active)} unsealed segments; the catalog is "
                               f"inconsistent")
        if cleanup:
            for entry in self.segment_dir.iterdir():
                if entry.name not in owned:
                    # never acknowledged: a frame file created before its first commit, a sealed
                    # Parquet whose catalog switch did not commit, or an IPC file already sealed
                    entry.unlink()
            seg.fsync_dir(self.segment_dir)
        if self._active is not None:
            self._active.close()
            self._active = None
        if active:
            sid = active[0][0]
            end = db.execute("SELECT COALESCE(MAX(offset + length), 0) FROM frames WHERE "
                             "segment=?", (sid,)).fetchone()[0]
            self._active = seg.ActiveSegment(self.segment_dir, sid, int(end), create=False)
        top = db.execute("SELECT COALESCE(MAX(id), 0), COALESCE(MAX(last_rowid), 0) "
                         "FROM segments").fetchone()
        self._next_segment_id, self._next_rowid = int(top[0]) + 1, int(top[1]) + 1
        self._episode_ids.clear()

    # -- writing -------------------------------------------------------------------------------
    def submit(self, batch: pb.ExperienceBatch, raw: bytes | None = None) -> PendingAppend:
        """Validate (ValueError naming the record, nothing stored) and queue for the writer.

        ``raw``: the batch's serialized bytes, as received; with a validator pool (learner/
        ingest_pool.py) they are checked in a child process, else here, in the caller's thread.
        Blocks while the writer has ``max_queued_records`` waiting: that is the backpressure."""
        if raw is not None and self.validators is not None:
            table = self.validators.validate(raw, batch.robot_id, len(batch.records))
        else:
            rows = validate_batch(batch)
            table = seg.build_table(rows, 0) if rows else None
        pending = PendingAppend(table)
        n = pending.n
        if n == 0:
            pending._finish(result=(0, 0))
            return pending
        with self._cond:
            while True:
                self._check_writable()
                if self._queued_records == 0 or self._queued_records + n <= self.max_queued_records:
                    break
                self._cond.wait()
            self._queue.append(pending)
            self._queued_records += n
            self._cond.notify_all()
        return pending

    def append(self, batch: pb.ExperienceBatch, raw: bytes | None = None) -> tuple[int, int]:
        """Validate, store durably, return (stored, duplicates) after the catalog commit."""
        return self.submit(batch, raw).wait()

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"the experience store {self.path} is closed")
        if not self.writable:
            raise StoreUnavailable(f"{self.path} is open read-only (another store writes it)")
        if self._failed is not None:
            raise StoreUnavailable(f"the experience store {self.path} failed "
                                   f"({self._failed!r}); restart the learner")

    def _writer_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                group, n = [], 0
                while self._queue and (not group or
                                       n + self._queue[0].n <= self.max_group_records):
                    item = self._queue.popleft()
                    group.append(item)
                    n += item.n
                self._queued_records -= n
                self._cond.notify_all()
            try:
                results = self._commit(group)
            except BaseException as e:  # noqa: BLE001 (every waiter must hear of it)
                log.error("group commit of %d records failed: %r; nothing acknowledged", n, e)
                for item in group:
                    item._finish(error=e if isinstance(e, (OSError, sqlite3.Error))
                                 else StoreUnavailable(f"storing failed: {e!r}"))
                self._recover_writer()
                continue
            for item, result in zip(group, results):
                item._finish(result=result)

    def _recover_writer(self) -> None:
        try:
            self._load_state(cleanup=False)  # the catalog is the truth; memory may be ahead
        except BaseException as e:  # noqa: BLE001
            log.critical("experience store %s cannot recover: %r; refusing writes", self.path, e)
            with self._cond:
                self._failed = e
                for item in self._queue:
                    item._finish(error=StoreUnavailable(f"store failed: {e!r}"))
                self._queue.clear()
                self._queued_records = 0
                self._cond.notify_all()

    def _episode_key(self, robot: str, episode: str) -> int | None:
        key = (robot, episode)
        pk = self._episode_ids.get(key)
        if pk is None:
            pk = catalog.episode_id_of(self._wdb, robot, episode)
            if pk is not None:
                self._remember_episode(key, pk)
        return pk

    def _remember_episode(self, key, pk: int) -> None:
        self._episode_ids[key] = pk
        self._episode_ids.move_to_end(key)
        if len(self._episode_ids) > 100_000:
            self._episode_ids.popitem(last=False)

    def _commit(self, group: list[PendingAppend]) -> list[tuple[int, int]]:
        db = self._wdb
        keys = [list(zip(*(item.table.column(c).to_pylist()
                           for c in ("robot_id", "episode_id", "seq")))) for item in group]
        seqs: dict[tuple[str, str], list[int]] = {}
        for item_keys in keys:
            for robot, episode, s in item_keys:
                seqs.setdefault((robot, episode), []).append(s)
        stored_before = {}
        for key, s in seqs.items():
            pk = self._episode_key(*key)
            stored_before[key] = (catalog.stored_seqs(db, pk, min(s), max(s)) if pk is not None
                                  else set())
        tables, results, seen = [], [], set()
        for item, item_keys in zip(group, keys):
            keep = []
            for k in item_keys:
                new = k not in seen and k[2] not in stored_before[(k[0], k[1])]
                if new:
                    seen.add(k)
                keep.append(new)
            stored = sum(keep)
            if stored == item.n:
                tables.append(item.table)
            elif stored:
                tables.append(item.table.filter(pa.array(keep)))
            results.append((stored, item.n - stored))
        if tables:
            self._write(pa.concat_tables(tables) if len(tables) > 1 else tables[0])
        self.duplicates_dropped += sum(d for _, d in results)
        return results

    def _write(self, table: pa.Table) -> None:
        db, first, n = self._wdb, self._next_rowid, table.num_rows
        table = table.set_column(0, seg.SCHEMA.field(0), pa.array(
            np.arange(first, first + n, dtype=np.int64)))
        frame = seg.encode_frame(table)
        old = self._active
        roll = old is None or (old.end > 0 and old.end + len(frame) > self.segment_bytes)
        target = (seg.ActiveSegment(self.segment_dir, self._next_segment_id, 0, create=True)
                  if roll else old)
        try:
            offset = target.write(frame)
            episodes, versions, robots = _aggregate(table, first)
            with catalog.Transaction(db):
                if roll:
                    if old is not None:
                        db.execute("UPDATE segments SET sealed=1 WHERE id=?", (old.id,))
                    db.execute("INSERT INTO segments (id, format, sealed, first_rowid, last_rowid, "
                               "n_records, bytes) VALUES (?, 'ipc', 0, ?, ?, 0, 0)",
                               (target.id, first, first - 1))
                db.execute("INSERT INTO frames (segment, first_rowid, n, offset, length) "
                           "VALUES (?,?,?,?,?)", (target.id, first, n, offset, len(frame)))
                db.execute("UPDATE segments SET last_rowid=?, n_records=n_records+?, "
                           "bytes=bytes+? WHERE id=?", (first + n - 1, n, len(frame), target.id))
                pks = {}
                for key, (values, seqs) in episodes.items():
                    pks[key] = pk = catalog.upsert_episode(db, (*key, *values))
                    db.executemany("INSERT INTO record_keys (episode, seq) VALUES (?,?)",
                                   [(pk, s) for s in seqs])
                catalog.upsert_versions(db, [(pks[(r, ep)], ver, *v)
                                             for (r, ep, ver), v in versions.items()])
                catalog.upsert_robots(db, [(r, *v) for r, v in robots.items()])
        except BaseException:
            if roll:
                target.close()
            raise
        target.committed(len(frame))
        self._last_commit = time.monotonic()
        self._next_rowid += n
        for key, pk in pks.items():
            self._remember_episode(key, pk)
        if roll:
            self._active, self._next_segment_id = target, self._next_segment_id + 1
            if old is not None:
                old.close()
                self._seal_wakeup.set()

    # -- sealing -------------------------------------------------------------------------------
    def _sealer_loop(self) -> None:
        """Seal full segments into Parquet when ingest is quiet (or the backlog grows): sealing
        competes with ingest for the CPU, and unsealed frames read just as well."""
        db = catalog.connect(self.path / "catalog.sqlite")
        try:
            while not self._closed:
                todo = db.execute("SELECT id FROM segments WHERE format='ipc' AND sealed=1 "
                                  "ORDER BY id").fetchall()
                quiet = time.monotonic() - self._last_commit >= SEAL_WHEN_IDLE_S
                if not todo or not (quiet or len(todo) >= SEAL_BACKLOG or self._seal_now):
                    self._seal_wakeup.wait(SEAL_WHEN_IDLE_S)
                    self._seal_wakeup.clear()
                    continue
                try:
                    self._seal(db, todo[0][0])
                except (OSError, sqlite3.Error, pa.ArrowException) as e:
                    log.error("sealing segment %d failed (%r); its frames stay readable, "
                              "retrying later", todo[0][0], e)
                    self._seal_wakeup.wait(5.0)
        finally:
            db.close()

    def _seal(self, db: sqlite3.Connection, sid: int) -> None:
        frames = db.execute("SELECT offset, length FROM frames WHERE segment=? ORDER BY "
                            "first_rowid", (sid,)).fetchall()
        _, size = seg.seal_to_parquet(self.segment_dir, sid, frames)
        with catalog.Transaction(db):
            db.execute("UPDATE segments SET format='parquet', bytes=? WHERE id=?", (size, sid))
            db.execute("DELETE FROM frames WHERE segment=?", (sid,))
        (self.segment_dir / seg.segment_name(sid, seg.IPC_SUFFIX)).unlink(missing_ok=True)
        self.segments_sealed += 1

    def wait_sealed(self, timeout: float = 30.0) -> bool:
        """Seal every full segment now and wait until they are Parquet (tests, maintenance)."""
        deadline = time.monotonic() + timeout
        self._seal_now = True
        try:
            while True:
                left = self._reader.unsealed_full_segments()
                if not left or not self.writable:
                    return not left
                if time.monotonic() > deadline:
                    return False
                self._seal_wakeup.set()
                time.sleep(0.02)
        finally:
            self._seal_now = False

    # -- reading (learner.store_reader) --------------------------------------------------------
    def read(self, after_rowid: int = 0, limit: int = 256) -> list[tuple[int, pb.ChunkRecord]]:
        """Committed records with rowid > after_rowid, in insertion (rowid) order."""
        return self._reader.read(after_rowid, limit)

    def scan(self, columns: list[str] | None = None, after_rowid: int = 0,
             rows_per_table: int = 4096) -> Iterator[pa.Table]:
        """Every committed row after ``after_rowid`` as Arrow tables (``segments.SCHEMA``
        columns, ``rowid`` always included), in rowid order: analytics without protobuf."""
        return self._reader.scan(columns, after_rowid, rows_per_table)

    def count(self) -> int:
        return self._reader.count()

    def stats(self) -> dict[str, dict[str, int]]:
        """{robot_id: {records, episodes, successes}}; successes counts successful episodes."""
        return self._reader.stats()

    def episodes(self, **conditions) -> list[dict]:
        """Catalog rows of episodes; see ``catalog.select_episodes`` for the conditions."""
        return self._reader.episodes(**conditions)

    def close(self) -> None:
        """Commit what is queued, stop the writer and sealer, release the directory."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self.writable:
            self._seal_wakeup.set()
        for t in self._threads:
            t.join()
        if self._active is not None:
            self._active.close()
        if self.writable:
            self._wdb.close()
        self._reader.close()
        os.close(self._lock_fd)
        if self.validators is not None:
            self.validators.close()
