"""The experience stream: sends spooled batches to the learner, oldest first, and deletes each
from the spool only after the learner's Ack (it acks only after a durable store).

Transport: one ``StreamExperience`` call with up to ``window`` batches in flight, acks in order
(the learner's backpressure holds the window open); an idle stream is closed and reopened on the
next batch. A learner without the streaming call (UNIMPLEMENTED) gets one ``PushExperience`` per
batch instead, for the rest of this client's life.

At-least-once: after a failed stream or push, every unacknowledged batch is resent after a
capped, jittered exponential backoff; the learner deduplicates by (robot, episode, seq), so
resends are safe. A batch the learner refuses as malformed (INVALID_ARGUMENT) is poison: resending
cannot help and would block every batch behind it, so it is quarantined in the spool's
``corrupt/`` folder and the stream reconnects at once.

Size: the learner refuses a message over its receive limit (``LEARNER_MAX_MESSAGE_BYTES``) with
RESOURCE_EXHAUSTED, which looks transient and would be retried forever. A spooled batch over
``max_batch_bytes`` therefore never goes on the stream: it is sent as several PushExperience calls
of whole records that fit (same batch_seq; the learner deduplicates by record, so a resend after a
failure is safe) and acknowledged in the spool once all are stored. A single record too large for
any message cannot be sent at all: the batch is quarantined (after its other records are stored),
with an error naming the record.
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
# learner/service.py MAX_MESSAGE_BYTES (runtime/ never imports learner/; a test keeps them equal)
LEARNER_MAX_MESSAGE_BYTES = 32 * 1024 * 1024
MAX_BATCH_BYTES = LEARNER_MAX_MESSAGE_BYTES - 64 * 1024  # headroom for the batch's own fields
CHANNEL_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   # a restarted learner is reached within ~2 s, not gRPC's default of up to 2 min
                   ("grpc.initial_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
STREAM_WINDOW = 8           # batches sent on a stream and not yet acknowledged
STREAM_IDLE_CLOSE_S = 5.0   # an idle stream is closed (it holds a learner thread)
BATCH_SEQ_TRAILER = "tether-batch-seq"  # the learner names a refused batch in this trailer


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
                 backoff_cap_s: float = 2.0, window: int = STREAM_WINDOW, stream: bool = True,
                 channel_factory: Callable[[str], grpc.Channel] = insecure_channel,
                 max_batch_bytes: int = MAX_BATCH_BYTES):
        """``rpc_timeout_s`` bounds a push, and the wait for each ack on a stream."""
        if rpc_timeout_s <= 0:
            raise ValueError(f"ExperienceClient rpc_timeout_s must be > 0, got {rpc_timeout_s}")
        if window < 1:
            raise ValueError(f"ExperienceClient window must be >= 1, got {window}")
        if not 0 < max_batch_bytes <= MAX_BATCH_BYTES:
            raise ValueError(f"ExperienceClient max_batch_bytes must be in (0, {MAX_BATCH_BYTES}] "
                             f"(the learner's message limit), got {max_batch_bytes}")
        self.max_batch_bytes = int(max_batch_bytes)
        self.batches_split = 0
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
        self.window = window
        self.transport = "stream" if stream else "push"
        self._window = threading.Condition()
        self._inflight: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._call = None
        self._ack_timed_out: int | None = None
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
        """Quantile q of recent send-to-ack times (0.0 when none yet)."""
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
                "batches_split": self.batches_split,
                "last_error": self.last_error, "pending_records": self.spool.pending(),
                "ack_latency_p50_s": self.ack_latency_p50_s,
                "ack_latency_p99_s": self.ack_latency_p99_s, "transport": self.transport}

    # -- the sender thread -------------------------------------------------------------------
    def _run(self) -> None:
        stub = pb_grpc.LearnerStub(self._channel)
        while not self._stop.is_set():
            if not self.spool.wait(0.1):
                continue
            oldest = self.spool.peek(1)
            if oldest and oldest[0][1].ByteSize() > self.max_batch_bytes:
                with self._idle:
                    self._busy = True
                try:
                    self._send_oversized(stub, *oldest[0])
                finally:
                    with self._idle:
                        self._busy = False
                        self._idle.notify_all()
                continue
            if self.transport == "stream":
                self._stream(stub)
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

    # -- streaming -----------------------------------------------------------------------------
    def _stream(self, stub) -> None:
        """One StreamExperience call, until it ends, fails or goes idle."""
        ended = threading.Event()
        with self._window:
            self._inflight.clear()
        self._ack_timed_out = None
        try:
            self._call = stub.StreamExperience(self._requests(ended))
            for ack in self._call:
                if not self._on_stream_ack(ack):
                    self._call.cancel()
                    return
        except grpc.RpcError as e:
            self._on_stream_error(e)
        except ValueError:
            if not self._stop.is_set():
                raise  # stop() closed the channel under us; unacked batches stay spooled
        finally:
            ended.set()
            self._call = None

    def _requests(self, ended: threading.Event):
        """The batches of one stream: the next spooled ones while the window has room."""
        last, idle_since = 0, time.monotonic()
        while not (ended.is_set() or self._stop.is_set()):
            with self._window:
                if self._inflight:
                    oldest, sent_at = next(iter(self._inflight.items()))
                    if time.monotonic() - sent_at > self.rpc_timeout_s:
                        self._ack_timed_out = oldest
                        call = self._call
                        if call is not None:
                            call.cancel()
                        return
                if len(self._inflight) >= self.window:
                    self._window.wait(0.05)
                    continue
                idle = not self._inflight
            nxt = self.spool.peek(1, after=last)
            if not nxt:
                if idle and time.monotonic() - idle_since > STREAM_IDLE_CLOSE_S:
                    return  # half-close: the learner ends the call once its acks are out
                self.spool.wait_after(last, 0.05)
                continue
            if nxt[0][1].ByteSize() > self.max_batch_bytes:
                return  # over the learner's limit: _run sends it in parts once it is the oldest
            last, batch = nxt[0]
            with self._window:
                self._inflight[last] = time.monotonic()
            idle_since = time.monotonic()
            self.batches_sent += 1
            yield batch

    def _on_stream_ack(self, ack: pb.Ack) -> bool:
        with self._window:
            expected = next(iter(self._inflight), None)
            if ack.batch_seq != expected or (ack.robot_id and ack.robot_id != self.robot_id):
                mismatch = True
            else:
                mismatch, sent_at = False, self._inflight.pop(expected)
                self._window.notify_all()
        if mismatch:
            self._fail(f"learner acked batch {ack.batch_seq} of {ack.robot_id!r} while batch "
                       f"{expected} of {self.robot_id!r} was next; resending")
            return False
        self._latencies.append(time.monotonic() - sent_at)
        self.spool.ack(expected)
        self.batches_acked += 1
        self.records_stored += ack.stored
        self.records_duplicate += ack.duplicates
        self._backoff.reset()
        return True

    def _on_stream_error(self, e: grpc.RpcError) -> None:
        if self._stop.is_set():
            return
        code = e.code() if hasattr(e, "code") else None
        if code == grpc.StatusCode.UNIMPLEMENTED:
            log.info("experience: %s has no StreamExperience; using PushExperience", self.addr)
            self.transport = "push"
            return
        with self._window:
            oldest = next(iter(self._inflight), None)
        if code == grpc.StatusCode.INVALID_ARGUMENT and oldest is not None:
            named = _trailer_seq(e)
            # acks arrive in order, so the refused batch is the oldest unacknowledged one
            bad = named if named is not None and named in self._inflight else oldest
            self._quarantine(bad, e)
            return  # the rest of the window is resent on a new stream, at once
        if self._ack_timed_out is not None:
            self._fail(f"no ack for batch {self._ack_timed_out} from {self.addr} within "
                       f"{self.rpc_timeout_s} s; resending")
            return
        self._fail(f"StreamExperience to {self.addr}: {code.name if code else 'error'}: "
                   f"{_details(e)}")

    def _quarantine(self, batch_seq: int, e: grpc.RpcError) -> None:
        self.batches_quarantined += 1
        self.last_error = f"batch {batch_seq} refused: {_details(e)}"
        self.spool.quarantine(batch_seq, f"was refused by the learner as invalid ({_details(e)})")

    # -- one batch per call (learners without StreamExperience) --------------------------------
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
                self._quarantine(batch_seq, e)
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

    def _send_oversized(self, stub, batch_seq: int, batch: pb.ExperienceBatch) -> None:
        """A batch over ``max_batch_bytes``: its records in parts that fit, one push each."""
        limit = self.max_batch_bytes
        fits, too_big, parts, size = [], [], [[]], 0
        for i, r in enumerate(batch.records):
            n = r.ByteSize() + 16  # the record's tag and length prefix inside the batch
            if n > limit:
                too_big.append(f"record {i} (episode {r.episode_id!r}, seq {r.seq}) is {n} bytes")
                continue
            if parts[-1] and size + n > limit:
                parts.append([])
                size = 0
            parts[-1].append(r)
            fits.append(r)
            size += n
        log.warning("experience: batch %d is %d bytes, over the %d bytes the learner accepts in "
                    "one message; sending its %d records that fit in %d parts", batch_seq,
                    batch.ByteSize(), limit, len(fits), len(parts) if fits else 0)
        stored = duplicates = 0
        for part in parts if fits else []:
            self.batches_sent += 1
            try:
                ack = stub.PushExperience(pb.ExperienceBatch(robot_id=batch.robot_id,
                                                             batch_seq=batch_seq, records=part),
                                          timeout=self.rpc_timeout_s)
            except ValueError:
                if self._stop.is_set():
                    return  # stop() closed the channel; the batch stays spooled
                raise
            except grpc.RpcError as e:
                if self._stop.is_set():
                    return
                code = e.code() if hasattr(e, "code") else None
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    self._quarantine(batch_seq, e)
                    return
                self._fail(f"PushExperience of part of batch {batch_seq} to {self.addr}: "
                           f"{code.name if code else 'error'}: {_details(e)}")
                return  # all of it again later: the parts already stored come back duplicates
            stored, duplicates = stored + ack.stored, duplicates + ack.duplicates
        self.batches_split += 1
        self.records_stored += stored
        self.records_duplicate += duplicates
        self._backoff.reset()
        if too_big:
            self.batches_quarantined += 1
            self.last_error = (f"batch {batch_seq}: {'; '.join(too_big)}, over the learner's "
                               f"message limit of {limit} bytes")
            self.spool.quarantine(batch_seq, f"holds records too large to send ({'; '.join(too_big)}"
                                             f"; limit {limit} bytes; its {len(fits)} other "
                                             f"records were stored); record smaller images or "
                                             f"fewer cameras")
            return
        self.spool.ack(batch_seq)
        self.batches_acked += 1

    def _fail(self, message: str) -> None:
        self.errors += 1
        self.last_error = message
        delay = self._backoff.next_delay()
        # the first failure of an outage is news; its retries go to debug (counted in errors)
        level = logging.WARNING if self._backoff.failures <= 1 else logging.DEBUG
        log.log(level, "experience: %s; retrying in %.2f s", message, delay)
        self._stop.wait(delay)


def _trailer_seq(e: grpc.RpcError) -> int | None:
    try:
        for key, value in e.trailing_metadata() or ():
            if key == BATCH_SEQ_TRAILER:
                return int(value)
    except (AttributeError, TypeError, ValueError):
        pass
    return None


def _details(e: grpc.RpcError) -> str:
    try:
        return e.details() or str(e)
    except Exception:  # some RpcError subclasses (e.g. a closed channel) carry no details
        return str(e)
