"""The inference worker: keeps the action queue ahead of the control loop.

Each tick the control loop calls ``maybe_request(tick, observation)`` (never blocks). When the
queued actions fall to ``d + margin`` ticks, where ``d`` is the expected inference delay in ticks
(p95 of recent request-to-queue latencies, clipped to ``d <= H - d``), one request goes out with
the ``d`` actions already committed for ticks ``tick..tick+d-1`` as the prefix. The new chunk
starts at the request tick; its first ``prefix_len`` rows are those committed actions, so a
prefix-conditioned policy continues them smoothly (strategy ``prefix``; others ``latest``).

Execution: ``actions_per_chunk`` s sets how many actions run between two requests, kept to
``d <= s <= H - d`` (a request needs ``d`` queued actions to cover the delay, and one request is
in flight at a time). ``strategy`` picks the merge (runtime/chunks.py); only ``prefix`` passes
the committed actions to the policy. ``sync=True`` is the baseline that makes the robot wait:
after s actions the rest is dropped, the robot holds while the next chunk is inferred, and the
chunk runs from its first row when it arrives. An observation older than ``max_obs_age_s`` is
never inferred from (counted); more than ``error_budget`` failed inferences in a row set
``failed``, which stops the control loop cleanly (holding).

Two modes. ``threaded=True`` (robots): inference runs on the worker's own thread.
``threaded=False`` (simulation on a virtual clock): inference runs inline at the request, and its
chunk is queued only once the clock has advanced by the latency (``simulated_latency_s``, or the
measured wall time), so the simulator moves ``d`` ticks while a chunk is "being inferred" and
runs are reproducible.

``stage(policy)`` swaps a new policy in between two inferences (never mid-chunk, never blocking
the control loop); the one it replaces stays as ``previous`` for ``rollback()``. A staged policy
does not wait for the running chunk to run low: the next tick requests an inference, the worker
swaps before it, and the new policy's chunk takes over after the committed prefix (one tick plus
an inference after staging, instead of up to a chunk's execution horizon).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Protocol

import numpy as np

from robots.base import Observation
from runtime.chunks import ActionQueue, check_strategy
from runtime.clock import Clock
from runtime.priority import realtime
from runtime.status import LatencyWindow
from runtime.types import Chunk, VerifierVerdict

log = logging.getLogger(__name__)


class ChunkPolicy(Protocol):
    """What the worker needs of a policy (``runtime.policy.PolicyRunner`` is one).
    ``infer`` returns an object with ``mean``, ``log_std``, ``actions`` ([H, A], normalized)
    and ``features``."""
    version: int
    weight_sha256: str
    horizon: int
    action_dim: int
    accepts_prefix: bool

    def infer(self, obs: Observation, prefix: np.ndarray | None, prefix_len: int): ...

    def to_command(self, a_n: np.ndarray) -> np.ndarray: ...

    def from_command(self, cmd: np.ndarray) -> np.ndarray: ...


class InferenceWorker:
    def __init__(self, policy: ChunkPolicy, queue: ActionQueue, clock: Clock, *, rate_hz: float,
                 gate=None, margin_ticks: int = 1, threaded: bool = True,
                 simulated_latency_s: float | None = None, window: int = 64,
                 initial_latency_s: float | None = None, strategy: str | None = None,
                 actions_per_chunk: int | None = None, sync: bool = False,
                 max_obs_age_s: float | None = None, error_budget: int = 10):
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if margin_ticks < 0:
            raise ValueError(f"margin_ticks must be >= 0, got {margin_ticks}")
        if actions_per_chunk is not None and not 1 <= actions_per_chunk <= policy.horizon:
            raise ValueError(f"actions_per_chunk must be in [1, H={policy.horizon}], got "
                             f"{actions_per_chunk}")
        if max_obs_age_s is not None and max_obs_age_s <= 0:
            raise ValueError(f"max_obs_age_s must be > 0 (None: no limit), got {max_obs_age_s}")
        if error_budget < 0:
            raise ValueError(f"error_budget must be >= 0, got {error_budget}")
        self.strategy = check_strategy(strategy or ("prefix" if policy.accepts_prefix
                                                    else "latest"))
        if self.strategy == "prefix" and not policy.accepts_prefix:
            raise ValueError(f"strategy 'prefix' needs a policy whose manifest accepts an action "
                             f"prefix; v{policy.version} does not: use latest/ensemble/average")
        self.actions_per_chunk = actions_per_chunk
        self.sync = bool(sync)
        self.max_obs_age_s = max_obs_age_s
        self.error_budget = int(error_budget)
        self.policy = policy
        self.previous: ChunkPolicy | None = None
        self.queue = queue
        self.clock = clock
        self.rate_hz = float(rate_hz)
        self.gate = gate
        self.margin_ticks = int(margin_ticks)
        self.threaded = threaded
        self.simulated_latency_s = simulated_latency_s
        self.latency = LatencyWindow(window)
        self._initial_latency_s = initial_latency_s
        self._cond = threading.Condition()
        self._request: tuple | None = None
        self._in_flight = False
        self._in_flight_epoch = 0  # the epoch of the request in flight
        self._ready: list[tuple[float, Chunk]] = []   # virtual mode: (ready_time, chunk)
        self._staged: ChunkPolicy | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.epoch = 0
        self._chunk_ids = 0
        self.chunks = 0
        self.chunks_rejected = 0
        self._vetoed_epoch = -1  # the epoch whose latest inference the verifier vetoed
        self.chunks_dropped = 0  # inferred for an epoch that had ended
        self.errors = 0
        self.consecutive_errors = 0
        self.stale_observations = 0
        self.swaps = 0
        self.last_swap_time: float | None = None
        self.versions_run: set[int] = set()
        self.rt_refused: str | None = None
        self.sched: tuple[str, int] | None = None  # the inference thread's, once started

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, rt_priority: int | None = None) -> "InferenceWorker":
        """``rt_priority``: run the inference thread under SCHED_FIFO at this priority (below
        the control loop's; runtime/priority.py); ``rt_refused`` says why when not allowed."""
        if self.threaded and self._thread is None:
            self._thread = threading.Thread(target=self._run, args=(rt_priority,),
                                            name="tether-inference", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- control-loop side (non-blocking) ----------------------------------------------------
    def delay_ticks(self) -> int:
        """Expected delay d in ticks: p95 of recent latencies, with d <= H - d."""
        default = self._initial_latency_s
        if default is None:
            default = self.simulated_latency_s if self.simulated_latency_s is not None else 0.0
        p95 = self.latency.quantile(0.95, default=default)
        d = int(math.ceil(p95 * self.rate_hz - 1e-9))
        return max(0, min(d, self.policy.horizon // 2))

    def execution_horizon(self) -> int:
        """s, the actions executed per chunk, kept to ``d <= s <= H - d``."""
        h, d = self.policy.horizon, self.delay_ticks()
        if self.sync:  # the robot waits for every chunk: no delay to cover
            return self.actions_per_chunk or h
        s = self.actions_per_chunk if self.actions_per_chunk is not None else h - d - self.margin_ticks
        return max(d, min(int(s), h - d), 1)

    def threshold(self) -> int:
        """Request when this many queued actions (or fewer) are left."""
        return self.policy.horizon - self.execution_horizon()

    @property
    def failed(self) -> bool:
        """More than ``error_budget`` inferences failed in a row: stop the robot (it holds)."""
        return self.consecutive_errors > self.error_budget

    def maybe_request(self, tick: int, observation: Observation) -> bool:
        """Submit an inference if the queue runs low and none is in flight. Returns True when
        a request was submitted."""
        if not self.threaded:
            self._deliver_ready()
        if (self.max_obs_age_s is not None
                and self.clock.now() - observation.timestamp > self.max_obs_age_s):
            self.stale_observations += 1  # never infer from an old picture of the world
            return False
        with self._cond:
            # a request of an ended episode still in flight does not hold up the new episode's
            # first chunk: the worker takes this one right after it (else a stall tick follows
            # every reset that lands during an inference)
            busy = self._in_flight and self._in_flight_epoch == self.epoch
            # a staged version is inferred with at once rather than when this chunk runs low:
            # its chunk takes over after the committed prefix, like any chunk (not when the
            # robot waits for every chunk: there an early request would stop it mid-chunk)
            early = self._staged is not None and not self.sync
            if busy or (self.queue.remaining(tick) > self.threshold() and not early):
                return False
            if self.sync:
                self.queue.drop_from(tick)  # the robot stops and waits for the new chunk
            d = 0 if self.sync else self.delay_ticks()
            committed = self.queue.committed(tick, d)
            self._request = (observation, int(tick), committed, self.epoch, self.clock.now())
            self._in_flight, self._in_flight_epoch = True, self.epoch
            if self.threaded:
                self._cond.notify_all()
                return True
        self._serve(self._take())
        self._deliver_ready()  # a zero-latency chunk runs from this very tick
        return True

    def reset(self, epoch: int) -> None:
        """A new episode: chunks of older epochs (in flight or pending) are dropped."""
        with self._cond:
            self.epoch = int(epoch)
            self.chunks_dropped += len(self._ready)
            self._ready.clear()
            if not self.threaded:
                self._in_flight = False

    # -- swapping ----------------------------------------------------------------------------
    def stage(self, policy: ChunkPolicy) -> None:
        """Swap ``policy`` in before the next inference, requested at the next tick; returns at
        once."""
        if (policy.horizon, policy.action_dim) != (self.policy.horizon, self.policy.action_dim):
            raise ValueError(f"policy v{policy.version} has chunks [{policy.horizon}, "
                             f"{policy.action_dim}], the running one [{self.policy.horizon}, "
                             f"{self.policy.action_dim}]; the queue cannot mix them")
        with self._cond:
            self._staged = policy

    def rollback(self) -> bool:
        """Go back to the previous policy (at the next inference)."""
        if self.previous is None:
            return False
        self.stage(self.previous)
        return True

    def _swap_if_staged(self) -> None:
        with self._cond:
            staged, self._staged = self._staged, None
        if staged is not None and staged is not self.policy:
            self.previous, self.policy = self.policy, staged
            self.swaps += 1
            self.last_swap_time = self.clock.now()
            log.info("inference: swapped in policy v%d (previous v%d)", staged.version,
                     self.previous.version)

    # normalization of the running policy (versions of one model share it)
    def to_command(self, a_n: np.ndarray) -> np.ndarray:
        return self.policy.to_command(a_n)

    def from_command(self, cmd: np.ndarray) -> np.ndarray:
        return self.policy.from_command(cmd)

    # -- the inference side ------------------------------------------------------------------
    def _take(self):
        with self._cond:
            req, self._request = self._request, None
            return req

    def _run(self, rt_priority: int | None = None) -> None:
        with realtime(rt_priority) as (self.rt_refused, self.sched):
            while not self._stop.is_set():
                with self._cond:
                    self._cond.wait_for(lambda: self._request is not None or self._stop.is_set())
                    if self._stop.is_set():
                        return
                self._serve(self._take())

    def _serve(self, req) -> None:
        if req is None:
            return
        obs, tick, committed, epoch, t_request = req
        try:
            self._swap_if_staged()  # between two inferences: a chunk boundary
            chunk = self._infer(obs, tick, committed, epoch)
        except Exception as e:  # a failing inference must not kill the worker: the loop holds
            self.errors += 1
            self.consecutive_errors += 1
            log.exception("inference: request at tick %d failed: %s", tick, e)
            chunk = None
        if chunk is None:
            with self._cond:
                self._done(epoch)
            return
        if self.threaded:
            self._finish(chunk, self.clock.now() - t_request)
        else:
            latency = (self.simulated_latency_s if self.simulated_latency_s is not None
                       else chunk.latency_s)
            with self._cond:
                self._ready.append((t_request + latency, chunk))

    def _infer(self, obs, tick, committed, epoch) -> Chunk | None:
        p = self.policy
        h, a = p.horizon, p.action_dim
        n = min(len(committed), h) if self.strategy == "prefix" else 0
        prefix = np.zeros((h, a), np.float32)
        if n:
            prefix[:n] = committed[:n]
        out = p.infer(obs, prefix, n)
        actions = np.array(out.actions, np.float32, copy=True)
        verdict = VerifierVerdict()
        if hasattr(self.gate, "choose"):  # the verifier's scheduler: K candidates, one chunk
            def draw(k: int) -> np.ndarray:
                cand = p.candidates(out, k)
                cand[:, :n] = prefix[:n]  # committed rows are not the verifier's to change
                return cand
            # the selection weighs the rows that will run: past the prefix, up to the horizon
            rows = (n, min(h, n + self.execution_horizon()))
            chosen, verdict = self.gate.choose(draw, h, a, features=out.features,
                                               state=obs.state, mean=out.mean,
                                               log_std=out.log_std, rows=rows,
                                               scorer=getattr(p, "scorer", None))
            if getattr(verdict, "override", False):
                log.warning("inference: no candidate from v%d at tick %d passed the verifier "
                            "and the robot had held long enough; the veto is lifted for this "
                            "chunk (the envelope still checks it)", p.version, tick)
            if chosen is None:
                self.chunks_rejected += 1
                self._vetoed_epoch = epoch
                log.warning("inference: no candidate from v%d at tick %d passed the verifier: %s",
                            p.version, tick, verdict.reason)
                return None
            actions = chosen
        elif self.gate is not None:
            # the policy's whole output is the candidate: a NaN in a prefix row still means a
            # broken policy (and would poison the recorded log-probabilities)
            verdict = self.gate.check(actions, h, a)
            if not verdict.accepted:
                self.chunks_rejected += 1
                log.warning("inference: chunk from v%d at tick %d rejected by the gate: %s",
                            p.version, tick, getattr(self.gate, "last_reason", ""))
                return None
        if n:
            actions[:n] = prefix[:n]  # the committed rows are what runs, not a resample
        self._chunk_ids += 1
        return Chunk(chunk_id=self._chunk_ids, epoch=epoch, policy_version=p.version,
                     weight_sha256=p.weight_sha256, observation=obs, start_tick=tick,
                     actions=actions, mean=np.asarray(out.mean, np.float32),
                     log_std=np.asarray(out.log_std, np.float32), prefix=prefix, prefix_len=n,
                     features=out.features,
                     latency_s=float(getattr(out, "latency_s", 0.0)) + verdict.seconds,
                     verdict=verdict, row_correlation=getattr(p, "row_correlation", 0.0))

    def _done(self, epoch: int) -> None:
        """A request of ``epoch`` ended (holding ``_cond``); one of a newer epoch may be in flight."""
        if epoch == self._in_flight_epoch:
            self._in_flight = False

    def _finish(self, chunk: Chunk, latency_s: float) -> None:
        strategy = self.strategy
        if self.sync:  # the robot waited: the chunk runs from its first row on arrival
            chunk, strategy = dataclasses.replace(chunk, start_tick=self.queue.next_tick), "latest"
        with self._cond:
            self._done(chunk.epoch)
            self.consecutive_errors = 0
            if chunk.epoch != self.epoch or not self.queue.insert(chunk, strategy=strategy):
                self.chunks_dropped += 1
                return
            self.latency.add(latency_s)
            self._vetoed_epoch = -1
            self.chunks += 1
            self.versions_run.add(chunk.policy_version)

    def _deliver_ready(self) -> None:
        now = self.clock.now()
        with self._cond:
            due = [(t, c) for t, c in self._ready if t <= now + 1e-9]
            self._ready = [(t, c) for t, c in self._ready if t > now + 1e-9]
        for t_ready, chunk in due:
            self._finish(chunk, self.simulated_latency_s if self.simulated_latency_s is not None
                         else chunk.latency_s)

    @property
    def verifier_holding(self) -> bool:
        """The verifier vetoed this episode's latest inference and no chunk has come since: an
        empty queue now is the verifier's hold, not an underrun."""
        return self._vetoed_epoch == self.epoch

    def versions(self) -> list[int]:
        """Sorted versions that produced at least one queued chunk (safe from any thread)."""
        with self._cond:
            return sorted(self.versions_run)

    def stats(self) -> dict:
        return {"chunks": self.chunks, "chunks_rejected": self.chunks_rejected,
                "chunks_dropped": self.chunks_dropped, "errors": self.errors,
                "stale_observations": self.stale_observations, "strategy": self.strategy,
                "actions_per_chunk": self.execution_horizon(),
                "swaps": self.swaps, "delay_ticks": self.delay_ticks(),
                **self.latency.summary_ms("latency_")}
