"""A Meta-World v3 task as a ``robots.base.Robot``: the Sawyer arm, one camera, one task.

Every ``reset`` draws a new task variation (object and goal positions) from the env's own
random stream, seeded once at construction, so a robot built with the same seed replays the
same sequence of variations.

``supervision`` (a ``sim.supervisor.SupervisorConfig`` or a rate): a simulated operator watches
that fraction of episodes and drives the robot with the scripted expert once it stops making
progress; those steps come back with ``StepResult.operator`` set.
"""
from __future__ import annotations

import warnings

import numpy as np

from robots.base import Observation, StepResult
from robots.description import RobotDescription, load_description
from runtime.clock import Clock, WallClock
from sim import camera as cameras
from sim.supervisor import Supervisor, SupervisorConfig
from sim.tasks import expert_policy, get_task

METAWORLD_MAX_STEPS = 500  # Meta-World refuses to step an episode past this


class MetaWorldRobot:
    """``robots.base.Robot`` over ``gym.make("Meta-World/MT1", env_name=task, seed=seed)``.

    State: ``obs[0:4]`` (end-effector xyz in metres, gripper opening). Actions: the
    description's command space (end-effector displacement and gripper effort, in [-1, 1]).
    An episode ends ``terminated`` on success (when ``end_on_success``) and ``truncated`` after
    ``max_steps`` commands; stepping an ended episode is an error: call ``reset()``.
    """

    def __init__(self, task: str = "reach-v3", seed: int = 0, camera: str = "fast",
                 max_steps: int = 150, description: str | RobotDescription = "sawyer_metaworld",
                 clock: Clock | None = None, end_on_success: bool = True,
                 supervision: SupervisorConfig | float = 0.0):
        self._spec = get_task(task)
        if not isinstance(supervision, SupervisorConfig):
            supervision = SupervisorConfig(rate=float(supervision))
        self.supervisor = (Supervisor(supervision, seed=seed + 7_777)
                           if supervision.rate > 0 else None)
        if not 1 <= max_steps <= METAWORLD_MAX_STEPS:
            raise ValueError(f"max_steps must be in [1, {METAWORLD_MAX_STEPS}] (Meta-World's "
                             f"episode limit), got {max_steps}")
        self._desc = (description if isinstance(description, RobotDescription)
                      else load_description(description))
        if not self._desc.cameras:
            raise ValueError(f"robot description {self._desc.name!r} has no camera")
        cam = self._desc.cameras[0]
        self._camera_name = cam.name
        self._camera = cameras.make_camera(camera, cam.height, cam.width)
        self._clock = clock if clock is not None else WallClock()
        self._max_steps = int(max_steps)
        self._end_on_success = bool(end_on_success)
        self._low, self._high = self._desc.bounds()
        self._env = self._make_env(task, seed, getattr(self._camera, "needs_render_mode", False),
                                   cam.height, cam.width)
        self._expert = expert_policy(task)
        self._obs: np.ndarray | None = None
        self._steps = 0
        self._ended = False
        self._closed = False

    def _make_env(self, task, seed, render, height, width):
        import gymnasium as gym
        import metaworld  # noqa: F401  (registers the Meta-World/* envs)

        kwargs = dict(render_mode="rgb_array", width=width, height=height) if render else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return gym.make("Meta-World/MT1", env_name=task, seed=int(seed),
                            max_episode_steps=METAWORLD_MAX_STEPS, disable_env_checker=True,
                            **kwargs)

    # -- Robot protocol -------------------------------------------------------------------

    def describe(self) -> RobotDescription:
        return self._desc

    def reset(self) -> Observation:
        self._check_open()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs, _ = self._env.reset()
        self._obs = np.asarray(obs, np.float64)
        self._steps = 0
        self._ended = False
        if self.supervisor is not None:
            self.supervisor.start_episode()
        return self.observe()

    def observe(self) -> Observation:
        obs = self._current()
        return Observation(images={self._camera_name: self._camera.render(self._env, obs)},
                           state=obs[0:4].astype(np.float32), instruction=self._spec.instruction,
                           timestamp=float(self._clock.now()))

    def send_action(self, action: np.ndarray) -> StepResult:
        obs = self._current()
        action = np.asarray(action, dtype=np.float32)
        if action.shape != self._low.shape:
            raise ValueError(f"action shape {action.shape} does not match the action space "
                             f"{self._low.shape} of {self._desc.name!r}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action {action} has non-finite components; send finite commands")
        if self._ended:
            raise RuntimeError(f"the episode ended at step {self._steps}; call reset() before "
                               f"sending more actions")
        operator = self.supervisor is not None and self.supervisor.in_control
        sent = self.expert_action() if operator else np.clip(action, self._low, self._high)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obs, reward, _, _, info = self._env.step(sent)
        self._obs = np.asarray(obs, np.float64)
        self._steps += 1
        success = bool(info.get("success", 0.0) >= 1.0)
        terminated = success and self._end_on_success
        truncated = self._steps >= self._max_steps and not terminated
        self._ended = terminated or truncated
        if self.supervisor is not None:
            self.supervisor.observe(float(reward))
        return StepResult(reward=float(reward), terminated=terminated, truncated=truncated,
                          success=success, sent=sent, operator=operator)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._env.close()

    # -- simulation extras ----------------------------------------------------------------

    def expert_action(self) -> np.ndarray:
        """The scripted expert's command for the current state, clipped to the bounds."""
        obs = self._current()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            act = self._expert.get_action(obs)
        return np.clip(np.asarray(act, np.float32), self._low, self._high)

    @property
    def supervised(self) -> bool:
        """Whether the simulated operator watches the current episode (it may take over)."""
        return self.supervisor is not None and self.supervisor.watching

    @property
    def task(self) -> str:
        return self._spec.name

    @property
    def episode_steps(self) -> int:
        return self._steps

    @property
    def raw_observation(self) -> np.ndarray:
        """The env's full 39-d observation (hand, gripper, object, goal), a copy."""
        return self._current().copy()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetaWorldRobot({self._spec.name!r}) is closed; make a new one")

    def _current(self) -> np.ndarray:
        self._check_open()
        if self._obs is None:
            raise RuntimeError("MetaWorldRobot: call reset() before observing or acting")
        return self._obs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
