"""Parameters of the ROS 2 node: one table (name, default, description) that the rclpy transport
declares as ROS parameters and the cyclonedds transport reads from the same YAML file.

The YAML file is a standard ROS 2 parameter file (``launch/config/robot.yaml``)::

    tether_robot:
      ros__parameters:
        artifact: /opt/tether/policy
        robot_description: arm7_position
"""
from __future__ import annotations

import dataclasses
import difflib
import pathlib

import yaml

from runtime.fetch_process import fetch_setting_error

CAMERA = "{camera}"


@dataclasses.dataclass(frozen=True)
class RosParams:
    """Everything a robot team sets; frozen, validated on construction."""
    artifact: str = ""
    backend: str = "ort"
    robot_description: str = "arm7_position"
    robot_id: str = "robot0"
    task: str = "ros"
    instruction: str = ""
    control_rate_hz: float = 0.0
    margin_ticks: int = 1
    rt_priority: int = 0
    temperature: float = 1.0
    on_violation: str = "clamp"
    joint_states_topic: str = "/joint_states"
    image_topic: str = "/camera/{camera}/image_raw"
    image_transport: str = "raw"
    instruction_topic: str = "/tether/instruction"
    command_mode: str = "trajectory"
    command_topic: str = "/joint_trajectory_controller/joint_trajectory"
    time_from_start_s: float = 0.0
    diagnostics_topic: str = "/diagnostics"
    diagnostics_period_s: float = 1.0
    teleop_topic: str = "/tether/teleop"
    teleop_timeout_s: float = 0.2
    max_age_s: float = 0.2
    max_skew_s: float = 0.1
    learner: str = ""
    learner_ca: str = ""
    learner_cert: str = ""
    learner_key: str = ""
    spool: str = ""
    trusted_keys: str = ""
    allow_unsigned: bool = False
    fetch: str = "process"
    fetch_priority: str = "idle"

    def __post_init__(self):
        checks = [
            (self.image_transport in ("raw", "compressed"), "image_transport must be 'raw' or "
             f"'compressed', got {self.image_transport!r}"),
            (self.command_mode in ("trajectory", "position"), "command_mode must be 'trajectory' "
             f"(JointTrajectoryController) or 'position' (forward controller), got "
             f"{self.command_mode!r}"),
            (self.on_violation in ("clamp", "reject"), f"on_violation must be 'clamp' or "
             f"'reject', got {self.on_violation!r}"),
            (self.control_rate_hz >= 0, f"control_rate_hz must be >= 0 (0: the artifact's rate), "
             f"got {self.control_rate_hz}"),
            (self.margin_ticks >= 0, f"margin_ticks must be >= 0, got {self.margin_ticks}"),
            (0 <= self.rt_priority <= 99, f"rt_priority must be in 0..99 (0: off), got "
             f"{self.rt_priority}"),
            (self.max_age_s > 0 and self.max_skew_s > 0, f"max_age_s and max_skew_s must be > 0, "
             f"got {self.max_age_s} and {self.max_skew_s}"),
            (self.time_from_start_s >= 0, "time_from_start_s must be >= 0 (0: one period)"),
            (self.diagnostics_period_s > 0, "diagnostics_period_s must be > 0"),
            (self.teleop_timeout_s > 0, f"teleop_timeout_s must be > 0, got {self.teleop_timeout_s}"),
            (bool(self.robot_id), "robot_id must not be empty"),
            (not (why := fetch_setting_error(self.fetch, self.fetch_priority)), str(why)),
            (bool(self.learner_cert) == bool(self.learner_key), "give both learner_cert and "
             "learner_key (mutual TLS) or neither"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"tether ROS parameters: {message}")

    @property
    def trusted_key_files(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.trusted_keys.split(",") if k.strip())

    def image_topic_for(self, camera: str) -> str:
        topic = self.image_topic.replace(CAMERA, camera)
        return topic + "/compressed" if self.image_transport == "compressed" else topic

    @classmethod
    def from_mapping(cls, values: dict) -> "RosParams":
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"tether ROS parameters: unknown parameter {key!r}{hint}")
        typed = {k: type(known[k].default)(v) for k, v in values.items()}
        return cls(**typed)


# descriptions shown by `ros2 param describe` (the rclpy transport declares each one)
DESCRIPTIONS = {
    "artifact": "policy artifact directory (policy.onnx + manifest.json); loaded on configure",
    "backend": "policy backend: ort | torch | tensorrt",
    "robot_description": "robot description: a built-in name (robots/descriptions) or a YAML path",
    "robot_id": "this robot's identity towards the learner (experience, weights)",
    "task": "task name recorded with the experience",
    "instruction": "language instruction used until one arrives on instruction_topic",
    "control_rate_hz": "control rate in Hz; 0 = the artifact's rate",
    "margin_ticks": "chunk settings: request the next chunk this many ticks before the delay",
    "rt_priority": "control thread under SCHED_FIFO at this priority, inference 10 below "
                   "(needs CAP_SYS_NICE or rtprio limits); 0 = normal threads",
    "temperature": "policy sampling temperature; 0 = the mean action",
    "on_violation": "safety envelope on a violating command: clamp | reject (hold)",
    "joint_states_topic": "sensor_msgs/JointState input (best effort)",
    "image_topic": "sensor_msgs/Image input per camera; {camera} is the manifest camera name",
    "image_transport": "raw (sensor_msgs/Image) | compressed (CompressedImage on <topic>/compressed)",
    "instruction_topic": "std_msgs/String instruction input (reliable, transient local)",
    "command_mode": "trajectory (JointTrajectory to a JointTrajectoryController) | position "
                    "(Float64MultiArray to a forward position controller)",
    "command_topic": "command output (reliable)",
    "time_from_start_s": "time_from_start of each trajectory point; 0 = one control period",
    "diagnostics_topic": "diagnostic_msgs/DiagnosticArray output",
    "teleop_topic": "sensor_msgs/JointState input: an operator's joint position targets; while "
                    "they arrive the operator drives and the node records human interventions "
                    "(empty: no teleoperation)",
    "teleop_timeout_s": "the operator lets go when no teleop message came for this long (s)",
    "diagnostics_period_s": "seconds between diagnostics messages (and on every state change)",
    "max_age_s": "hold when the newest joint state or image is older than this (s)",
    "max_skew_s": "hold when cameras and joint states are further apart than this (s)",
    "learner": "learner gRPC address host:port; empty = offline",
    "learner_ca": "TLS: CA certificate (PEM) that signed the learner's; empty = plaintext",
    "learner_cert": "mutual TLS: this robot's certificate (PEM)",
    "learner_key": "mutual TLS: this robot's private key (PEM)",
    "spool": "experience spool directory; empty = ./tether-robot/<robot_id>/spool",
    "trusted_keys": "comma-separated learner public key files (PEM); artifacts must be signed "
                    "by one of them, the one in 'artifact' included",
    "allow_unsigned": "accept unsigned artifacts (local development only; logged as a warning)",
    "fetch": "where new versions are fetched: process (a child of its own, so the control loop "
             "keeps its cores and GIL) | thread",
    "fetch_priority": "the fetch process's CPU priority: idle (SCHED_IDLE: only cores nothing "
                      "else wants) | a nice increment 1..19",
}
assert set(DESCRIPTIONS) == {f.name for f in dataclasses.fields(RosParams)}


def defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(RosParams)}


def load_params_file(path: str | pathlib.Path, node_name: str = "tether_robot") -> RosParams:
    """Read a ROS 2 parameter file: the ``ros__parameters`` of ``node_name`` (or of ``/**``)."""
    data = yaml.safe_load(pathlib.Path(path).read_text()) or {}
    section = None
    for key in (node_name, "/" + node_name.lstrip("/"), "/**"):
        if isinstance(data.get(key), dict) and "ros__parameters" in data[key]:
            section = data[key]["ros__parameters"]
            break
    if section is None:
        raise ValueError(f"{path}: no '{node_name}: ros__parameters:' section (found "
                         f"{sorted(data)}); use the node name given to the launch file")
    return RosParams.from_mapping(section)
