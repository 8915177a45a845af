"""The robot's durable experience spool: a directory of ``pb.ExperienceBatch`` files.

Experience is written here first and deleted only after the learner acknowledged it (DESIGN.md,
Contracts: Experience), so a network outage costs spool space and nothing else.

Layout under ``directory``::

    b<batch_seq:012d>-n<records>.pb   one serialized ExperienceBatch; the record count is in the
                                      name so opening a large spool parses nothing
    state.json                        batch/record sequence counters and lifetime totals
    corrupt/                          batch files that failed to parse or that the learner
                                      refused as poison; kept for a human, never resent

Every file is written to a temporary name, fsynced and renamed (``write_atomic``), so a crash
leaves either the whole batch or none of it. Record sequence numbers are leased in blocks: the
persisted ``seq_reserved`` is always ahead of every seq handed out, so a restarted robot starts
past it and never reuses a seq (gaps are harmless; reuse would make the learner drop new data as
duplicates).
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import threading

from google.protobuf.message import DecodeError

from runtime.artifact import fsync_dir, write_atomic
from tether.wire import tether_pb2 as pb

log = logging.getLogger(__name__)

_BATCH = re.compile(r"^b(\d{12})-n(\d+)\.pb$")
STATE = "state.json"
CORRUPT = "corrupt"
SEQ_LEASE = 1024  # seqs reserved per state write; a restart skips at most this many
DEFAULT_MAX_BYTES = 1 << 30


class SpoolFull(RuntimeError):
    """The spool holds ``max_bytes`` of unacknowledged experience; nothing was written."""


class Spool:
    """Durable on-disk queue of experience batches, oldest first. Thread-safe."""

    def __init__(self, directory: str | os.PathLike, robot_id: str,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        if not robot_id:
            raise ValueError("Spool needs a non-empty robot_id")
        if max_bytes <= 0:
            raise ValueError(f"Spool max_bytes must be > 0, got {max_bytes}")
        self.directory = pathlib.Path(directory)
        self.robot_id = robot_id
        self.max_bytes = int(max_bytes)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / CORRUPT).mkdir(exist_ok=True)
        self._lock = threading.Lock()   # in-memory state; never held across disk I/O
        self._io = threading.RLock()    # serializes disk writes so state files land in order
        self._appended = threading.Condition(self._lock)
        # batch_seq -> (file name, record count, bytes); dicts keep insertion (= seq) order
        self._index: dict[int, tuple[str, int, int]] = {}
        self._bytes = 0
        self._open()

    # -- opening -----------------------------------------------------------------------------
    def _open(self) -> None:
        state = self._read_state()
        self._next_batch = int(state.get("next_batch_seq", 1))
        self._next_seq = int(state.get("seq_reserved", 1))  # everything below may have been used
        self._seq_reserved = self._next_seq + SEQ_LEASE  # persisted below, before any use
        self.records_spooled = int(state.get("records_spooled", 0))
        self.records_acked = int(state.get("records_acked", 0))
        self.records_quarantined = int(state.get("records_quarantined", 0))
        found = []
        for entry in self.directory.iterdir():
            if entry.name.startswith(".") and ".tmp-" in entry.name:
                entry.unlink(missing_ok=True)  # a write torn by a crash; its batch never existed
                continue
            m = _BATCH.match(entry.name)
            if m:
                found.append((int(m.group(1)), int(m.group(2)), entry))
        for batch_seq, n, entry in sorted(found):
            size = entry.stat().st_size
            self._index[batch_seq] = (entry.name, n, size)
            self._bytes += size
            if batch_seq >= self._next_batch:
                # the crash fell between the batch rename and the state write: count it now
                self.records_spooled += n
                self._next_batch = batch_seq + 1
        self._write_state()

    def _read_state(self) -> dict:
        path = self.directory / STATE
        if not path.exists():
            return {}
        try:
            state = json.loads(path.read_text())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            return state
        except (ValueError, UnicodeDecodeError) as e:
            # Atomic writes make this near impossible; refusing to open would stop data
            # collection, so start past any seq the batches on disk could hold.
            log.error("spool %s: %s is unreadable (%s); counters restart, seqs skip ahead",
                      self.directory, STATE, e)
            return {"seq_reserved": 1 << 40}

    def _snapshot(self) -> bytes:
        return json.dumps({"robot_id": self.robot_id, "next_batch_seq": self._next_batch,
                           "seq_reserved": self._seq_reserved,
                           "records_spooled": self.records_spooled,
                           "records_acked": self.records_acked,
                           "records_quarantined": self.records_quarantined},
                          sort_keys=True).encode()

    def _write_state(self, snapshot: bytes | None = None) -> None:
        """Call with ``_io`` held (or while opening); the snapshot is taken under ``_lock``."""
        if snapshot is None:
            with self._lock:
                snapshot = self._snapshot()
        write_atomic(self.directory / STATE, snapshot)

    # -- writing -----------------------------------------------------------------------------
    def next_record_seq(self) -> int:
        """The next per-robot record sequence number: strictly increasing, across restarts.

        In memory (no disk wait) while the persisted lease covers it, which ``append`` keeps
        ahead; only a long run without appends waits for one state write.
        """
        while True:
            with self._lock:
                if self._next_seq < self._seq_reserved:
                    self._next_seq += 1
                    return self._next_seq - 1
            self._extend_lease()

    def _extend_lease(self) -> None:
        with self._io:
            with self._lock:
                if self._next_seq + SEQ_LEASE // 2 <= self._seq_reserved:
                    return
                self._seq_reserved = self._next_seq + SEQ_LEASE
                snapshot = self._snapshot()
            self._write_state(snapshot)

    def append(self, records: list[pb.ChunkRecord]) -> int:
        """Write one batch durably; returns its batch_seq. Raises SpoolFull (nothing written).

        Disk work happens under ``_io`` only, so ``next_record_seq`` (the control thread) never
        waits for an fsync here.
        """
        if not records:
            raise ValueError("Spool.append needs at least one record")
        with self._io:
            with self._lock:
                batch_seq = self._next_batch
                used = self._bytes
            data = pb.ExperienceBatch(robot_id=self.robot_id, batch_seq=batch_seq,
                                      records=records).SerializeToString()
            if used + len(data) > self.max_bytes:
                raise SpoolFull(
                    f"spool {self.directory} holds {used} of max_bytes={self.max_bytes} "
                    f"unacknowledged bytes; a {len(data)}-byte batch does not fit. Check the link "
                    f"to the learner, or raise max_bytes")
            self._extend_lease()  # before the batch: its seqs must be below the persisted lease
            name = f"b{batch_seq:012d}-n{len(records)}.pb"
            write_atomic(self.directory / name, data)
            with self._lock:
                self._next_batch += 1
                self.records_spooled += len(records)
                self._index[batch_seq] = (name, len(records), len(data))
                self._bytes += len(data)
                self._appended.notify_all()
                snapshot = self._snapshot()
            self._write_state(snapshot)
            return batch_seq

    # -- reading and acknowledging -----------------------------------------------------------
    def peek(self, max_batches: int = 1, after: int = 0) -> list[tuple[int, pb.ExperienceBatch]]:
        """Up to ``max_batches`` unacknowledged batches with batch_seq > ``after``, oldest first
        (a stream passes the last batch it sent). Unparseable files are quarantined and skipped."""
        with self._lock:
            todo = [(b, entry[0]) for b, entry in self._index.items() if b > after]
        out = []
        for batch_seq, name in todo:  # files are read without the lock: no tick waits on disk
            if len(out) >= max_batches:
                break
            try:
                batch = pb.ExperienceBatch.FromString((self.directory / name).read_bytes())
                if batch.batch_seq != batch_seq or len(batch.records) == 0:
                    raise DecodeError(f"holds batch_seq {batch.batch_seq} with "
                                      f"{len(batch.records)} records")
            except FileNotFoundError:
                continue  # acknowledged meanwhile by another thread
            except (DecodeError, OSError) as e:
                self.quarantine(batch_seq, f"does not parse: {e}")
                continue
            out.append((batch_seq, batch))
        return out

    def _take(self, batch_seq: int, counter: str) -> tuple[str, int, bytes] | None:
        """Remove a batch from the index, add its records to ``counter``; (name, records,
        state snapshot), or None for an unknown seq."""
        with self._lock:
            entry = self._index.pop(batch_seq, None)
            if entry is None:
                return None
            name, n, size = entry
            self._bytes -= size
            setattr(self, counter, getattr(self, counter) + n)
            return name, n, self._snapshot()

    def ack(self, batch_seq: int) -> None:
        """The learner stored ``batch_seq`` durably: delete its file. Unknown seqs are ignored
        (a resend acknowledged twice)."""
        with self._io:
            taken = self._take(batch_seq, "records_acked")
            if taken is None:
                return
            name, n, snapshot = taken
            (self.directory / name).unlink(missing_ok=True)
            # a crash before this write undercounts records_acked by n; the data is exact
            self._write_state(snapshot)

    def quarantine(self, batch_seq: int, reason: str) -> None:
        """Move a batch to ``corrupt/`` (e.g. the learner refused it as malformed)."""
        with self._io:
            taken = self._take(batch_seq, "records_quarantined")
            if taken is None:
                return
            name, n, snapshot = taken
            try:
                os.replace(self.directory / name, self.directory / CORRUPT / name)
                fsync_dir(self.directory / CORRUPT)
                fsync_dir(self.directory)
            except OSError as e:
                log.error("spool %s: could not move %s to %s/: %s", self.directory, name, CORRUPT, e)
            self._write_state(snapshot)
        log.error("spool %s: batch %d (%s, %d records) %s; moved to %s/ for inspection, not resent",
                  self.directory, batch_seq, name, n, reason, CORRUPT)

    # -- queries -----------------------------------------------------------------------------
    def pending(self) -> int:
        """Records written but not yet acknowledged (or quarantined)."""
        with self._lock:
            return sum(n for _, n, _ in self._index.values())

    def pending_batches(self) -> int:
        with self._lock:
            return len(self._index)

    def pending_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def wait(self, timeout: float) -> bool:
        """Block until a batch is pending (or timeout); True if one is."""
        with self._appended:
            return self._appended.wait_for(lambda: bool(self._index), timeout)

    def wait_after(self, batch_seq: int, timeout: float) -> bool:
        """Block until a batch newer than ``batch_seq`` is pending (or timeout)."""
        with self._appended:
            return self._appended.wait_for(
                lambda: bool(self._index) and next(reversed(self._index)) > batch_seq, timeout)
