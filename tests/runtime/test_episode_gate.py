"""The staleness gate on the robot: no episode starts while the learner's min_version is above
the version the robot has; the loop keeps ticking (counted) and never stops."""
import logging

from runtime.chunks import ActionQueue
from runtime.clock import VirtualClock
from runtime.control import ControlLoop
from runtime.inference import InferenceWorker
from verifier.envelope import Envelope
from verifier.gate import ChunkGate
from tests.doubles import FakePolicy, PointMassRobot


def build(gate):
    clock = VirtualClock()
    robot = PointMassRobot(clock=clock, max_steps=10, goal=(9.0, 9.0, 9.0))  # never succeeds
    policy = FakePolicy(horizon=8, action_dim=4, value=0.1)
    queue = ActionQueue(4)
    env = Envelope(robot.describe())
    worker = InferenceWorker(policy, queue, clock, rate_hz=10.0, gate=ChunkGate(env),
                             threaded=False, simulated_latency_s=0.0)
    starts = []
    loop = ControlLoop(robot, queue, env, clock, 10.0, worker=worker,
                       to_command=worker.to_command, from_command=worker.from_command,
                       on_episode_start=starts.append, episode_gate=gate)
    return loop, robot, starts


def test_a_closed_gate_holds_between_episodes_and_the_loop_keeps_ticking(caplog):
    wanted = {"v": 0}
    have = 1
    gate = lambda: (f"want v{wanted['v']}, have v{have}" if wanted["v"] > have else None)
    loop, robot, starts = build(gate)
    loop.run(max_ticks=10)  # one whole 10-tick episode; the next one starts at its end
    assert (robot.resets, loop.episodes, len(starts)) == (2, 1, 2)
    wanted["v"] = 2  # the learner gates the fleet at v2 while this robot has v1
    caplog.set_level(logging.INFO, logger="runtime.control")
    loop.run(max_ticks=10)  # finishes the episode begun above, then waits
    assert loop.episodes == 2 and robot.resets == 2 and robot.sends == 20
    loop.run(max_ticks=15)
    assert loop.gate_wait_ticks == 15 and loop.ticks == 35 and not loop.stopped_by_errors
    # nothing is reset or commanded while waiting
    assert robot.resets == 2 and robot.sends == 20 and len(starts) == 2
    assert loop.stats()["gate_wait_ticks"] == 15
    waits = [r for r in caplog.records if "holding before the next episode" in r.getMessage()]
    assert len(waits) == 1 and "want v2, have v1" in waits[0].getMessage()  # once per wait
    have = 2  # the new version is staged: the next tick starts the episode
    loop.run(max_ticks=5)
    assert robot.resets == 3 and len(starts) == 3 and loop.gate_wait_ticks == 15
    assert robot.sends == 25
    assert any("gate open" in r.getMessage() for r in caplog.records)


def test_no_gate_means_episodes_follow_each_other_at_once():
    loop, robot, starts = build(None)
    loop.run(max_ticks=30)
    assert loop.episodes == 3 and robot.resets == 4 and loop.gate_wait_ticks == 0


def test_a_node_waits_at_the_learners_gate_for_the_version_being_trained(tmp_path):
    """Real learner service and registry: the trainer (here, the test) closes the gate at v2
    before v2 exists; the node finishes its episode, holds, and starts the next one on v2."""
    import threading
    import time

    from learner.export import config_from_manifest
    from learner.model import ReferenceVLA
    from learner.registry import Registry
    from learner.service import serve
    from learner.store import ExperienceStore
    from runtime.node import NodeConfig, RobotNode
    from tests.doubles import export_tiny_artifact, public_key_for_tests, signing_key_for_tests

    export_tiny_artifact(tmp_path / "art", version=1, seed=1)
    registry = Registry(tmp_path / "reg", signing_key=signing_key_for_tests())
    registry.import_initial(tmp_path / "art")
    store = ExperienceStore(tmp_path / "exp")
    server, port = serve("127.0.0.1:0", store, registry)
    registry.set_min_version(2)  # staleness 0: the update that becomes v2 has started
    config = NodeConfig(robot_id="r0", task="reach", artifact=str(registry.artifact_dir(1)),
                        learner=f"127.0.0.1:{port}", spool=str(tmp_path / "spool"),
                        status=str(tmp_path / "status.json"), seconds=4.0, drain_timeout_s=10,
                        trusted_keys=(public_key_for_tests(),))
    node = RobotNode(config, robot=PointMassRobot(max_steps=10, goal=(9.0, 9.0, 9.0)))

    def train_and_publish():
        time.sleep(1.5)
        model = ReferenceVLA(config_from_manifest(registry.manifest(1)))
        registry.publish(model)

    publisher = threading.Thread(target=train_and_publish)
    publisher.start()
    try:
        status = node.run()
    finally:
        publisher.join()
        registry.close()
        server.stop(0)
        store.close()
    by_version = status["success_by_version"]
    assert status["min_version"] == 2 and status["policy_version"] == 2
    assert status["gate_wait_ticks"] >= 10  # at least 0.4 s of holding between episodes
    assert status["control"]["gate_wait_ticks"] == status["gate_wait_ticks"]
    # at most an episode or two ran on v1 before the gate reached the robot (none when the
    # announcement came before the first episode: a race on a loaded machine); the rest on v2
    assert by_version.get("1", [0, 0])[1] <= 3 and by_version["2"][1] >= 3
    # the loop never stopped: 4 s at 25 Hz, waiting included
    assert 90 <= status["control"]["ticks"] <= 101 and not node.loop.stopped_by_errors
