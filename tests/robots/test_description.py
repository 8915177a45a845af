import numpy as np
import pytest

from robots.description import RobotDescription, load_description
from robots.registry import make_robot


def test_builtin_sawyer_loads_and_is_consistent():
    d = load_description("sawyer_metaworld")
    assert d.action_dim == 4 and d.state_dim == 4
    assert d.cameras[0].name == "front"
    lo, hi = d.bounds()
    assert lo.dtype == np.float32 and (lo < hi).all()
    assert d.period_s == pytest.approx(1 / d.control_rate_hz)


def test_unknown_description_names_builtins():
    with pytest.raises(FileNotFoundError, match="sawyer_metaworld"):
        load_description("no_such_robot")


def test_invalid_descriptions_are_refused_with_the_key():
    base = load_description("sawyer_metaworld").to_dict()
    bad = dict(base, max_delta=[1.0, 1.0])
    with pytest.raises(ValueError, match="max_delta"):
        RobotDescription.from_dict(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        RobotDescription.from_dict(dict(base, max_speed=3))
    with pytest.raises(ValueError, match="command_mode"):
        RobotDescription.from_dict(dict(base, command_mode="torque"))


def test_hold_action_keeps_gripper_for_delta_robots():
    d = load_description("sawyer_metaworld")
    hold = d.hold_action(np.array([0.5, -0.2, 0.1, 0.8], np.float32))
    assert hold.tolist() == pytest.approx([0, 0, 0, 0.8])
    pos = RobotDescription.from_dict(dict(d.to_dict(), command_mode="position"))
    assert pos.hold_action(np.array([0.5, -0.2, 0.1, 0.8])).tolist() == pytest.approx([0.5, -0.2, 0.1, 0.8])
    with pytest.raises(ValueError, match="last command"):
        pos.hold_action(None)


def test_unknown_robot_kind_suggests_nearest():
    with pytest.raises(ValueError, match="did you mean 'metaworld'"):
        make_robot("metaworl")
