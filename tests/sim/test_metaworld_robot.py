"""Contract tests for MetaWorldRobot (robots.base.Robot) and the task registry."""
import numpy as np
import pytest

from robots.base import Observation, Robot, StepResult
from runtime.clock import VirtualClock
from sim.metaworld_robot import MetaWorldRobot
from sim.tasks import DEFAULT_TASKS, TASKS, get_task


@pytest.fixture(scope="module")
def robot():
    r = MetaWorldRobot("reach-v3", seed=1, max_steps=5, clock=VirtualClock(start=7.0))
    yield r
    r.close()


def test_registry_covers_mt50_with_distinct_instructions():
    assert len(TASKS) == 50
    assert len({t.instruction for t in TASKS.values()}) == 50
    assert get_task("peg-insert-side-v3").expert == "SawyerPegInsertionSideV3Policy"
    assert len(DEFAULT_TASKS) == 3 and all(t in TASKS for t in DEFAULT_TASKS)


def test_unknown_task_suggests_nearest():
    with pytest.raises(ValueError, match="did you mean 'reach-v3'"):
        get_task("reach-v2")
    with pytest.raises(ValueError, match="did you mean"):
        MetaWorldRobot("pushh-v3")


def test_conforms_to_robot_protocol(robot):
    assert isinstance(robot, Robot)
    desc = robot.describe()
    obs = robot.reset()
    assert isinstance(obs, Observation)
    cam = desc.cameras[0]
    assert set(obs.images) == {cam.name}
    img = obs.images[cam.name]
    assert img.shape == (cam.height, cam.width, cam.channels) and img.dtype == np.uint8
    assert obs.state.shape == (desc.state_dim,) and obs.state.dtype == np.float32
    assert obs.instruction == "reach the goal position"
    assert obs.timestamp == 7.0
    res = robot.send_action(np.zeros(desc.action_dim, np.float32))
    assert isinstance(res, StepResult) and res.sent.shape == (desc.action_dim,)
    assert robot.task == "reach-v3" and robot.episode_steps == 1


def test_action_is_clipped_and_moves_the_hand(robot):
    robot.reset()
    before = robot.observe().state.copy()
    res = robot.send_action(np.array([5.0, 0.0, 0.0, -3.0], np.float32))
    np.testing.assert_array_equal(res.sent, [1.0, 0.0, 0.0, -1.0])
    after = robot.observe().state
    assert after[0] > before[0] + 1e-3  # +x command moves the end effector along +x


def test_bad_action_shape_raises_with_shape(robot):
    robot.reset()
    with pytest.raises(ValueError, match=r"\(3,\)"):
        robot.send_action(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="non-finite"):
        robot.send_action(np.array([np.nan, 0, 0, 0], np.float32))


def test_truncates_at_max_steps_then_refuses_until_reset(robot):
    robot.reset()
    results = [robot.send_action(np.zeros(4, np.float32)) for _ in range(5)]
    assert [r.truncated for r in results] == [False] * 4 + [True]
    assert not any(r.terminated for r in results)
    with pytest.raises(RuntimeError, match="reset"):
        robot.send_action(np.zeros(4, np.float32))
    robot.reset()
    assert robot.episode_steps == 0


def test_reset_varies_and_is_reproducible_from_seed():
    def goals(seed):
        r = MetaWorldRobot("reach-v3", seed=seed)
        try:
            out = []
            for _ in range(3):
                r.reset()
                out.append(r.raw_observation[-3:])
            return np.array(out)
        finally:
            r.close()

    a, b, c = goals(3), goals(3), goals(4)
    np.testing.assert_array_equal(a, b)
    assert np.linalg.norm(a[0] - a[1]) > 1e-3 and np.linalg.norm(a[1] - a[2]) > 1e-3
    assert not np.allclose(a, c)


def test_expert_succeeds_and_terminates_on_success():
    r = MetaWorldRobot("reach-v3", seed=0, max_steps=150)
    try:
        r.reset()
        for _ in range(150):
            a = r.expert_action()
            assert a.shape == (4,) and np.all(np.abs(a) <= 1.0)
            res = r.send_action(a)
            if res.terminated or res.truncated:
                break
        assert res.success and res.terminated and not res.truncated
    finally:
        r.close()


def test_use_after_close_is_loud():
    r = MetaWorldRobot("reach-v3", seed=0)
    r.reset()
    r.close()
    r.close()  # idempotent
    for call in (r.reset, r.observe, r.expert_action, lambda: r.send_action(np.zeros(4))):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_max_steps_beyond_metaworld_limit_is_refused():
    with pytest.raises(ValueError, match="max_steps"):
        MetaWorldRobot("reach-v3", max_steps=501)


def test_a_supervised_robot_that_stalls_is_taken_over_by_the_expert():
    from sim.supervisor import SupervisorConfig

    config = SupervisorConfig(rate=1.0, patience=10, earliest=15)
    r = MetaWorldRobot("reach-v3", seed=0, max_steps=150, supervision=config)
    try:
        r.reset()
        assert r.supervised
        results = []
        for _ in range(150):
            expert = r.expert_action()
            res = r.send_action(np.zeros(4, np.float32))  # the robot stands still: no progress
            results.append((res, expert))
            if res.terminated or res.truncated:
                break
        first = next(i for i, (res, _) in enumerate(results) if res.operator)
        assert first >= config.earliest - 1  # not before ``earliest`` steps, then held to the end
        assert all(res.operator for res, _ in results[first:])
        assert all(not res.operator and not res.sent.any() for res, _ in results[:first])
        for res, expert in results[first:]:
            assert np.allclose(res.sent, expert)  # the operator drives with the expert's command
        assert results[-1][0].success and r.supervisor.takeovers == 1
    finally:
        r.close()


def test_supervision_watches_about_its_rate_of_episodes_and_zero_never():
    r = MetaWorldRobot("reach-v3", seed=1, max_steps=30, supervision=0.5)
    off = MetaWorldRobot("reach-v3", seed=1, max_steps=30)
    try:
        watched = 0
        for _ in range(40):
            r.reset()
            watched += r.supervised
        assert 10 <= watched <= 30
        off.reset()
        assert off.supervisor is None and not off.supervised
        assert not off.send_action(np.zeros(4, np.float32)).operator
    finally:
        r.close()
        off.close()
    with pytest.raises(ValueError, match="supervision rate"):
        MetaWorldRobot("reach-v3", supervision=1.5)
