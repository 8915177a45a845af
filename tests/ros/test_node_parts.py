"""The ROS node's transport-agnostic parts, without DDS or ROS: parameters, sensor decoding,
hold reasons, the ROS robot's hold and first-command limit, and the DDS message types."""
import dataclasses
import pathlib
import types

import numpy as np
import pytest

from robots.description import load_description
from robots.ros_robot import Holding, RosRobot
from runtime.ros.params import RosParams, load_params_file
from runtime.ros.sensors import SensorCache, decode_image, fit_image, to_stamp

REPO = pathlib.Path(__file__).resolve().parents[2]
JOINTS = tuple(load_description("arm7_position").joints)


def header(t):
    sec, nsec = to_stamp(t)
    return types.SimpleNamespace(stamp=types.SimpleNamespace(sec=sec, nanosec=nsec))


def joint_state(t, names=JOINTS, value=0.5):
    return types.SimpleNamespace(header=header(t), name=list(names),
                                 position=[value] * len(names))


def image(t, h=4, w=6, encoding="rgb8", fill=None, step=None):
    c = {"rgb8": 3, "bgr8": 3, "mono8": 1}[encoding]
    data = fill if fill is not None else bytes(range(h * (step or w * c)))
    return types.SimpleNamespace(header=header(t), height=h, width=w, encoding=encoding,
                                 step=step or w * c, data=data)


def test_shipped_params_file_loads_and_every_key_is_a_parameter():
    params = load_params_file(REPO / "launch" / "config" / "robot.yaml")
    assert params == dataclasses.replace(RosParams(), artifact="/opt/tether/policy",
                                         trusted_keys="/opt/tether/signing_key.pub")
    assert params.trusted_key_files == ("/opt/tether/signing_key.pub",)


def test_unknown_parameter_suggests_the_nearest(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("tether_robot:\n  ros__parameters:\n    max_age: 0.3\n")
    with pytest.raises(ValueError, match="did you mean 'max_age_s'"):
        load_params_file(f)
    with pytest.raises(ValueError, match="no 'other: ros__parameters:'"):
        load_params_file(f, "other")
    with pytest.raises(ValueError, match="command_mode"):
        RosParams(command_mode="velocity")
    with pytest.raises(ValueError, match="rt_priority"):
        RosParams(rt_priority=100)
    with pytest.raises(ValueError, match="fetch must be 'process' or 'thread'"):
        RosParams(fetch="sideways")
    with pytest.raises(ValueError, match="fetch_priority must be 'idle' or a nice increment"):
        RosParams(fetch_priority="20")
    assert RosParams.from_mapping({"fetch_priority": 10}).fetch_priority == "10"


def test_compressed_transport_uses_the_image_transport_topic():
    p = RosParams(image_transport="compressed")
    assert p.image_topic_for("wrist") == "/camera/wrist/image_raw/compressed"


def test_images_are_decoded_to_rgb_and_fitted_to_the_policy():
    rgb = decode_image(image(1.0))
    bgr = decode_image(image(1.0, encoding="bgr8"))
    assert rgb.shape == (4, 6, 3) and np.array_equal(bgr, rgb[:, :, ::-1])
    padded = decode_image(image(1.0, step=20))  # rows padded to 20 bytes
    assert padded.shape == (4, 6, 3) and padded[1, 0, 0] == 20
    mono = fit_image(decode_image(image(1.0, encoding="mono8")), 2, 3, 3)
    assert mono.shape == (2, 3, 3) and np.all(mono[..., 0] == mono[..., 2])
    with pytest.raises(ValueError, match="encoding '16UC1' is not supported"):
        decode_image(types.SimpleNamespace(encoding="16UC1"))


def test_hold_reasons_waiting_stale_out_of_sync_and_bad_messages():
    cache = SensorCache(JOINTS, {"front": (2, 3, 3)}, max_age_s=0.2, max_skew_s=0.05,
                        instruction="pick")
    assert cache.hold_reason(10.0) == "waiting for joint_states, front"
    cache.on_joint_state(joint_state(10.0), 10.0)
    cache.on_image("front", image(10.0), 10.0)
    assert cache.hold_reason(10.1) is None
    obs = cache.observation()
    assert obs.images["front"].shape == (2, 3, 3) and obs.state.shape == (7,)
    assert obs.instruction == "pick" and obs.timestamp == pytest.approx(10.0)
    assert cache.hold_reason(10.3).startswith("joint_states stale")
    cache.on_joint_state(joint_state(10.15), 10.15)
    assert "out of sync: front is 0.150 s behind joint_states" in cache.hold_reason(10.15)
    cache.on_image("front", image(10.14), 10.15)
    assert cache.hold_reason(10.15) is None
    cache.on_joint_state(joint_state(10.3, names=JOINTS[:6]), 10.3)
    assert "lacks positions of ['joint7']" in cache.hold_reason(10.3)
    cache.on_joint_state(joint_state(0.0), 10.16)  # unstamped: the receive time counts
    assert cache.hold_reason(10.17) is None


def observed_at(position=0.0):
    """One synchronized observation: every joint at ``position``, one 2 x 3 camera."""
    cache = SensorCache(JOINTS, {"front": (2, 3, 3)}, 1.0, 1.0, "pick")
    cache.on_joint_state(joint_state(1.0, value=position), 1.0)
    cache.on_image("front", image(1.0), 1.0)
    return cache.observation()


def test_ros_robot_limits_its_first_command_and_holds_in_place():
    desc = load_description("arm7_position")
    sent = []
    robot = RosRobot(desc, sent.append)
    with pytest.raises(Holding, match="not started"):
        robot.reset()
    robot.set_observation(observed_at())
    robot.reset()
    far = np.full(7, 1.0, np.float32)
    first = robot.send_action(far)
    assert np.allclose(first.sent[:3], desc.max_delta[:3])  # one velocity step from the joints
    second = robot.send_action(first.sent + 0.01)
    assert not second.truncated
    robot.request_hold("front stale")
    held = robot.send_action(far)
    assert held.truncated and np.array_equal(sent[-1], sent[-2]) and not robot.live
    with pytest.raises(Holding, match="front stale"):
        robot.reset()
    with pytest.raises(ValueError, match="command_mode: position"):
        RosRobot(load_description("sawyer_metaworld"), sent.append)


def test_dds_types_carry_ros2_names_and_plain_cdr():
    msgs = pytest.importorskip("runtime.ros.msgs", reason="needs cyclonedds")
    assert msgs.JointState.__idl__.idl_transformed_typename == \
        "sensor_msgs::msg::dds_::JointState_"
    names = {k: v.__idl__.idl_transformed_typename for k, v in msgs.KINDS.items()}
    assert names["trajectory"] == "trajectory_msgs::msg::dds_::JointTrajectory_"
    assert names["diagnostics"] == "diagnostic_msgs::msg::dds_::DiagnosticArray_"
    wire = msgs.String(data="hi").serialize()
    assert wire[:2] == b"\x00\x01"  # CDR little endian (XCDR1), what ROS 2 speaks
    assert wire[4:] == b"\x03\x00\x00\x00hi\x00"
    from runtime.ros.transport_dds import dds_topic
    assert dds_topic("/joint_states") == "rt/joint_states"
    assert dds_topic("joint_states", "/arm1") == "rt/arm1/joint_states"


def test_before_its_first_command_the_ros_robot_holds_at_the_measured_joints():
    robot = RosRobot(load_description("arm7_position"), lambda a: None)
    with pytest.raises(Holding):
        robot.describe().hold_action(None)
    robot.set_observation(observed_at(0.25))
    assert np.allclose(robot.describe().hold_action(None), 0.25)
    assert np.allclose(robot.describe().hold_action(np.ones(7)), 1.0)


def test_an_operator_drives_while_teleop_messages_are_fresh_and_it_is_recorded_as_such():
    from runtime.ros.sensors import TeleopInput

    desc = load_description("arm7_position")
    sent = []
    robot = RosRobot(desc, sent.append)
    robot.set_observation(observed_at())
    robot.reset()
    teleop = TeleopInput(JOINTS, timeout_s=0.2)
    assert teleop.command(1.0) is None
    teleop.on_joint_state(joint_state(0.0, value=0.3), received=1.0)   # unstamped is fine
    teleop.on_joint_state(joint_state(1.0, names=JOINTS[:3]), received=1.05)  # missing joints
    teleop.on_joint_state(joint_state(1.0, value=float("nan")), received=1.05)
    assert (teleop.received, teleop.refused) == (3, 2)
    robot.set_operator(teleop.command(1.1))
    res = robot.send_action(np.zeros(7, np.float32))
    # the operator's command goes out (within the joint limits; no first-command limit: the
    # operator moves the arm on purpose), reported as the operator's
    lo, hi = desc.bounds()
    wanted = np.clip(np.full(7, 0.3), lo, hi)
    assert res.operator and np.allclose(res.sent, wanted) and np.allclose(sent[-1], wanted)
    assert robot.operator_driving
    robot.set_operator(teleop.command(1.3))  # 0.3 s since the last message: the operator let go
    assert not robot.operator_driving
    back = robot.send_action(np.full(7, 0.31, np.float32))
    assert not back.operator and np.allclose(back.sent, 0.31)
    robot.set_operator(np.full(7, 99.0, np.float32))  # beyond the joint limits: held to them
    assert np.allclose(robot.send_action(np.zeros(7, np.float32)).sent, hi)
    with pytest.raises(ValueError, match="teleop_timeout_s"):
        RosParams(teleop_timeout_s=0)
