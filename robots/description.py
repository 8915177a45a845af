"""Robot descriptions: what a robot is, in the units the envelope and the policy use.

A description is loaded from YAML (``robots/descriptions/<name>.yaml`` or any path) into frozen
dataclasses that validate themselves. Units: actions are in the robot's command space (for the
Meta-World Sawyer: end-effector displacement command in [-1, 1] per axis, scaled by the driver,
and a gripper effort in [-1, 1]); positions in metres; rates in Hz.
"""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import yaml

DESCRIPTIONS = pathlib.Path(__file__).parent / "descriptions"


@dataclasses.dataclass(frozen=True)
class CameraSpec:
    name: str
    height: int
    width: int
    channels: int = 3

    def __post_init__(self):
        if min(self.height, self.width, self.channels) <= 0:
            raise ValueError(f"camera {self.name!r}: height, width and channels must be > 0, "
                             f"got {self.height}x{self.width}x{self.channels}")


@dataclasses.dataclass(frozen=True)
class RobotDescription:
    """Joints, limits, action space, cameras and rates of one robot model.

    ``action_low``/``action_high``: bounds of every command component (position limits).
    ``max_delta``: largest change of a command component between two ticks (velocity limit).
    ``max_delta2``: largest change of that change (acceleration limit).
    ``workspace_low``/``workspace_high``: bounds of the end effector in metres; a command that
    would move the end effector outside them is clamped, using ``ee_scale`` (metres moved per
    unit of the first three command components per tick).
    ``gripper_index``: which command component is the gripper; its limits are the action bounds.
    ``command_mode``: ``delta`` (commands are displacements: holding position is a zero command,
    the gripper keeps its last command) or ``position`` (holding repeats the last command).
    """
    name: str
    joints: tuple[str, ...]
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    max_delta: tuple[float, ...]
    max_delta2: tuple[float, ...]
    state_names: tuple[str, ...]
    cameras: tuple[CameraSpec, ...]
    control_rate_hz: float
    workspace_low: tuple[float, float, float] | None = None
    workspace_high: tuple[float, float, float] | None = None
    ee_scale: float = 0.0
    gripper_index: int | None = None
    command_mode: str = "delta"

    def __post_init__(self):
        if self.command_mode not in ("delta", "position"):
            raise ValueError(f"robot {self.name!r}: command_mode must be 'delta' or 'position', "
                             f"got {self.command_mode!r}")
        n = len(self.joints)
        for key in ("action_low", "action_high", "max_delta", "max_delta2"):
            if len(getattr(self, key)) != n:
                raise ValueError(f"robot {self.name!r}: {key} has {len(getattr(self, key))} "
                                 f"entries, expected one per joint ({n})")
        if any(lo >= hi for lo, hi in zip(self.action_low, self.action_high)):
            raise ValueError(f"robot {self.name!r}: action_low must be < action_high")
        if any(v <= 0 for v in self.max_delta + self.max_delta2):
            raise ValueError(f"robot {self.name!r}: max_delta and max_delta2 must be > 0")
        if self.control_rate_hz <= 0:
            raise ValueError(f"robot {self.name!r}: control_rate_hz must be > 0, "
                             f"got {self.control_rate_hz}")
        if (self.workspace_low is None) != (self.workspace_high is None):
            raise ValueError(f"robot {self.name!r}: give both workspace_low and workspace_high")
        if self.gripper_index is not None and not 0 <= self.gripper_index < n:
            raise ValueError(f"robot {self.name!r}: gripper_index {self.gripper_index} "
                             f"out of range for {n} joints")

    @property
    def action_dim(self) -> int:
        return len(self.joints)

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def period_s(self) -> float:
        return 1.0 / self.control_rate_hz

    def hold_action(self, last: np.ndarray | None) -> np.ndarray:
        """The command that holds the robot where it is, given the last command sent."""
        if self.command_mode == "position":
            if last is None:
                raise ValueError(f"robot {self.name!r}: a position-mode robot needs its last "
                                 f"command to hold")
            return np.asarray(last, np.float32).copy()
        hold = np.zeros(self.action_dim, np.float32)
        if self.gripper_index is not None and last is not None:
            hold[self.gripper_index] = last[self.gripper_index]
        return hold

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return (np.asarray(self.action_low, np.float32), np.asarray(self.action_high, np.float32))

    @classmethod
    def from_dict(cls, d: dict) -> "RobotDescription":
        d = dict(d)
        d["cameras"] = tuple(CameraSpec(**c) for c in d.get("cameras", ()))
        for key, val in list(d.items()):
            if isinstance(val, list):
                d[key] = tuple(val)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"robot description: unknown keys {sorted(unknown)}; "
                             f"known keys are {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_description(name_or_path: str) -> RobotDescription:
    """Load a description by built-in name (e.g. ``sawyer_metaworld``) or YAML path."""
    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = DESCRIPTIONS / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in DESCRIPTIONS.glob("*.yaml"))
        raise FileNotFoundError(f"robot description {name_or_path!r} not found; built-in: {known}")
    return RobotDescription.from_dict(yaml.safe_load(path.read_text()))
