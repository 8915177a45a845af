"""The learning lab runs the robots' real pipeline on virtual clocks into the real trainer."""
import pytest

from sim import learning_lab
from sim.tasks import DEFAULT_TASKS


@pytest.mark.timeout(600)
def test_the_lab_trains_on_what_the_robots_recorded_and_publishes_each_iteration(tmp_path):
    rows = learning_lab.run(2, 1, trainer={"epochs": 1}, work_dir=tmp_path, log=lambda _: None)
    assert [r["version"] for r in rows] == [1, 2]  # iteration 2 ran the version 1 trained
    for r in rows:
        assert set(r["tasks"]) == set(DEFAULT_TASKS)
        assert all(t["episodes"] == 1 and 0 <= t["successes"] <= 1 and t["supervised"] == 0
                   for t in r["tasks"].values())
        assert r["records"] >= 3 and r["human_records"] == 0 and r["kl_update"] >= 0
    assert (tmp_path / "registry").is_dir()


@pytest.mark.timeout(600)
def test_with_a_verifier_the_learner_ships_a_scorer_that_the_robots_then_run(tmp_path):
    rows = learning_lab.run(2, 4, tasks=("reach-v3", "push-v3"), trainer={"epochs": 1},
                            work_dir=tmp_path, log=lambda _: None,
                            verifier={"mode": "filter", "selection": "rank", "k": 8,
                                      "advantage_weight": 1.0, "advantage_lambda": 0.0})
    assert rows[0]["candidates"] == 1  # version 1 (the pretrained one) ships no scorer
    assert rows[1]["candidates"] == 8  # version 2 ships the scorer trained on iteration 0
    assert "scorer" in rows[0] and -1 <= rows[0]["scorer"]["calib_adv_corr"] <= 1


@pytest.mark.timeout(600)
def test_records_keep_the_policys_rows_beyond_the_bounds_the_envelope_saturates():
    import numpy as np

    from learner.pretrain import ensure_pretrained
    from runtime import tensors
    from runtime.clock import VirtualClock
    from sim.metaworld_robot import MetaWorldRobot
    artifact = ensure_pretrained(DEFAULT_TASKS, ".tether-cache/pretrained", seed=0)
    clock = VirtualClock()
    robot = MetaWorldRobot("door-open-v3", seed=3, clock=clock, max_steps=60)
    try:
        records, outcomes = learning_lab.rollout(artifact, robot, clock, "door-open-v3", 1, seed=5)
    finally:
        robot.close()
    assert len(outcomes) == 1 and records
    executed = np.concatenate([tensors.from_proto(r.actions) for r in records])
    proposed = np.concatenate([tensors.from_proto(r.policy_actions) for r in records])
    assert np.abs(executed).max() <= 1.0 + 1e-6  # the envelope's commands: within the bounds
    assert np.abs(proposed).max() > 1.0  # door-open's gripper saturates: the samples go beyond
