"""The control loop: a small plain class that runs one robot at a fixed rate.

Per tick: observe, let the inference worker request a chunk if the queue runs low, pop this
tick's action (an underrun sends the hold action, counted as a stall tick), pass it through the
envelope (only envelope output ever reaches the robot), send it, and hand a ``TickRecord`` to
``on_tick``. Deadlines are absolute (``t0 + k * period``), so lateness never accumulates as drift.
A robot-side exception holds and is counted; more than ``error_budget`` consecutive errors stop
the loop cleanly.

``episode_gate`` (the learner's staleness gate): called before an episode starts; a string
(why) means "not yet". The loop then keeps its tick schedule without resetting the robot (the
ended episode accepts no commands; the robot rests where it stopped), counts
``gate_wait_ticks``, logs once per wait, and starts the episode on the first tick the gate opens.

``observation_check`` (the node's: runtime/observation_check.py): called on every observation; a
string (why) means it is unusable (NaN state, wrong image size, stale, a camera missing). That
tick holds (the same tick: a bad observation never drives a command), the queued actions are
dropped (they were planned from data now in doubt) and no inference is asked for; the loop keeps
its schedule, counts ``observation_holds`` by reason, and commands again on the first good one.
"""
from __future__ import annotations

import collections
import logging
import threading
from typing import Callable

import numpy as np

from robots.base import Observation, Robot
from runtime.chunks import ActionQueue
from runtime.clock import Clock
from runtime.status import LatencyWindow
from runtime.types import TickRecord
from verifier.envelope import Envelope

log = logging.getLogger(__name__)


def _identity(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32)


class ControlLoop:
    def __init__(self, robot: Robot, queue: ActionQueue, envelope: Envelope, clock: Clock,
                 rate_hz: float, on_tick: Callable[[TickRecord], None] | None = None, *,
                 worker=None, to_command: Callable = _identity, from_command: Callable = _identity,
                 on_episode_start: Callable[[int], None] | None = None,
                 on_episode_end: Callable[[int, bool], None] | None = None,
                 episode_gate: Callable[[], str | None] | None = None,
                 observation_check: Callable[[Observation], str | None] | None = None,
                 on_hold: Callable[[str | None], None] | None = None,
                 error_budget: int = 10, max_catchup_ticks: int = 2):
        if rate_hz <= 0:
            raise ValueError(f"rate_hz must be > 0, got {rate_hz}")
        if error_budget < 0:
            raise ValueError(f"error_budget must be >= 0, got {error_budget}")
        self.robot, self.queue, self.envelope, self.clock = robot, queue, envelope, clock
        self.period = 1.0 / float(rate_hz)
        self.on_tick = on_tick
        self.worker = worker
        self.to_command, self.from_command = to_command, from_command
        self.on_episode_start, self.on_episode_end = on_episode_start, on_episode_end
        self.episode_gate = episode_gate
        self.observation_check = observation_check
        self.on_hold = on_hold  # told each time a hold for bad observations begins (why) and ends
        self.hold_reason: str | None = None  # why the robot holds now for its observations
        self.observation_holds: dict[str, int] = {}  # held ticks per kind of reason
        self.error_budget = int(error_budget)
        self.max_catchup_ticks = int(max_catchup_ticks)
        self.description = robot.describe()
        self.jitter = LatencyWindow(4096)
        self.ticks = 0
        self.deadline_misses = 0
        # when (clock time) the latest misses happened, and how many ticks each: to tell what
        # the robot was doing then (a weight fetch, a swap) from the status file
        self.recent_misses: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)
        self.stall_ticks = 0
        self.operator_ticks = 0  # ticks a human operator drove (StepResult.operator)
        self.verifier_hold_ticks = 0  # empty queue because the verifier vetoed (not a stall)
        self.gate_wait_ticks = 0  # ticks spent between episodes waiting for the episode gate
        self._gate_reason: str | None = None
        self.robot_errors = 0
        self.episodes = 0
        self.epoch = 0
        self.stopped_by_errors = False
        self._consecutive_errors = 0
        self._tick = 0
        self._obs: Observation | None = None
        self._needs_reset = True
        self._last_cmd: np.ndarray | None = None
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    # -- episodes ----------------------------------------------------------------------------
    def _start_episode(self) -> None:
        self._obs = self.robot.reset()
        self._needs_reset = False
        self.epoch += 1
        self.queue.reset(self.epoch)
        if self.worker is not None:
            self.worker.reset(self.epoch)
        self.envelope.reset()
        self._last_cmd = None
        if self.on_episode_start is not None:
            self.on_episode_start(self.epoch)
        usable = self.observation_check is None or self.observation_check(self._obs) is None
        if self.worker is not None and usable:  # a bad one: the first step() holds and says why
            # ask for the first chunk now, so it is ready by the next tick instead of holding
            self.worker.maybe_request(self._tick, self._obs)

    def _gate_closed(self) -> bool:
        """Ask the episode gate; log once when a wait begins and when it ends."""
        reason = self.episode_gate() if self.episode_gate is not None else None
        if reason and self._gate_reason is None:
            log.info("control: holding before the next episode: %s", reason)
        elif not reason and self._gate_reason is not None:
            log.info("control: episode gate open after %d waiting ticks in all", self.gate_wait_ticks)
        self._gate_reason = reason or None
        return self._gate_reason is not None

    def _next_episode(self) -> None:
        if self._gate_closed():
            self._needs_reset = True  # step() waits and starts the episode once the gate opens
            return
        try:
            self._start_episode()
        except Exception as e:
            self._needs_reset = True
            self._robot_error("reset", e)

    # -- the loop ----------------------------------------------------------------------------
    def run(self, seconds: float | None = None, max_ticks: int | None = None) -> None:
        """Run until ``seconds`` of clock time, ``max_ticks`` ticks, ``stop()`` or the error
        budget is spent."""
        t0 = self.clock.now()
        end = None if seconds is None else t0 + seconds
        deadline = t0
        start_ticks = self.ticks
        if self._needs_reset and not self._stop.is_set():
            self._next_episode()
            deadline += self.period  # the first chunk is inferred during this period
        while not self._stop.is_set():
            if max_ticks is not None and self.ticks - start_ticks >= max_ticks:
                break
            if end is not None and deadline >= end - 1e-9:
                break
            self.clock.sleep_until(deadline)
            late = self.clock.now() - deadline
            self.jitter.add(abs(late))
            if late > self.period / 2:
                self.deadline_misses += 1
                self.recent_misses.append((round(deadline + late, 4), 1))
            self.step()
            deadline += self.period
            behind = self.clock.now() - deadline
            if behind > self.max_catchup_ticks * self.period:
                # skip the missed deadlines rather than bursting ticks to catch up; phase kept
                skipped = int(behind // self.period)
                self.deadline_misses += skipped
                self.recent_misses.append((round(deadline + behind, 4), skipped))
                deadline += skipped * self.period
            if self.worker is not None and getattr(self.worker, "failed", False):
                self.stopped_by_errors = True
                self._hold()
                log.error("control: inference failed %d times in a row (budget %d); stopped, "
                          "holding", self.worker.consecutive_errors, self.worker.error_budget)
                break
            if self._consecutive_errors > self.error_budget:
                self.stopped_by_errors = True
                log.error("control: %d consecutive robot errors (budget %d); stopping",
                          self._consecutive_errors, self.error_budget)
                break

    def step(self) -> TickRecord | None:
        """One control tick."""
        if self._needs_reset:
            if self._gate_closed():
                self._tick += 1
                self.ticks += 1
                self.gate_wait_ticks += 1
                return None
            try:
                self._start_episode()
            except Exception as e:
                self._robot_error("reset", e)
                return None
        tick = self._tick
        self._tick += 1
        self.ticks += 1
        try:
            obs = self.robot.observe()
            self._obs = obs
        except Exception as e:
            self._robot_error("observe", e)
            obs = None
        refused = False
        if obs is not None and self.observation_check is not None:
            obs = self._checked(tick, obs)
            refused = obs is None
        if obs is not None and self.worker is not None:
            self.worker.maybe_request(tick, obs)
        slot = self.queue.pop(tick)
        held = ""
        if slot is None or obs is None:
            held = self._held_why(slot, refused)
            chunk, offset, action = None, 0, None
            command = self.description.hold_action(self._last_cmd)
        else:
            chunk, offset, action = slot
            command = self.to_command(action)
        state = None if obs is None else obs.state
        safe, clamped, _ = self.envelope.apply(command, self._last_cmd, state)
        try:
            result = self.robot.send_action(safe)
        except Exception as e:
            self._robot_error("send_action", e)
            return None
        if obs is not None:
            self._consecutive_errors = 0
        operator = bool(getattr(result, "operator", False))
        if operator:  # a human had the robot: what it did is the operator's command
            safe = np.asarray(result.sent, np.float32)
            self.operator_ticks += 1
        self._last_cmd = safe
        record = TickRecord(tick=tick, chunk=chunk, offset=int(offset),
                            action=self.from_command(safe), clamped=clamped and not operator,
                            reward=float(result.reward), terminated=bool(result.terminated),
                            truncated=bool(result.truncated), success=bool(result.success),
                            held=held, operator=operator, observation=obs if operator else None,
                            policy_action=None if operator else action)
        if self.on_tick is not None:
            self.on_tick(record)
        if record.terminated or record.truncated:
            self.episodes += 1
            if self.on_episode_end is not None:
                self.on_episode_end(self.epoch, record.success)
            self._next_episode()
        return record

    def _held_why(self, slot, refused: bool) -> str:
        """Why this tick holds (TickRecord.held), counted: an observation hold and a verifier
        hold are decisions; only a chunk that was not ready in time is a stall."""
        if slot is not None or refused:
            return "observation"
        if self.worker is not None and getattr(self.worker, "verifier_holding", False):
            self.verifier_hold_ticks += 1
            return "verifier"
        self.stall_ticks += 1
        return "underrun"

    def _checked(self, tick: int, obs: Observation) -> Observation | None:
        """``obs``, or None (hold this tick) when the observation check refuses it."""
        try:
            reason = self.observation_check(obs)
        except Exception as e:  # a broken check must not move the robot on unchecked data
            reason = f"observation check failed: {type(e).__name__}: {e}"
        if reason is None:
            if self.hold_reason is not None:
                log.info("control: observations usable again after holding (%s)", self.hold_reason)
                self.hold_reason = None
                if self.on_hold is not None:
                    self.on_hold(None)
            return obs
        kind = reason.split(":")[0]
        self.observation_holds[kind] = self.observation_holds.get(kind, 0) + 1
        # planned from data now in doubt (or landing from an inference started before): drop,
        # so that the robot resumes on a chunk inferred from good data
        self.queue.drop_from(tick)
        if self.hold_reason is None or self.hold_reason.split(":")[0] != kind:
            log.warning("control: holding at tick %d: %s", tick, reason)
            if self.on_hold is not None:
                self.on_hold(reason)
        self.hold_reason = reason
        return None

    def _robot_error(self, where: str, e: Exception) -> None:
        self.robot_errors += 1
        self._consecutive_errors += 1
        log.error("control: robot %s failed (%d in a row): %s: %s", where,
                  self._consecutive_errors, type(e).__name__, e)
        if where == "send_action":
            self._hold()  # the failed command is unknown; hold

    def _hold(self) -> None:
        try:
            hold = self.description.hold_action(self._last_cmd)
            self.robot.send_action(self.envelope.apply(hold, self._last_cmd, None)[0])
        except Exception as e:
            log.error("control: hold command failed: %s: %s", type(e).__name__, e)

    def stats(self) -> dict:
        return {"ticks": self.ticks, "deadline_misses": self.deadline_misses,
                "recent_misses": [list(m) for m in self.recent_misses],
                "stall_ticks": self.stall_ticks, "verifier_hold_ticks": self.verifier_hold_ticks,
                "operator_ticks": self.operator_ticks,
                "gate_wait_ticks": self.gate_wait_ticks,
                "hold_reason": self.hold_reason,
                "observation_holds": dict(self.observation_holds),
                "robot_errors": self.robot_errors,
                "jitter_p50_ms": round(1e3 * self.jitter.quantile(0.5), 3),
                "jitter_p99_ms": round(1e3 * self.jitter.quantile(0.99), 3),
                "jitter_max_ms": round(1e3 * self.jitter.max, 3)}
