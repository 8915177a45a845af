"""Scripted-expert demonstrations from the simulator, as per-tick arrays for imitation.

With ``action_noise`` > 0 the robot executes the expert's command plus Gaussian noise while the
recorded label stays the clean expert command (DART-style): the demos then visit the states a
slightly wrong policy reaches, and teach how to recover from them.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

_ARRAYS = ("images", "state", "actions", "task_index", "episode", "step",
           "episode_task", "episode_success")


@dataclasses.dataclass(frozen=True)
class DemoSet:
    """Ticks of expert episodes. Per tick: ``images`` uint8 [N,H,W,3], ``state`` float32 [N,S],
    ``actions`` float32 [N,A] in [-1, 1], ``task_index`` [N] into ``tasks``, ``episode`` id
    [N] (ticks of one episode are contiguous and in order) and ``step`` [N] inside it.
    Per episode: ``episode_task`` [E] and ``episode_success`` [E] (did the expert succeed)."""
    images: np.ndarray
    state: np.ndarray
    actions: np.ndarray
    task_index: np.ndarray
    episode: np.ndarray
    step: np.ndarray
    episode_task: np.ndarray
    episode_success: np.ndarray
    tasks: tuple[str, ...]
    instructions: tuple[str, ...]

    def __post_init__(self):
        n = len(self.actions)
        for key in ("images", "state", "task_index", "episode", "step"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"DemoSet: {key} has {len(getattr(self, key))} rows, "
                                 f"actions has {n}")
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"DemoSet: images must be uint8 [N,H,W,C], got "
                             f"{self.images.dtype} {self.images.shape}")
        if len(self.tasks) != len(self.instructions):
            raise ValueError("DemoSet: one instruction per task")
        if n and np.any(np.diff(self.episode) < 0):
            raise ValueError("DemoSet: ticks must be grouped by episode, in order")

    def __len__(self) -> int:
        return len(self.actions)

    def success_rate(self) -> dict[str, float]:
        """The expert's success rate per task."""
        return {name: float(self.episode_success[self.episode_task == i].mean())
                for i, name in enumerate(self.tasks) if np.any(self.episode_task == i)}

    def instruction_of(self) -> list[str]:
        """The instruction of every tick."""
        return [self.instructions[i] for i in self.task_index]

    def chunk_targets(self, horizon: int) -> tuple[np.ndarray, np.ndarray]:
        """For tick t: ``actions[t:t+horizon]`` inside t's episode, past the episode's end
        padded by repeating its last action; and the mask of rows that are real actions.
        Returns (targets float32 [N,H,A], valid bool [N,H])."""
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        n = len(self)
        # index of the last tick of each tick's episode (episodes are contiguous)
        ends = np.flatnonzero(np.r_[self.episode[1:] != self.episode[:-1], True])
        last = np.repeat(ends, np.diff(np.r_[-1, ends]))
        idx = np.arange(n)[:, None] + np.arange(horizon)[None, :]
        valid = idx <= last[:, None]
        idx = np.minimum(idx, last[:, None])
        return self.actions[idx].astype(np.float32), valid

    def save(self, path: str | pathlib.Path) -> None:
        arrays = {k: getattr(self, k) for k in _ARRAYS}
        np.savez(path, tasks=np.array(self.tasks, dtype=str),
                 instructions=np.array(self.instructions, dtype=str), **arrays)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "DemoSet":
        with np.load(path, allow_pickle=False) as f:
            return cls(tasks=tuple(str(s) for s in f["tasks"]),
                       instructions=tuple(str(s) for s in f["instructions"]),
                       **{k: f[k] for k in _ARRAYS})


def collect_demos(tasks, episodes_per_task: int, seed: int, camera: str = "fast",
                  max_steps: int = 150, action_noise: float = 0.0) -> DemoSet:
    """Run each task's scripted expert in a ``MetaWorldRobot`` for ``episodes_per_task``
    episodes (each a new task variation) and record every tick."""
    from sim.metaworld_robot import MetaWorldRobot

    tasks = tuple(tasks)
    if not tasks or episodes_per_task < 1:
        raise ValueError(f"need at least one task and one episode, got {tasks} x "
                         f"{episodes_per_task}")
    if action_noise < 0:
        raise ValueError(f"action_noise must be >= 0, got {action_noise}")
    rng = np.random.default_rng(seed)
    cols = {k: [] for k in ("images", "state", "actions", "task_index", "episode", "step")}
    episode_task, episode_success, instructions = [], [], []
    for ti, task in enumerate(tasks):
        robot = MetaWorldRobot(task, seed=seed * 7919 + ti, camera=camera, max_steps=max_steps)
        try:
            for _ in range(episodes_per_task):
                ep = len(episode_task)
                obs, t, success = robot.reset(), 0, False
                while True:
                    label = robot.expert_action()
                    cols["images"].append(obs.images["front"])
                    cols["state"].append(obs.state)
                    cols["actions"].append(label)
                    cols["task_index"].append(ti)
                    cols["episode"].append(ep)
                    cols["step"].append(t)
                    act = label + action_noise * rng.standard_normal(label.shape) if action_noise else label
                    res = robot.send_action(np.clip(act, -1.0, 1.0).astype(np.float32))
                    t, success = t + 1, success or res.success
                    if res.terminated or res.truncated:
                        break
                    obs = robot.observe()
                episode_task.append(ti)
                episode_success.append(success)
            instructions.append(obs.instruction)
        finally:
            robot.close()
    return DemoSet(images=np.stack(cols["images"]), state=np.stack(cols["state"]),
                   actions=np.stack(cols["actions"]).astype(np.float32),
                   task_index=np.asarray(cols["task_index"], np.int64),
                   episode=np.asarray(cols["episode"], np.int64),
                   step=np.asarray(cols["step"], np.int64),
                   episode_task=np.asarray(episode_task, np.int64),
                   episode_success=np.asarray(episode_success, bool),
                   tasks=tasks, instructions=tuple(instructions))
