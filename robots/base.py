"""The Robot seam: what every driver (simulated, ROS 2, a test double) implements."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from robots.description import RobotDescription


@dataclasses.dataclass(frozen=True)
class Observation:
    """One synchronized sensor snapshot.

    ``images``: camera name -> HxWxC uint8. ``state``: proprioceptive state in robot units
    (float32, ordered as ``RobotDescription.state_names``). ``timestamp``: seconds on the
    robot's clock when sensed.
    """
    images: Mapping[str, np.ndarray]
    state: np.ndarray
    instruction: str
    timestamp: float


@dataclasses.dataclass(frozen=True)
class StepResult:
    """What followed one command: reward, end-of-episode flags (terminated vs truncated as in
    Gymnasium), task success and the command actually sent (after the driver's own clamping).

    ``operator``: a human operator had the robot on this step (a teleoperation takeover), so
    ``sent`` is the operator's command, not the one given; the runtime records such steps as
    human interventions (``ChunkRecord.human_intervention``) for the learner's imitation term.
    """
    reward: float
    terminated: bool
    truncated: bool
    success: bool
    sent: np.ndarray
    operator: bool = False


@runtime_checkable
class Robot(Protocol):
    """A robot: describe it, reset it, observe it, command it.

    ``send_action`` takes one command in the robot's action space (shape ``[action_dim]``) and
    returns what followed, including the command actually sent. ``reset`` starts a new episode
    and returns its first observation.
    """

    def describe(self) -> RobotDescription: ...

    def reset(self) -> Observation: ...

    def observe(self) -> Observation: ...

    def send_action(self, action: np.ndarray) -> StepResult: ...

    def close(self) -> None: ...
