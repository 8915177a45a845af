"""A ROS 2 robot as a ``Robot``: the ROS node feeds it observations and sends what it commands.

The node (``runtime/ros/node_core.py``) owns the ROS I/O. Each tick it hands this robot the
newest synchronized observation (``set_observation``) and the control loop calls ``observe`` and
``send_action`` as for any robot; ``send_action`` passes the command to the node's publisher.
A real robot has no episodes of its own: an episode is a stretch of commanding that ends when
the node holds (stale data, deactivation) or the instruction changes. ``reset`` does not move the
robot; while holding it raises ``Holding`` so that no new episode starts on stale data.
Units: joint positions (radians or metres) in the description's joint order.

An operator (``set_operator``: the node's teleoperation input) takes precedence over the policy:
while it gives a command, ``send_action`` sends that (within the joint bounds) and reports it
with ``StepResult.operator``, so the runtime records a human intervention.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from robots.base import Observation, StepResult
from robots.description import RobotDescription


class Holding(RuntimeError):
    """The robot holds position (stale or out-of-sync data, or the node is inactive)."""


@dataclasses.dataclass(frozen=True)
class _HoldAtJoints(RobotDescription):
    """A position-mode description whose hold, before any command was sent, is the measured
    joint positions (the control loop holds with ``hold_action(None)`` while the first chunk of
    an episode is still being inferred)."""

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        if last is None:
            return np.asarray(self._measured(), np.float32).copy()
        return super().hold_action(last)


class RosRobot:
    def __init__(self, description: RobotDescription, publish: Callable[[np.ndarray], None]):
        if description.command_mode != "position":
            raise ValueError(f"robot {description.name!r}: the ROS node commands joint "
                             f"positions; use a description with command_mode: position")
        if description.state_names != description.joints:
            raise ValueError(f"robot {description.name!r}: state_names must be the joint "
                             f"positions {list(description.joints)} (read from JointState)")
        self.description = _HoldAtJoints(**{f.name: getattr(description, f.name)
                                            for f in dataclasses.fields(description)})
        object.__setattr__(self.description, "_measured", self._measured)
        self.publish = publish
        self.hold_reason: str | None = "not started"
        self.holds_sent = 0
        self.live = False          # an episode is running (reset succeeded, no hold since)
        self._obs: Observation | None = None
        self._instruction = ""
        self._last: np.ndarray | None = None
        self._operator: np.ndarray | None = None
        self._fresh_episode = True
        self._lo, self._hi = description.bounds()
        self._step = np.asarray(description.max_delta, np.float32)

    def describe(self) -> RobotDescription:
        return self.description

    def _measured(self) -> np.ndarray:
        if self._obs is None:
            raise Holding("no joint positions measured yet: cannot hold in place")
        return self._obs.state

    # -- the node's side ---------------------------------------------------------------------
    def set_observation(self, obs: Observation) -> None:
        self._obs = obs
        self.hold_reason = None

    def set_operator(self, command: np.ndarray | None) -> None:
        """The operator's joint targets for the next ``send_action`` (None: the policy drives)."""
        self._operator = None if command is None else np.asarray(command, np.float32)

    @property
    def operator_driving(self) -> bool:
        return self._operator is not None

    def request_hold(self, reason: str) -> None:
        """The next ``send_action`` holds instead of moving and ends the episode."""
        self.hold_reason = reason

    # -- the Robot protocol ------------------------------------------------------------------
    def reset(self) -> Observation:
        if self.hold_reason is not None or self._obs is None:
            raise Holding(f"holding: {self.hold_reason}")
        self._instruction = self._obs.instruction
        self._fresh_episode = True
        self.live = True
        return self._obs

    def observe(self) -> Observation:
        if self._obs is None:
            raise Holding("no observation yet")
        return self._obs

    def send_action(self, action: np.ndarray) -> StepResult:
        if self.hold_reason is not None:
            hold = self._last if self._last is not None else self._obs.state
            self.publish(np.asarray(hold, np.float32))
            self.holds_sent += 1
            self.live = False
            return StepResult(0.0, False, True, False, np.asarray(hold, np.float32))
        changed = self._obs.instruction != self._instruction
        if self._operator is not None:  # the operator drives: its command, inside the bounds
            cmd = np.clip(self._operator, self._lo, self._hi).astype(np.float32)
            self.publish(cmd)
            self._last = cmd
            self._fresh_episode = False
            return StepResult(0.0, False, changed, False, cmd, operator=True)
        cmd = np.asarray(action, np.float32)
        if self._fresh_episode:
            # the envelope limits speed against the last command; a new episode has none, so
            # the first command may move one velocity step from where the joints really are
            here = self._obs.state
            cmd = np.clip(cmd, np.maximum(here - self._step, self._lo),
                          np.minimum(here + self._step, self._hi)).astype(np.float32)
            self._fresh_episode = False
        self.publish(cmd)
        self._last = cmd
        return StepResult(0.0, False, changed, False, cmd)

    def close(self) -> None:
        self._obs = None
