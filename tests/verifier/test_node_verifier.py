"""A robot node runs the learned verifier shipped in the artifact (verifier.onnx)."""
import numpy as np
import pytest

from runtime.node import NodeConfig, RobotNode
from verifier.scheduler import SchedulerConfig
from tests.doubles import PointMassRobot

torch = pytest.importorskip("torch")


def _artifact(root, threshold):
    from learner.export import export_artifact
    from learner.model import ReferenceVLA, VLAConfig
    from learner.verifier_model import ChunkScorer, ScorerConfig
    from learner.verifier_train import TrainedScorer
    from robots.description import load_description

    torch.manual_seed(0)
    desc = load_description("sawyer_metaworld")
    cam = desc.cameras[0]
    config = VLAConfig(cameras=(cam.name,), image_hw=(cam.height, cam.width), width=32,
                       features=16)
    scorer = TrainedScorer(ChunkScorer(ScorerConfig(features=16, width=16)), threshold, (1.0, 0.0),
                           {})
    norm = {"state_mean": [0.0, 0.6, 0.2, 0.5], "state_std": [0.2, 0.2, 0.1, 0.5],
            "action_mean": [0.0] * 4, "action_std": [0.5] * 4}
    return export_artifact(ReferenceVLA(config), root, version=1, parent_version=0,
                           normalization=norm, robot=desc.name, control_rate_hz=25.0,
                           verifier=scorer)


def _run(tmp_path, threshold):
    manifest = _artifact(tmp_path / "art", threshold)
    assert "verifier.onnx" in manifest.files and manifest.extra["verifier"]["threshold"] == threshold
    robot = PointMassRobot(max_steps=20)
    node = RobotNode(NodeConfig(robot_id="r0", task="reach", artifact=str(tmp_path / "art"),
                                spool=str(tmp_path / "spool"), seconds=1.5,
                                allow_unsigned=True), robot=robot)  # a local, unsigned export
    assert node.policy.scorer is not None
    return node.run(), robot


def test_node_scores_k_candidates_per_chunk(tmp_path):
    status, _ = _run(tmp_path, 0.0)
    v = status["verifier"]
    assert v["mode"] == "resample" and v["chunks_checked"] > 0 and v["chunks_rejected"] == 0
    assert v["candidates"] == SchedulerConfig().k * v["chunks_checked"]
    assert v["chosen_p_safe_mean"] is not None and status["inference"]["chunks"] > 0
    assert status["control"]["verifier_hold_ticks"] == 0


def test_node_holds_for_a_bounded_time_when_no_candidate_passes(tmp_path):
    """A scorer that vetoes everything (threshold 1) makes the robot hold, but only for
    ``max_held`` decisions at a time: then the veto is lifted for one chunk (counted), so a
    poor scorer can never stall a robot (the fleet symptom: a robot that stopped sending
    experience because every episode was all hold ticks and no chunk)."""
    status, robot = _run(tmp_path, 1.0)
    v = status["verifier"]
    assert v["chunks_rejected"] > 0 and v["resample_rounds"] > 0
    assert v["veto_overrides"] > 0 and status["inference"]["chunks"] == v["veto_overrides"]
    assert v["chunks_rejected"] <= 2 * (v["veto_overrides"] + 1)  # max_held = 2 in a row
    # those holds are the verifier's decisions, counted as such, not as inference stalls
    c = status["control"]
    assert c["verifier_hold_ticks"] > 0 and c["stall_ticks"] < c["verifier_hold_ticks"]
    sent = np.asarray(robot.sent)
    assert np.allclose(sent[:2, :3], 0.0)  # it held first
    assert np.abs(sent[:, :3]).max() > 0  # and then moved on an overridden chunk
