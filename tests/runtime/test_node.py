import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from runtime.node import NodeConfig, RobotNode
from tests.doubles import PointMassRobot, export_tiny_artifact, public_key_for_tests
from tests.runtime.learner_double import LearnerDouble, serve

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("artifacts")
    export_tiny_artifact(root / "v1", version=1, seed=1)
    export_tiny_artifact(root / "v2", version=2, seed=2)
    export_tiny_artifact(root / "v3", version=3, seed=3, horizon=4)  # incompatible chunks
    return root


def test_node_swaps_a_published_version_refuses_a_bad_one_and_loses_nothing(artifacts, tmp_path):
    learner = LearnerDouble()
    server, port = serve(learner)
    config = NodeConfig(robot_id="r0", task="reach", artifact=str(artifacts / "v1"),
                        learner=f"127.0.0.1:{port}", spool=str(tmp_path / "spool"),
                        status=str(tmp_path / "status.json"), seconds=4.0, drain_timeout_s=10,
                        trusted_keys=(public_key_for_tests(),))
    node = RobotNode(config, robot=PointMassRobot(max_steps=20))

    def publish():
        time.sleep(1.0)
        learner.publish(2, artifacts / "v2")
        node.subscriber.wait_for_version(2, timeout=5)
        learner.publish(3, artifacts / "v3")

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        status = node.run()
    finally:
        publisher.join()
        server.stop(0)
    assert status["done"] and status["policy_version"] == 2
    assert status["versions_run"] == [1, 2] and status["swaps"] == 1
    assert status["swap_stall_ticks"] == 0
    assert any("refused v3" in e for e in status["events"])
    assert node.subscriber.refused == 1
    # 4 s at 25 Hz, 20-tick episodes
    assert 70 <= status["control"]["ticks"] <= 101 and status["episodes"] >= 4
    assert sum(eps for _, eps in status["success_by_version"].values()) == status["episodes"]
    assert set(status["success_by_version"]) <= {"1", "2"}
    assert status["records_spooled"] > 0 and status["spool_pending"] == 0
    assert status["records_acked"] == status["records_spooled"] == len(learner.seqs)
    assert {r.policy_version for b in learner.batches for r in b.records} == {1, 2}
    assert status["verifier"]["chunks_checked"] >= status["inference"]["chunks"] > 0
    on_disk = json.loads((tmp_path / "status.json").read_text())
    assert on_disk["done"] is True and on_disk["control"]["ticks"] == status["control"]["ticks"]


def test_node_refuses_a_policy_that_does_not_fit_the_robot(artifacts, tmp_path):
    from robots.description import RobotDescription, load_description
    d = load_description("sawyer_metaworld").to_dict()
    d.update(name="three", joints=["a", "b", "c"], action_low=[-1] * 3, action_high=[1] * 3,
             max_delta=[1] * 3, max_delta2=[1] * 3, gripper_index=None)
    robot = PointMassRobot(description=RobotDescription.from_dict(d))
    with pytest.raises(ValueError, match="4 dims.*takes 3"):
        RobotNode(NodeConfig(robot_id="r", task="t", artifact=str(artifacts / "v1"),
                             spool=str(tmp_path / "s"), trusted_keys=(public_key_for_tests(),)),
                  robot=robot)


def test_the_control_loop_runs_real_time_when_the_machine_allows_it(artifacts, tmp_path):
    from runtime.priority import realtime_thread, thread_policy
    probe = []  # may this process use SCHED_FIFO? (root, CAP_SYS_NICE or ulimit -r)
    t = threading.Thread(target=lambda: probe.append(realtime_thread(30)))  # as the node asks
    t.start()
    t.join()
    config = NodeConfig(robot_id="r0", task="reach", artifact=str(artifacts / "v1"),
                        spool=str(tmp_path / "spool"), seconds=0.5, rt_priority=30,
                        trusted_keys=(public_key_for_tests(),))
    node = RobotNode(config, robot=PointMassRobot(max_steps=20))
    result, after = {}, {}

    def run():  # on its own thread: the test process's main thread stays normal whatever happens
        result.update(node.run())
        after["sched"] = thread_policy()
    runner = threading.Thread(target=run)
    runner.start()
    runner.join(30)
    assert result["done"] and result["control"]["ticks"] > 0
    if probe[0] is None:
        assert result["control_sched"] == ["SCHED_FIFO", 30]
        assert result["inference_sched"] == ["SCHED_FIFO", 20]  # below the loop
        assert "control loop at SCHED_FIFO priority 30" in result["events"]
    else:  # not permitted here: said, and the loop ran as a normal thread
        assert result["control_sched"] == ["SCHED_OTHER", 0]
        assert result["inference_sched"] == ["SCHED_OTHER", 0]
        assert "not permitted" in node.worker.rt_refused
        assert any("control loop runs as a normal thread: not permitted" in e
                   for e in result["events"])
    assert after["sched"] == ("SCHED_OTHER", 0)  # the shutdown and the thread are normal again
    assert thread_policy() == ("SCHED_OTHER", 0)


def test_config_is_validated():
    with pytest.raises(ValueError, match="rate_hz"):
        NodeConfig(robot_id="r", task="t", artifact="x", rate_hz=0)
    with pytest.raises(ValueError, match="robot_id"):
        NodeConfig(robot_id="", task="t", artifact="x")
    with pytest.raises(ValueError, match="did you mean|choose one of"):
        NodeConfig(robot_id="r", task="t", artifact="x", strategy="ensemle")
    with pytest.raises(ValueError, match="actions_per_chunk"):
        NodeConfig(robot_id="r", task="t", artifact="x", actions_per_chunk=0)
    with pytest.raises(ValueError, match="rt_priority"):
        NodeConfig(robot_id="r", task="t", artifact="x", rt_priority=100)
    with pytest.raises(ValueError, match="supervision"):
        NodeConfig(robot_id="r", task="t", artifact="x", supervision=2.0)
    with pytest.raises(ValueError, match="simulated operator"):
        NodeConfig(robot_id="r", task="t", artifact="x", supervision=0.5, robot_kind="ros2")
    with pytest.raises(ValueError, match="sim_speed"):
        NodeConfig(robot_id="r", task="t", artifact="x", sim_speed=0)
    with pytest.raises(ValueError, match="is real"):
        NodeConfig(robot_id="r", task="t", artifact="x", sim_speed=2.0, robot_kind="ros2")


def test_cli_chunk_settings_reach_the_worker(artifacts, tmp_path):
    from runtime.node import parse_args
    config = parse_args(["--robot-id", "r", "--task", "t", "--artifact", str(artifacts / "v1"),
                         "--spool", str(tmp_path / "s"), "--strategy", "ensemble",
                         "--trusted-key", public_key_for_tests(),
                         "--actions-per-chunk", "3", "--max-obs-age", "0.5"])
    node = RobotNode(config, robot=PointMassRobot())
    try:
        assert node.worker.strategy == "ensemble"
        assert node.worker.max_obs_age_s == 0.5
        assert node.worker.actions_per_chunk == 3
    finally:
        node.stop()


def test_tether_robot_on_metaworld_stops_cleanly_on_sigterm(artifacts, tmp_path):
    pytest.importorskip("sim.metaworld_robot", reason="needs the sim extra (Meta-World)")
    status_path = tmp_path / "status.json"
    cmd = [sys.executable, "-m", "tether.cli", "robot", "--robot-id", "mw0", "--task",
           "reach-v3", "--artifact", str(artifacts / "v1"), "--spool", str(tmp_path / "spool"),
           "--status", str(status_path), "--seconds", "60", "--seed", "3",
           "--trusted-key", public_key_for_tests()]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.monotonic() + 60
        ticks = 0
        while time.monotonic() < deadline and proc.poll() is None and ticks < 40:
            time.sleep(0.3)
            try:
                ticks = json.loads(status_path.read_text())["control"]["ticks"]
            except (OSError, ValueError, KeyError):
                pass
        assert ticks >= 40, proc.stdout.read() if proc.poll() is not None else "no progress"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    s = json.loads(status_path.read_text())
    assert s["done"] and s["robot_id"] == "mw0" and s["task"] == "reach-v3"
    assert s["versions_run"] == [1] and s["records_spooled"] > 0
    assert s["control"]["stall_ticks"] <= s["control"]["ticks"] // 4
    assert s["verifier"]["chunks_rejected"] == 0


class _Supervised(PointMassRobot):
    """Every other episode is watched; in a watched one the operator drives from the 5th send."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.supervised = True
        self._sends_in_episode = 0

    def reset(self):
        self.supervised = not self.supervised
        self._sends_in_episode = 0
        return super().reset()

    def send_action(self, action):
        import dataclasses
        self._sends_in_episode += 1
        res = super().send_action(action)
        if self.supervised and self._sends_in_episode >= 5:
            return dataclasses.replace(res, operator=True)
        return res


def test_supervised_episodes_are_recorded_as_interventions_and_not_counted_as_the_policys(
        artifacts, tmp_path):
    from runtime.spool import Spool

    config = NodeConfig(robot_id="r0", task="reach", artifact=str(artifacts / "v1"),
                        spool=str(tmp_path / "spool"), status=str(tmp_path / "status.json"),
                        seconds=3.0, trusted_keys=(public_key_for_tests(),))
    robot = _Supervised(max_steps=10)
    node = RobotNode(config, robot=robot)
    status = node.run()
    total = status["episodes"] + status["supervised_episodes"]
    assert status["supervised_episodes"] >= 2 and abs(status["episodes"] - status["supervised_episodes"]) <= 1
    assert sum(eps for _, eps in status["success_by_version"].values()) == status["episodes"]
    assert status["interventions"] >= status["supervised_episodes"]
    assert status["control"]["operator_ticks"] >= 5 * (status["supervised_episodes"] - 1)
    records = [r for _, b in Spool(tmp_path / "spool", "r0").peek(10_000) for r in b.records]
    human = [r for r in records if r.human_intervention]
    assert human and all(r.behaviour_log_prob == 0.0 and r.prefix_len == 0 for r in human)
    assert len({r.episode_id for r in records}) >= total - 1
