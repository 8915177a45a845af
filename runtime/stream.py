"""The experience stream: sends spooled batches to the learner, oldest first, and deletes each
from the spool only after the learner's Ack (it acks only after a durable store).

At-least-once: a batch whose RPC failed is resent after a capped, jittered exponential backoff;
the learner deduplicates by (robot, episode, seq), so resends are safe. A batch the learner
refuses as malformed (INVALID_ARGUMENT) is poison: resending cannot help and would block every
batch behind it, so it is quarantined in the spool's ``corrupt/`` folder.
"""
from __future__ import annotations

import collections
import logging
import random
import threading
import time
from typing import Callable

import grpc

from runtime.spool import Spool
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


def insecure_channel(addr: str) -> grpc.Channel:
    return grpc.insecure_channel(addr, options=CHANNEL_OPTIONS)


class Backoff:
    """Exponential backoff, capped and jittered (full range [d/2, d]) so a fleet that lost the
    learner at once does not reconnect at once."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 2.0, rng: random.Random | None = None):
        if not 0 < base_s <= cap_s:
            raise ValueError(f"Backoff needs 0 < base_s <= cap_s, got {base_s}, {cap_s}")
        self.base_s, self.cap_s = base_s, cap_s
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        d = min(self.cap_s, self.base_s * (2 ** min(self.failures, 30)))
        self.failures += 1
        return d * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        self.failures = 0


class ExperienceClient:
    """Background sender of a spool's batches. ``start``/``stop``/``drain``; counters are plain
    attributes read by the node's stats."""

    def __init__(self, addr: str, spool: Spool, robot_id: str, *, rpc_timeout_s: float = 10.0,
                 backoff_cap_s: float = 2.0,
                 channel_factory: Callable[[str], grpc.Channel] = insecure_channel):
        if rpc_timeout_s <= 0:
            raise ValueError(f"ExperienceClient rpc_timeout_s must be > 0, got {rpc_timeout_s}")
        if robot_id != spool.robot_id:
            raise ValueError(f"ExperienceClient robot_id {robot_id!r} differs from the spool's "
                             f"{spool.robot_id!r}; a robot can only send its own experience")
        self.addr = addr
        self.spool = spool
        self.robot_id = robot_id
        self.rpc_timeout_s = rpc_timeout_s
        self._backoff = Backoff(cap_s=backoff_cap_s)
        self._channel_factory = channel_factory
        self._channel: grpc.Channel | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._busy = False
        self.batches_sent = 0
        self.batches_acked = 0
        self.batches_quarantined = 0
        self.records_stored = 0
        self.records_duplicate = 0
        self.errors = 0
        self.last_error: str | None = None
        self._latencies: collections.deque[float] = collections.deque(maxlen=1024)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "ExperienceClient":
        if self._thread is not None:
            raise RuntimeError("ExperienceClient already started")
        self._channel = self._channel_factory(self.addr)
        self._thread = threading.Thread(target=self._run, name="tether-experience", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending. An in-flight RPC is cancelled; its batch stays spooled for next time."""
        self._stop.set()
        if self._channel is not None:
            self._channel.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, timeout: float) -> bool:
        """Wait until the spool is empty (every batch acknowledged or quarantined)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self.spool.pending_batches() or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return not (self.spool.pending_batches() or self._busy)
                self._idle.wait(min(left, 0.05))
        return True

    # -- stats -------------------------------------------------------------------------------
    def ack_latency_s(self, q: float) -> float:
        """Quantile q of recent PushExperience round trips (0.0 when none yet)."""
        lat = sorted(self._latencies)
        if not lat:
            return 0.0
        return lat[min(len(lat) - 1, int(q * len(lat)))]

    @property
    def ack_latency_p50_s(self) -> float:
        return self.ack_latency_s(0.50)

    @property
    def ack_latency_p99_s(self) -> float:
        return self.ack_latency_s(0.99)

    def stats(self) -> dict:
        return {"batches_sent": self.batches_sent, "batches_acked": self.batches_acked,
                "batches_quarantined": self.batches_quarantined, "errors": self.errors,
                "last_error": self.last_error, "pending_records": self.spool.pending(),
                "ack_latency_p50_s": self.ack_latency_p50_s,
                "ack_latency_p99_s": self.ack_latency_p99_s}

    # -- the sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        stub = pb_grpc.LearnerStub(self._channel)
        while not self._stop.is_set():
            if not self.spool.wait(0.1):
                continue
            with self._idle:
                self._busy = True
            try:
                for batch_seq, batch in self.spool.peek(1):
                    self._send(stub, batch_seq, batch)
            finally:
                with self._idle:
                    self._busy = False
                    self._idle.notify_all()

    def _send(self, stub, batch_seq: int, batch: pb.ExperienceBatch) -> None:
        t0 = time.monotonic()
        self.batches_sent += 1
        try:
            ack = stub.PushExperience(batch, timeout=self.rpc_timeout_s)
        except ValueError:
            if self._stop.is_set():
                return  # stop() closed the channel under us; the batch stays spooled
            raise
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if self._stop.is_set():
                return
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                self.batches_quarantined += 1
                self.last_error = f"batch {batch_seq} refused: {_details(e)}"
                self.spool.quarantine(batch_seq, f"was refused by the learner as invalid "
                                                 f"({_details(e)})")
                return
            self._fail(f"PushExperience of batch {batch_seq} to {self.addr}: "
                       f"{code.name if code else 'error'}: {_details(e)}")
            return
        if ack.batch_seq != batch_seq or (ack.robot_id and ack.robot_id != self.robot_id):
            self._fail(f"learner acked batch {ack.batch_seq} of {ack.robot_id!r} for batch "
                       f"{batch_seq} of {self.robot_id!r}; resending")
            return
        self._latencies.append(time.monotonic() - t0)
        self.spool.ack(batch_seq)
        self.batches_acked += 1
        self.records_stored += ack.stored
        self.records_duplicate += ack.duplicates
        self._backoff.reset()

    def _fail(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        delay = self._backoff.next_delay()
        # the first failure of an outage is news; its retries go to debug (counted in errors)
        level = logging.WARNING if self._backoff.failures <= 1 else logging.DEBUG
        log.log(level, "experience: %s; retrying in %.2f s", message, delay)
        self._stop.wait(delay)


def _details(e: grpc.RpcError) -> str:
    try:
        return e.details() or str(e)
    except Exception:  # some RpcError subclasses (e.g. a closed channel) carry no details
        return str(e)
