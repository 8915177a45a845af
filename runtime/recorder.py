"""The recorder: turns executed control ticks into chunk-level transitions (``pb.ChunkRecord``)
and hands them to the spool.

A span is the run of consecutive ticks executed from one chunk. When the executing chunk changes
(or the episode ends) the span becomes one record: the chunk's observation, the actions actually
executed (post-merge, post-envelope, normalized), their offsets inside the chunk, the rows the
policy proposed for those ticks before the envelope saturated or rate-limited them
(``policy_actions``), the behaviour log-probability of exactly those proposed rows under the
chunk's Gaussian, the summed reward and the done flags of the span's last tick. The learner's
policy gradient needs the proposed rows: an executed row pinned at a bound is not a sample of
the chunk's Gaussian, and treating it as one biases every update (README, "The recorded actions
biased the learning signal"). Hold ticks (no chunk: an underrun) belong to the span they
interrupt; hold ticks before the episode's first chunk go to the first record.

Ticks a human operator drove (``TickRecord.operator``: a teleoperation takeover) become
human-intervention records (``human_intervention``): the observation before the operator's first
tick, the operator's commands as rows 0, 1, ... (up to the policy's horizon per record, empty
prefix) and no behaviour log-probability; the learner imitates them.

``VerifierInfo.actions_clamped`` counts the span's envelope *interventions*: with the node's
``envelope`` given, a tick counts when the envelope moved the command beyond plain saturation at
the action bounds (``Envelope.intervened``, read right after that tick's ``apply`` on the same
control thread); saturation is routine and would drown the verifier's "unsafe" label. Without
an envelope every clamped tick counts.

The control thread calls ``on_tick``; a spool append is two fsynced writes (about 7 ms median,
30 ms p99 measured on the dev VM), too slow for a control tick, so batches go to the spool on a
background writer thread through a bounded queue (``background=False`` writes inline, for tests
and tools).
"""
from __future__ import annotations

import logging
import queue
import threading
import uuid

import numpy as np

from runtime import tensors
from runtime.distributions import gaussian_log_prob
from runtime.spool import Spool, SpoolFull
from runtime.types import Chunk, TickRecord
from tether.wire import tether_pb2 as pb

log = logging.getLogger(__name__)

_STOP = object()


class _Span:
    """Ticks of one chunk, accumulating until the chunk changes."""

    def __init__(self, chunk: Chunk, tick: int, held: int = 0, held_reward: float = 0.0,
                 operator: bool = False):
        self.chunk = chunk
        self.operator = operator  # the operator's ticks: rows 0, 1, ... of ``chunk``'s shape
        self.start_tick = tick
        self.actions: list[np.ndarray] = []
        self.proposed: list[np.ndarray] = []
        self.offsets: list[int] = []
        self.reward = held_reward
        self.underrun = held
        self.clamped = 0
        self.last: TickRecord | None = None

    def add(self, t: TickRecord, intervened: bool) -> None:
        if self.operator:
            self.actions.append(np.asarray(t.action, np.float32))
            self.offsets.append(len(self.offsets))
        elif t.chunk is None:
            self.underrun += 1
        else:
            self.actions.append(np.asarray(t.action, np.float32))
            self.proposed.append(np.asarray(t.action if t.policy_action is None
                                            else t.policy_action, np.float32))
            self.offsets.append(int(t.offset))
        self.clamped += int(intervened)
        self.reward += float(t.reward)
        self.last = t


def observation_to_proto(obs) -> pb.Observation:
    return pb.Observation(
        images={name: tensors.to_proto(np.asarray(img)) for name, img in obs.images.items()},
        state=tensors.to_proto(np.asarray(obs.state, np.float32)),
        instruction=obs.instruction, timestamp=float(obs.timestamp))


class Recorder:
    """Records executed ticks as chunk records. ``on_tick`` is called from the control thread
    only; spooling happens on a writer thread (see the module docstring)."""

    def __init__(self, spool: Spool, robot_id: str, task: str, batch_records: int = 8, *,
                 background: bool = True, queue_batches: int = 64, envelope=None):
        if batch_records < 1:
            raise ValueError(f"Recorder batch_records must be >= 1, got {batch_records}")
        if queue_batches < 1:
            raise ValueError(f"Recorder queue_batches must be >= 1, got {queue_batches}")
        self.spool = spool
        self.robot_id = robot_id
        self.task = task
        self.batch_records = int(batch_records)
        self.envelope = envelope
        self.episode_id: str | None = None
        self._span: _Span | None = None
        self._held = 0          # hold ticks of this episode before its first chunk
        self._held_reward = 0.0
        self._buffer: list[pb.ChunkRecord] = []
        self.records = 0
        self.episodes = 0
        self.records_dropped = 0   # lost to a full spool or a write error (logged)
        self.interventions = 0     # human-intervention records started (operator spans)
        self._last_chunk: Chunk | None = None  # the shape, version and weights operator rows take
        self.last_error: str | None = None
        self._queue: queue.Queue | None = None
        self._writer: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=queue_batches)
            self._writer = threading.Thread(target=self._write_loop, name="tether-recorder",
                                            daemon=True)
            self._writer.start()

    @property
    def transitions(self) -> int:
        return self.records

    # -- episodes ----------------------------------------------------------------------------
    def start_episode(self, episode_id: str | None = None) -> str:
        if self.episode_id is not None:
            self.end_episode()
        self.episode_id = episode_id or f"{self.robot_id}-{uuid.uuid4().hex}"
        self._span = None
        self._held, self._held_reward = 0, 0.0
        return self.episode_id

    def end_episode(self) -> None:
        """Close the open span and flush this episode's records to the spool."""
        if self.episode_id is None:
            return
        self._close_span()
        if self._held:
            log.warning("recorder: episode %s ended after %d hold ticks and no chunk; "
                        "nothing to record", self.episode_id, self._held)
        self._flush()
        self.episodes += 1
        self.episode_id = None

    def on_tick(self, t: TickRecord) -> None:
        if self.episode_id is None:
            log.warning("recorder: tick %d arrived outside an episode; starting one", t.tick)
            self.start_episode()
        if t.chunk is not None:
            self._last_chunk = t.chunk
        if t.operator:
            self._operator_tick(t)
            return
        if self._span is not None and self._span.operator:
            self._close_span()  # the operator let go: the policy's ticks are its own again
        intervened = bool(t.clamped) and (self.envelope is None or self.envelope.intervened())
        if t.chunk is None:
            if self._span is None:
                self._held += 1
                self._held_reward += float(t.reward)
            else:
                self._span.add(t, intervened)
            return
        span = self._span
        if span is None or not _same_chunk(span.chunk, t.chunk):
            self._close_span()
            self._span = span = _Span(t.chunk, t.tick, self._held, self._held_reward)
            self._held, self._held_reward = 0, 0.0
        span.add(t, intervened)

    def _operator_tick(self, t: TickRecord) -> None:
        """A tick a human operator drove: its command becomes a row of a human-intervention
        record (the observation of the span's first tick, up to a chunk's horizon of rows,
        prefix empty), which the learner imitates rather than weighs as the policy's own."""
        span = self._span
        if span is not None and span.operator and len(span.offsets) < span.chunk.horizon:
            span.add(t, False)
            return
        last = self._last_chunk
        if t.observation is None or last is None:
            # nothing to learn from: no observation this tick, or no chunk yet to give the
            # record its shape; the tick counts as held, as a tick without a chunk would
            if span is None:
                self._held += 1
                self._held_reward += float(t.reward)
            else:
                span.underrun += 1
                span.reward += float(t.reward)
                span.last = t
            return
        self._close_span()
        zeros = np.zeros_like(last.mean, dtype=np.float32)
        chunk = Chunk(chunk_id=-1, epoch=last.epoch, policy_version=last.policy_version,
                      weight_sha256=last.weight_sha256, observation=t.observation,
                      start_tick=t.tick, actions=zeros, mean=zeros, log_std=zeros, prefix=zeros,
                      prefix_len=0)
        self._span = span = _Span(chunk, t.tick, self._held, self._held_reward, operator=True)
        self._held, self._held_reward = 0, 0.0
        self.interventions += 1
        span.add(t, False)

    # -- records -----------------------------------------------------------------------------
    def _close_span(self) -> None:
        span, self._span = self._span, None
        if span is None or span.last is None:
            return
        self._buffer.append(self._record(span))
        self.records += 1
        if len(self._buffer) >= self.batch_records:
            self._flush()

    def _record(self, span: _Span) -> pb.ChunkRecord:
        c = span.chunk
        a_dim = int(c.mean.shape[1])
        actions = (np.stack(span.actions) if span.actions
                   else np.zeros((0, a_dim), np.float32)).astype(np.float32)
        offsets = np.asarray(span.offsets, np.int64)
        proposed = (np.stack(span.proposed).astype(np.float32) if span.proposed else None)
        v = c.verdict
        last = span.last
        return pb.ChunkRecord(
            robot_id=self.robot_id, episode_id=self.episode_id, seq=self.spool.next_record_seq(),
            policy_version=int(c.policy_version), weight_sha256=c.weight_sha256, task=self.task,
            observation=observation_to_proto(c.observation),
            prefix=tensors.to_proto(np.asarray(c.prefix, np.float32)), prefix_len=int(c.prefix_len),
            actions=tensors.to_proto(actions), offsets=[int(o) for o in offsets],
            # an operator's rows have no behaviour probability under the policy
            behaviour_log_prob=(0.0 if proposed is None
                                else gaussian_log_prob(c.mean, c.log_std, proposed, offsets,
                                                       c.row_correlation)),
            policy_actions=None if proposed is None else tensors.to_proto(proposed),
            human_intervention=span.operator,
            reward=span.reward, terminated=bool(last.terminated), truncated=bool(last.truncated),
            success=bool(last.success),
            verifier=pb.VerifierInfo(candidates=int(v.candidates), chosen=int(v.chosen),
                                     rejected=int(v.rejected), actions_clamped=span.clamped,
                                     scores=[float(s) for s in v.scores], seconds=float(v.seconds),
                                     rounds=int(v.rounds),
                                     advantages=[float(a) for a in v.advantages],
                                     veto_overridden=bool(v.override), reason=str(v.reason)[:256]),
            start_tick=int(span.start_tick), underrun_ticks=span.underrun)

    def _flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        if self._queue is None:
            self._append(batch)
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            # the disk is slower than the robot produces data: better a late tick than lost data
            log.warning("recorder: writer queue full (%d batches); the control thread waits "
                        "for the spool", self._queue.maxsize)
            self._queue.put(batch)

    def _append(self, batch: list[pb.ChunkRecord]) -> None:
        try:
            self.spool.append(batch)
        except (SpoolFull, OSError) as e:
            self.records_dropped += len(batch)
            self.last_error = str(e)
            log.error("recorder: %d records dropped, the spool refused them: %s", len(batch), e)

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if isinstance(item, threading.Event):
                    item.set()  # a flush marker: everything before it is on disk
                else:
                    self._append(item)
            finally:
                self._queue.task_done()

    # -- lifecycle ---------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Spool the buffered records now and wait until the writer has written them."""
        self._flush()
        if self._queue is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """End the episode (if any), write everything and stop the writer thread."""
        self.end_episode()
        if self._queue is not None and self._writer is not None and self._writer.is_alive():
            self._queue.put(_STOP)
            self._writer.join(timeout)
            if self._writer.is_alive():
                log.error("recorder: writer did not finish within %.1f s; %d batches unwritten",
                          timeout, self._queue.qsize())


def _same_chunk(a: Chunk, b: Chunk) -> bool:
    return a is b or (a.chunk_id == b.chunk_id and a.epoch == b.epoch)
