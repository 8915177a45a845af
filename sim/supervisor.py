"""A simulated human supervisor: watches some of a robot's episodes and takes over when the
robot stops making progress, the way a fleet operator with a teleoperation rig does
(HG-DAgger-style interventions).

It watches a fraction ``rate`` of episodes (drawn per episode). In a watched episode it keeps
the best reward so far; once ``patience`` steps pass without the reward rising by more than
``min_gain`` over that best (and at least ``earliest`` steps in), it takes the robot and drives
it with the task's scripted expert until the episode ends. The robot reports those steps with
``StepResult.operator`` set, so the runtime records them as human interventions and the episode
does not count as the policy's own: no watched episode does, taken over or not, so that the
policy's success rate stays an unbiased sample (``tether robot`` status: ``supervised_episodes``).
"""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SupervisorConfig:
    rate: float = 0.0        # fraction of episodes watched (0: never intervenes)
    patience: int = 25       # steps without progress before taking over
    min_gain: float = 0.05   # reward rise (Meta-World rewards are 0..10) that counts as progress
    earliest: int = 20       # never before this many steps of an episode

    def __post_init__(self):
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"supervision rate must be in [0, 1], got {self.rate}")
        if self.patience < 1 or self.earliest < 0 or self.min_gain < 0:
            raise ValueError(f"supervisor: patience >= 1, earliest >= 0 and min_gain >= 0 "
                             f"required, got {self}")


class Supervisor:
    """Per-episode takeover decisions (one robot, its control thread only)."""

    def __init__(self, config: SupervisorConfig, seed: int = 0):
        self.config = config
        self._rng = np.random.default_rng(seed)
        self.watching = self.in_control = False
        self.takeovers = 0
        self._best = -np.inf
        self._since = 0
        self._steps = 0

    def start_episode(self) -> None:
        self.watching = bool(self._rng.random() < self.config.rate)
        self.in_control = False
        self._best, self._since, self._steps = -np.inf, 0, 0

    def observe(self, reward: float) -> None:
        """After each step: track progress; take over when it stalls."""
        c = self.config
        self._steps += 1
        if reward > self._best + c.min_gain:
            self._best, self._since = float(reward), 0
        else:
            self._since += 1
        if (self.watching and not self.in_control and self._steps >= c.earliest
                and self._since >= c.patience):
            self.in_control = True
            self.takeovers += 1
