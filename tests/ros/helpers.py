"""Shared by the ROS tests: a policy artifact for the 7-DoF position arm (needs torch)."""
import pathlib

from robots.description import load_description

HOME = [0.0, -0.3, 0.0, -2.2, 0.0, 2.0, 0.8]


def export_arm7_artifact(out_dir: pathlib.Path, version: int = 1, seed: int = 0):
    import torch

    from learner.export import export_artifact
    from learner.model import ReferenceVLA, VLAConfig

    torch.manual_seed(seed)
    desc = load_description("arm7_position")
    cam = desc.cameras[0]
    config = VLAConfig(horizon=8, action_dim=desc.action_dim, state_dim=desc.state_dim,
                       cameras=(cam.name,), image_hw=(cam.height, cam.width),
                       channels=cam.channels, width=32, features=16)
    norm = {"state_mean": HOME, "state_std": [0.5] * 7,
            "action_mean": HOME, "action_std": [0.05] * 7}
    export_artifact(ReferenceVLA(config).eval(), out_dir, version=version,
                    parent_version=0, normalization=norm, robot=desc.name,
                    control_rate_hz=desc.control_rate_hz)
    # signed like a learner's artifact; robots trust tests.doubles.public_key_for_tests()
    from learner.signing import sign_artifact
    from tests.doubles import signing_key_for_tests
    return sign_artifact(out_dir, signing_key_for_tests())
