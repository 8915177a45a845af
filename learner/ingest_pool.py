"""Ingest validation in worker processes: the learner's GIL is left for gRPC and the writer.

Checking a batch and turning it into the store's columns is per-record Python (about half of
the learner's GIL time under load, ``learner.validate``); one process cannot spread it over
cores. ``ValidatorPool`` runs ``workers`` child processes (``python -m learner.ingest_pool``)
that each take a serialized ``ExperienceBatch`` and answer with the batch's rows as an Arrow
IPC stream (``segments.SCHEMA``, rowids 0..n-1; the writer numbers them) or the reason it is
refused. Robot bytes are parsed only in the children, so a batch that upsets the parser costs a
restarted child, not the learner.

The pipes carry protobuf in and Arrow out, nothing else (no pickle): framing is a 4-byte
little-endian length, answers start with one status byte. The parent checks every answer
(schema, row count, the batch's robot id) before the store sees it.
"""
from __future__ import annotations

import collections
import fcntl
import logging
import os
import pathlib
import struct
import subprocess
import sys
import threading
import time

import pyarrow as pa

log = logging.getLogger("tether.learner.ingest_pool")

_LEN = struct.Struct("<I")
OK, REFUSED, FAILED = 0, 1, 2
READY = b"tether-validator-ready\n"
START_TIMEOUT_S = 60.0
ANSWER_TIMEOUT_S = 30.0  # a child that sits on one batch this long is killed and replaced


class ValidatorUnavailable(OSError):
    """No answer from a validator child (it died or hung); nothing was stored, resend."""


def default_workers() -> int:
    """One child per two cores, two to four: two pipelined children beat one even on two
    cores (sim.bench_ingest: 17.4k vs 11.6-15.1k transitions/s, 10.2k without children)."""
    return max(2, min(4, (os.cpu_count() or 2) // 2))


# -- the child ---------------------------------------------------------------------------------
def _read_exact(f, n: int) -> bytes | None:
    data = f.read(n)
    return data if data is not None and len(data) == n else None


def _answer(out, status: int, payload: bytes) -> None:
    out.write(bytes([status]) + _LEN.pack(len(payload)))
    out.write(payload)  # not joined to the header: that copied every answer once more
    out.flush()


PIPE_BYTES = 1 << 20


def _widen(fd: int) -> None:
    """Pipes of 1 MiB (Linux; 64 KiB by default): a batch or an answer passes in one go
    instead of a wake-up per 64 KiB on each side. Best effort."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (AttributeError, OSError):  # not Linux, or over /proc/sys/fs/pipe-max-size
        pass


def worker_main() -> int:
    from google.protobuf.message import DecodeError

    from learner import segments as seg
    from learner.validate import validate_batch
    from tether.wire import tether_pb2 as pb

    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write(READY)
    out.flush()
    while True:
        head = _read_exact(inp, _LEN.size)
        if head is None:
            return 0  # the parent closed the pipe: stop
        data = _read_exact(inp, _LEN.unpack(head)[0])
        if data is None:
            return 0
        try:
            batch = pb.ExperienceBatch.FromString(data)
            rows = validate_batch(batch)
            table = seg.build_table(rows, 0) if rows else seg.SCHEMA.empty_table()
            _answer(out, OK, seg.encode_frame(table))
        except (ValueError, DecodeError) as e:
            _answer(out, REFUSED, str(e).encode("utf-8", "replace"))
        except Exception as e:  # noqa: BLE001 (the parent reports it; the child goes on)
            _answer(out, FAILED, repr(e).encode("utf-8", "replace")[:2000])


# -- the parent --------------------------------------------------------------------------------
class _Call:
    """One batch sent to a child; ``wait`` returns (status, payload). A held lock is the
    cheapest completion CPython has."""
    __slots__ = ("_lock", "result", "error", "sent_at")

    def __init__(self):
        self.sent_at = time.monotonic()
        self._lock = threading.Lock()
        self._lock.acquire()
        self.result: tuple[int, bytes] | None = None
        self.error: str | None = None

    def finish(self, result=None, error: str | None = None) -> None:
        self.result, self.error = result, error
        self._lock.release()

    def wait(self, timeout: float) -> tuple[int, bytes] | None:
        """The answer, or None when there was none in ``timeout`` seconds."""
        if not self._lock.acquire(timeout=timeout):
            return None
        if self.error is not None:
            raise ValidatorUnavailable(f"the ingest validator failed on this batch "
                                       f"({self.error}); nothing was stored, resend it")
        return self.result


class _Worker:
    """A child and the batches it was sent: they are pipelined (the child always has the next
    one waiting) and answered in order, read back by one thread per child."""

    def __init__(self, index: int):
        self.index = index
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "learner.ingest_pool"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, cwd=pathlib.Path(__file__).resolve().parents[1])
        _widen(self.proc.stdin.fileno())
        _widen(self.proc.stdout.fileno())
        self.pending: collections.deque[_Call] = collections.deque()
        self.dead: str | None = None
        self.killed = False  # by us (it hung or lied): replaced at once, whatever it still says
        self.killed_why: str | None = None
        self._send_lock = threading.Lock()

    def start(self, timeout: float) -> "_Worker":
        got = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(timeout)
        if not got or got[0] != READY:
            self.kill()
            raise ValidatorUnavailable(
                f"ingest validator {self.index} did not start within {timeout:.0f} s (said "
                f"{got[0][:200] if got else b''!r}); run `{sys.executable} -m "
                f"learner.ingest_pool` by hand to see why")
        threading.Thread(target=self._answers, name=f"ingest-validator-{self.index}",
                         daemon=True).start()
        return self

    def send(self, data: bytes) -> _Call:
        call = _Call()
        with self._send_lock:
            if self.dead is not None:
                raise ValidatorUnavailable(f"ingest validator {self.index} is gone "
                                           f"({self.dead}); nothing was stored, resend")
            self.pending.append(call)  # before the bytes: the answer may come at once
            try:
                self.proc.stdin.write(_LEN.pack(len(data)))
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:  # a broken pipe: the answer thread fails it
                self.kill()
                log.debug("ingest validator %d: write failed: %r", self.index, e)
        return call

    def _answers(self) -> None:
        out = self.proc.stdout
        why = "its pipe closed"
        try:
            while True:
                head = _read_exact(out, 1 + _LEN.size)
                payload = None if head is None else _read_exact(out, _LEN.unpack(head[1:])[0])
                if payload is None:
                    break
                self.pending.popleft().finish((head[0], payload))
        except (OSError, ValueError, IndexError) as e:
            why = repr(e)
        self.kill()
        code = self.proc.wait()
        with self._send_lock:
            self.dead = f"{self.killed_why or why}, exit status {code}"
            while self.pending:
                self.pending.popleft().finish(error=self.dead)

    def kill(self, why: str | None = None) -> None:
        self.killed_why = self.killed_why or why
        self.killed = True
        if self.proc.poll() is None:
            self.proc.kill()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.kill()
            self.proc.wait()


class ValidatorPool:
    """``validate(raw, robot_id, n_records)``: the batch's rows as a table (rowids 0..n-1), or
    ValueError naming what is wrong (nothing stored), or ``ValidatorUnavailable`` (resend).
    Thread-safe; a child that dies or hangs is replaced on the next batch."""

    def __init__(self, workers: int | None = None, *, answer_timeout_s: float = ANSWER_TIMEOUT_S):
        n = default_workers() if workers is None else workers
        if n < 1:
            raise ValueError(f"ValidatorPool needs workers >= 1, got {n}")
        self.workers, self.answer_timeout_s = n, answer_timeout_s
        self.restarts = 0
        self._lock = threading.Lock()
        self._next = 0
        self._closed = False
        started = [_Worker(i) for i in range(n)]  # all start at once, then each is awaited
        try:
            self._all = [w.start(START_TIMEOUT_S) for w in started]
        except BaseException:
            for w in started:
                w.kill()
            raise
        self._stop = threading.Event()
        threading.Thread(target=self._watchdog, name="ingest-validator-watchdog",
                         daemon=True).start()

    def _watchdog(self) -> None:
        """Kill a child whose oldest batch waits past the timeout: a hung child (or one that
        stopped reading, leaving a sender blocked on its full pipe) fails what it holds, and the
        next batch starts a new one."""
        period = min(1.0, self.answer_timeout_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            for w in list(self._all):
                try:
                    oldest = w.pending[0].sent_at
                except IndexError:
                    continue
                if now - oldest > self.answer_timeout_s and not w.killed:
                    log.error("ingest validator %d: no answer in %.0f s; killing it",
                              w.index, self.answer_timeout_s)
                    w.kill(f"no answer in {self.answer_timeout_s:.0f} s")

    def _pick(self) -> _Worker:
        with self._lock:
            if self._closed:
                raise ValidatorUnavailable("the ingest validators are closed")
            i = self._next = (self._next + 1) % self.workers
            w = self._all[i]
            if w.dead is not None or w.killed:
                log.error("ingest validator %d failed (%s); starting a new one", i,
                          w.dead or "killed: it hung or gave a wrong answer")
                self.restarts += 1
                w = self._all[i] = _Worker(i).start(START_TIMEOUT_S)
            return w

    def validate(self, raw: bytes, robot_id: str, n_records: int) -> pa.Table:
        from learner import segments as seg

        worker = self._pick()
        # the watchdog kills a child that hangs (its answer thread then fails this call); the
        # wait's own limit is a backstop
        answer = worker.send(raw).wait(self.answer_timeout_s + 5.0)
        if answer is None:
            worker.kill(f"no answer in {self.answer_timeout_s:.0f} s")
            raise ValidatorUnavailable(f"the ingest validator did not answer within "
                                       f"{self.answer_timeout_s:.0f} s; it was replaced, nothing "
                                       f"was stored, resend")
        status, payload = answer
        if status == REFUSED:
            raise ValueError(payload.decode("utf-8", "replace"))
        if status != OK:
            raise ValidatorUnavailable(f"the ingest validator failed: "
                                       f"{payload.decode('utf-8', 'replace')}")
        table = seg.decode_frame(payload)
        # trust nothing the child says: it parsed robot bytes
        if (table.schema != seg.SCHEMA or table.num_rows != n_records or
                # (a list count: a pyarrow.compute call costs ~50 us of Python per batch)
                table.column("robot_id").to_pylist().count(robot_id) != n_records):
            worker.kill("it answered rows that do not fit the batch")
            raise ValidatorUnavailable(
                f"the ingest validator answered {table.num_rows} rows of schema "
                f"{table.schema.names[:4]}... for a batch of {n_records} records from "
                f"{robot_id!r}; its process was replaced, nothing was stored")
        return table

    def status(self) -> dict:
        """For the learner's status file: children, how many are running, restarts so far."""
        return {"workers": self.workers, "restarts": self.restarts,
                "running": sum(w.dead is None and not w.killed for w in self._all),
                "in_flight": sum(len(w.pending) for w in self._all)}

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._stop.set()
        for w in self._all:
            w.close()


if __name__ == "__main__":
    sys.exit(worker_main())
