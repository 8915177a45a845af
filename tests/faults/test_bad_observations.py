"""Fault 5, bad observations: a Meta-World robot whose sensors go bad while the node commands it.

A real ``RobotNode`` (policy on ONNX Runtime, action queue, inference thread, envelope, control
loop at the robot's rate on the wall clock) drives a real simulated robot wrapped by
``FaultySensors``, which corrupts what ``observe`` returns in windows: NaN or infinite joint
state, an image of the wrong size, a stale timestamp, a camera that stops delivering (its image
missing). The wrapper logs every command the robot receives next to the fault active when that
tick observed. Checked: every command of a faulty tick is the hold command (the robot holds
within the same tick), the node says why (status ``control.hold_reason`` / ``observation_holds``,
and an event per hold), it commands again once the data are good, and the control loop never
stops.
"""
import threading
import time

import numpy as np
import pytest

from robots.base import Observation
from runtime.node import NodeConfig, RobotNode
from tests.doubles import public_key_for_tests
from tests.faults.report import record, size

FAULTS = ("nan_state", "inf_state", "image_size", "stale", "camera_stops")
REASON = {"nan_state": "state not finite", "inf_state": "state not finite",
          "image_size": "image size", "stale": "stale observation",
          "camera_stops": "camera missing"}
MAX_AGE_S = 0.5


class FaultySensors:
    """A robot whose observations are corrupted while ``fault`` is set (from any thread)."""

    def __init__(self, robot):
        self.robot = robot
        self.fault: str | None = None
        self.sent: list[tuple[str | None, np.ndarray]] = []  # (fault seen that tick, command)
        self.episode_starts: set[int] = set()  # indices into sent: first command of an episode
        self._seen: str | None = None

    def describe(self):
        return self.robot.describe()

    def _corrupt(self, obs: Observation) -> Observation:
        f = self._seen = self.fault
        images, state, stamp = dict(obs.images), np.array(obs.state, np.float32), obs.timestamp
        if f == "nan_state":
            state[1] = np.nan
        elif f == "inf_state":
            state[0] = np.inf
        elif f == "image_size":
            name, img = next(iter(images.items()))
            images[name] = np.ascontiguousarray(img[: img.shape[0] // 2, : img.shape[1] // 2])
        elif f == "stale":
            stamp = stamp - 10 * MAX_AGE_S
        elif f == "camera_stops":
            images = {}
        return Observation(images=images, state=state, instruction=obs.instruction,
                           timestamp=stamp)

    def reset(self):
        self.episode_starts.add(len(self.sent))
        return self._corrupt(self.robot.reset())

    def observe(self):
        return self._corrupt(self.robot.observe())

    def send_action(self, action):
        self.sent.append((self._seen, np.array(action, np.float32)))
        return self.robot.send_action(action)

    def close(self):
        self.robot.close()


def test_bad_observations_hold_within_one_tick_and_resume(tiny_artifact, tmp_path):
    pytest.importorskip("metaworld")
    from robots.registry import make_robot

    rounds = size(1, 6)
    fault_s, good_s = size(0.4, 0.6), size(0.8, 1.0)
    robot = FaultySensors(make_robot("metaworld", task="reach-v3", seed=0, camera="fast"))
    node = RobotNode(NodeConfig(robot_id="r-obs", task="reach-v3", artifact=str(tiny_artifact),
                                spool=str(tmp_path / "spool"), status=str(tmp_path / "status.json"),
                                trusted_keys=(public_key_for_tests(),), max_obs_age_s=MAX_AGE_S),
                     robot=robot)
    runner = threading.Thread(target=node.run, kwargs={"seconds": 600}, daemon=True)
    runner.start()
    windows = []  # (fault, index of the first command sent after it ended)
    try:
        time.sleep(good_s + 0.5)  # warm: the first chunk is queued and the robot moves
        for _ in range(rounds):
            for fault in FAULTS:
                robot.fault = fault
                time.sleep(fault_s)
                robot.fault = None
                windows.append((fault, len(robot.sent)))
                time.sleep(good_s)
                assert node.loop.hold_reason is None, f"still holding after {fault}: " \
                                                      f"{node.loop.hold_reason}"
    finally:
        node.stop()
        runner.join(30)
    assert not runner.is_alive(), "the node did not stop"
    status = node.status()
    desc = robot.describe()

    # every command of a tick that observed a fault is the hold (same tick: no late reaction);
    # an episode's first hold has no last command to keep (the gripper goes to 0)
    prev, faulty, moved_on_fault = None, 0, []
    for i, (fault, cmd) in enumerate(robot.sent):
        prev = None if i in robot.episode_starts else prev
        if fault is not None:
            faulty += 1
            if not np.allclose(cmd, desc.hold_action(prev), atol=1e-6):
                moved_on_fault.append((i, fault, cmd.tolist()))
        prev = cmd
    assert faulty >= len(windows) * 3, f"only {faulty} faulty ticks reached the robot"
    assert not moved_on_fault, f"commands sent on faulty observations: {moved_on_fault[:3]}"

    # it commands again after each window: a non-hold command follows within a second
    resume_ticks = []
    rate = 1.0 / node.loop.period
    for fault, start in windows:
        after = robot.sent[start:start + int(rate)]
        moving = [k for k, (_, c) in enumerate(after) if np.any(np.abs(c[:3]) > 1e-6)]
        assert moving, f"the robot did not command again within 1 s after {fault}"
        resume_ticks.append(moving[0])

    # ... and says why: per-kind hold counts in the status, one event per hold
    holds = status["control"]["observation_holds"]
    for fault in FAULTS:
        assert holds.get(REASON[fault], 0) > 0, f"no hold counted for {fault}: {holds}"
    events = " | ".join(status["events"])
    for fault in FAULTS:
        assert f"holding: {REASON[fault]}" in events, f"no event for {fault}: {events[-500:]}"
    assert status["control"]["hold_reason"] is None
    stops = int(node.loop.stopped_by_errors)
    assert stops == 0 and status["inference"]["errors"] == 0  # nothing bad reached the policy
    record("bad_observations", injected=len(windows), sent=faulty,
           stored=faulty - len(moved_on_fault), lost=len(moved_on_fault), duplicated=0,
           robot_stops=stops, ticks=status["control"]["ticks"], holds_by_reason=holds,
           hold_latency_ticks=0, resume_ticks_max=max(resume_ticks),
           resume_ticks_median=float(np.median(resume_ticks)))


def test_ros_sensor_cache_holds_on_non_finite_joint_states():
    """The ROS 2 node's own sensor check (runtime/ros/sensors.py): a NaN joint reading holds,
    a good one clears it."""
    from types import SimpleNamespace as NS

    from runtime.ros.sensors import SensorCache

    def stamp(t):
        return NS(stamp=NS(sec=int(t), nanosec=int((t % 1) * 1e9)))

    cache = SensorCache(("j1", "j2"), {"front": (2, 2, 3)}, max_age_s=1.0, max_skew_s=1.0,
                        instruction="reach")
    cache.on_image("front", NS(header=stamp(10.0), encoding="rgb8", height=2, width=2, step=6,
                               data=bytes(12)), 10.0)
    cache.on_joint_state(NS(header=stamp(10.0), name=["j1", "j2"], position=[0.1, float("nan")]),
                         10.0)
    assert "joint_states not finite" in cache.hold_reason(10.1)
    cache.on_joint_state(NS(header=stamp(10.1), name=["j1", "j2"], position=[0.1, 0.2]), 10.1)
    assert cache.hold_reason(10.2) is None
