"""Signed weights on the robot: the node holds its initial artifact to the same rule as fetched
ones, and goes back to the previous policy from memory when the learner rolls a canary back."""
import logging
import pathlib
import subprocess
import sys
import threading
import time

import pytest

from runtime.node import NodeConfig, RobotNode
from runtime.signature import SignatureError
from tests.doubles import PointMassRobot, export_tiny_artifact, public_key_for_tests
from tests.runtime.learner_double import LearnerDouble, serve

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("signed")
    export_tiny_artifact(root / "v1", version=1, seed=1)
    export_tiny_artifact(root / "v2", version=2, seed=2)
    export_tiny_artifact(root / "unsigned", version=1, seed=1, sign=False)
    return root


def test_the_robot_side_imports_no_cryptography_until_it_checks():
    probe = ("import sys, runtime.signature, runtime.weights, runtime.node; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_an_unsigned_initial_artifact_is_refused_by_default(artifacts, tmp_path):
    config = NodeConfig(robot_id="r", task="t", artifact=str(artifacts / "unsigned"),
                        spool=str(tmp_path / "s"))
    with pytest.raises(SignatureError, match="unsigned.*--allow-unsigned"):
        RobotNode(config, robot=PointMassRobot())
    # signed, but this robot trusts no key: refused too, naming the flag to fix it
    with pytest.raises(SignatureError, match="does not trust.*--trusted-key"):
        RobotNode(NodeConfig(robot_id="r", task="t", artifact=str(artifacts / "v1"),
                             spool=str(tmp_path / "s")), robot=PointMassRobot())


def test_allow_unsigned_starts_with_a_warning(artifacts, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="runtime.node"):
        node = RobotNode(NodeConfig(robot_id="r", task="t", artifact=str(artifacts / "unsigned"),
                                    spool=str(tmp_path / "s"), allow_unsigned=True),
                         robot=PointMassRobot())
    assert node.policy.version == 1
    assert any("--allow-unsigned" in r.getMessage() for r in caplog.records)


def test_tether_robot_exits_with_a_clear_message_on_an_unsigned_artifact(artifacts, tmp_path):
    cmd = [sys.executable, "-m", "tether.cli", "robot", "--robot-id", "r", "--task", "reach-v3",
           "--artifact", str(artifacts / "unsigned"), "--spool", str(tmp_path / "spool"),
           "--trusted-key", public_key_for_tests()]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refusing the initial artifact" in r.stderr and "unsigned" in r.stderr


def test_node_rolls_back_to_the_previous_policy_from_memory(artifacts, tmp_path):
    learner = LearnerDouble()
    server, port = serve(learner)
    config = NodeConfig(robot_id="r0", task="reach", artifact=str(artifacts / "v1"),
                        learner=f"127.0.0.1:{port}", spool=str(tmp_path / "spool"),
                        seconds=4.0, drain_timeout_s=10, trusted_keys=(public_key_for_tests(),))
    node = RobotNode(config, robot=PointMassRobot(max_steps=20))
    first = node.policy
    learner.artifacts[1] = str(artifacts / "v1")

    def publish_then_roll_back():
        time.sleep(0.5)
        learner.publish(2, artifacts / "v2")
        assert node.subscriber.wait_for_version(2, timeout=5)
        deadline = time.monotonic() + 5
        while node.worker.policy.version != 2 and time.monotonic() < deadline:
            time.sleep(0.02)  # swapped in at a chunk boundary
        learner.roll_back_to(1)

    t = threading.Thread(target=publish_then_roll_back)
    t.start()
    try:
        status = node.run()
    finally:
        t.join()
        server.stop(0)
    assert status["policy_version"] == 1 and node.worker.policy is first  # the same runner
    assert status["swaps"] == 2 and status["swap_stall_ticks"] == 0
    assert status["weights"]["rollbacks"] == 1 and status["weights"]["rolled_back"] == [2]
    assert [v for v, _, _ in learner.fetches].count(1) == 0  # nothing fetched to go back
    assert any("rolling back to v1 (still loaded)" in e for e in status["events"])
