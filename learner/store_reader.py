"""Reading the experience store: where committed rows live, and loading them.

Each read takes one consistent catalog snapshot of the segments, frames and Parquet row groups
holding the rows it wants, then loads those pieces (a small cache keeps the last few, since the
trainer reads a frame in several steps). A segment sealed between the snapshot and the load is
gone from under the reader: it retries with a new snapshot.
"""
from __future__ import annotations

import collections
import pathlib
import threading
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from learner import catalog, segments as seg
from tether.wire import tether_pb2 as pb

_CACHE_ENTRIES = 16
_RETRIES = 5


class SegmentReader:
    """Thread-safe reads of committed rows and catalog queries (its own SQLite connection)."""

    def __init__(self, segment_dir: pathlib.Path, catalog_path: pathlib.Path):
        self.segment_dir = segment_dir
        self._db = catalog.connect(catalog_path)
        self._lock = threading.Lock()  # the connection
        self._cache_lock = threading.Lock()
        self._cache: collections.OrderedDict = collections.OrderedDict()

    def read(self, after_rowid: int, limit: int) -> list[tuple[int, pb.ChunkRecord]]:
        out = []
        for table in self._tables(int(after_rowid), int(limit), ["rowid", "record"]):
            out.extend(zip(table.column("rowid").to_pylist(),
                           map(pb.ChunkRecord.FromString, table.column("record").to_pylist())))
        return out

    def scan(self, columns: list[str] | None, after_rowid: int,
             rows_per_table: int) -> Iterator[pa.Table]:
        names = list(seg.SCHEMA.names if columns is None else columns)
        unknown = set(names) - set(seg.SCHEMA.names)
        if unknown:
            raise ValueError(f"no such store columns: {sorted(unknown)}; see segments.SCHEMA")
        if "rowid" not in names:
            names.insert(0, "rowid")
        while True:
            tables = self._tables(after_rowid, rows_per_table, names)
            if not tables:
                return
            table = pa.concat_tables(tables)
            if table.num_rows == 0:
                return
            after_rowid = table.column("rowid")[-1].as_py()
            yield table

    def _tables(self, after: int, limit: int, names: list[str]) -> list[pa.Table]:
        for attempt in range(_RETRIES):
            try:
                out, need = [], limit
                for kind, sid, a, b, c in self._plan(after, limit):
                    t = self._load(kind, sid, a, b, c, names)
                    t = t.filter(pc.greater(t.column("rowid"), after))
                    out.append(t.slice(0, need))
                    need -= out[-1].num_rows
                    if need <= 0:
                        break
                return out
            except FileNotFoundError:  # sealed meanwhile: the catalog now points at Parquet
                if attempt == _RETRIES - 1:
                    raise
        return []

    def _plan(self, after: int, limit: int) -> list[tuple]:
        """A consistent catalog snapshot of where rows after ``after`` live (frames/row groups)."""
        plan, need = [], limit
        with self._lock:
            db = self._db
            db.execute("BEGIN")
            try:
                for sid, fmt, first, last in db.execute(
                        "SELECT id, format, first_rowid, last_rowid FROM segments WHERE "
                        "last_rowid > ? AND n_records > 0 ORDER BY first_rowid", (after,)).fetchall():
                    if need <= 0:
                        break
                    if fmt == "ipc":
                        for f_first, n, off, length in db.execute(
                                "SELECT first_rowid, n, offset, length FROM frames WHERE segment=? "
                                "AND first_rowid + n - 1 > ? ORDER BY first_rowid", (sid, after)):
                            plan.append(("ipc", sid, f_first, off, length))
                            need -= f_first + n - 1 - max(after, f_first - 1)
                            if need <= 0:
                                break
                    else:
                        start = first
                        for index, rows in enumerate(self._row_groups(sid)):
                            if start + rows - 1 > after:
                                plan.append(("pq", sid, index, start, rows))
                                need -= start + rows - 1 - max(after, start - 1)
                                if need <= 0:
                                    break
                            start += rows
            finally:
                db.execute("COMMIT")
        return plan

    def _row_groups(self, sid: int) -> list[int]:
        key = ("meta", sid)
        if key not in self._cache:
            path = self.segment_dir / seg.segment_name(sid, seg.PARQUET_SUFFIX)
            self._cache_put(key, seg.parquet_row_groups(path))
        return self._cache[key]

    def _load(self, kind: str, sid: int, a: int, b: int, c: int, names: list[str]) -> pa.Table:
        key = (kind, sid, a, tuple(names))
        table = self._cache.get(key)
        if table is None:
            if kind == "ipc":
                path = self.segment_dir / seg.segment_name(sid, seg.IPC_SUFFIX)
                table = seg.conform(seg.read_frame(path, b, c), names)
            else:
                path = self.segment_dir / seg.segment_name(sid, seg.PARQUET_SUFFIX)
                table = seg.read_row_group(path, a, names)
            self._cache_put(key, table)
        return table

    def _cache_put(self, key, value) -> None:
        with self._cache_lock:
            self._cache[key] = value
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)

    # -- catalog queries -------------------------------------------------------------------------
    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(n_records), 0) FROM segments")
                       .fetchone()[0])

    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT robot_id, SUM(n_records), COUNT(*), SUM(success) FROM episodes "
                "GROUP BY robot_id ORDER BY robot_id").fetchall()
        return {r: {"records": n, "episodes": e, "successes": s} for r, n, e, s in rows}

    def episodes(self, **conditions) -> list[dict]:
        with self._lock:
            return catalog.select_episodes(self._db, **conditions)

    def unsealed_full_segments(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM segments WHERE format='ipc' AND "
                                        "sealed=1").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
