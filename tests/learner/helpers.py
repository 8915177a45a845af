"""Builders for learner tests: a tiny exported artifact + checkpoint, and synthetic episodes whose
actions are the exported policy's own samples with robot-side (numpy, ONNX) log-probs."""
from __future__ import annotations

import pathlib

import numpy as np
import torch

from learner.export import export_artifact
from learner.model import ReferenceVLA, VLAConfig
from runtime.distributions import gaussian_log_prob, sample
from runtime.tensors import to_proto
from runtime.tokenizer import tokenize
from tether.wire import tether_pb2 as pb

NORMALIZATION = {"state_mean": [0.1, -0.2, 0.3, 0.0], "state_std": [0.5, 2.0, 1.0, 0.25],
                 "action_mean": [0.0] * 4, "action_std": [1.0] * 4}


def make_artifact(root: pathlib.Path, seed: int = 0):
    """(artifact_dir, checkpoint_path, model) for the default VLAConfig."""
    torch.manual_seed(seed)
    model = ReferenceVLA(VLAConfig()).eval()
    out = pathlib.Path(root) / "pretrained"
    export_artifact(model, out, version=7, parent_version=6, normalization=NORMALIZATION,
                    robot="sawyer_metaworld", control_rate_hz=25.0)
    ckpt = out.parent / "model.pt"
    torch.save(model.state_dict(), ckpt)
    return out, ckpt, model


def simple_record(robot="r1", episode="e1", seq=0, *, n=2, reward=0.0, done=False, success=False,
                  version=1, rng=None) -> pb.ChunkRecord:
    """A store-valid record with random contents (not consistent with any policy)."""
    rng = rng or np.random.default_rng(seq)
    return pb.ChunkRecord(
        robot_id=robot, episode_id=episode, seq=seq, policy_version=version, task="reach",
        observation=pb.Observation(
            images={"front": to_proto(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))},
            state=to_proto(rng.normal(size=4).astype(np.float32)), instruction="reach the goal",
            timestamp=float(seq)),
        prefix=to_proto(np.zeros((8, 4), np.float32)), prefix_len=0,
        actions=to_proto(rng.uniform(-1, 1, (n, 4)).astype(np.float32)), offsets=list(range(n)),
        behaviour_log_prob=-3.0, reward=reward, terminated=done, success=success)


def policy_episode(session, manifest, robot: str, episode: str, rewards: list[float], *,
                   seed: int, version: int = 1, success: bool = False, first_seq: int = 0,
                   executed: int = 4, bound: float | None = None) -> list[pb.ChunkRecord]:
    """An episode whose actions are sampled from the ONNX policy like a robot would: each chunk
    after the first continues the previous one (prefix of d committed rows, offsets d..d+n-1).
    ``bound``: an envelope saturates the executed actions at +-bound, and the records keep the
    samples as ``policy_actions`` (as a robot's recorder does)."""
    rng = np.random.default_rng(seed)
    h, a = manifest.horizon, manifest.action_dim
    mean_s = np.asarray(manifest.normalization["state_mean"], np.float32)
    std_s = np.asarray(manifest.normalization["state_std"], np.float32)
    tokens = tokenize("push the puck", manifest.inputs["tokenizer"])
    prev = None
    records = []
    for i, reward in enumerate(rewards):
        image = rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)
        state = rng.normal(size=4).astype(np.float32)
        d = 0 if prev is None else 2
        prefix = np.zeros((h, a), np.float32)
        if prev is not None:
            prefix[:d] = prev[executed:executed + d]
        mean, log_std, _ = session.run(None, {
            "image_front": (image.transpose(2, 0, 1)[None].astype(np.float32) / 255.0),
            "state": ((state - mean_s) / std_s)[None], "tokens": tokens[None],
            "prefix": prefix[None], "prefix_len": np.array([d], np.int64)})
        chunk = sample(mean[0], log_std[0], rng)
        chunk[:d] = prefix[:d]
        offsets = np.arange(d, d + executed)
        actions = chunk[offsets]
        sent = actions if bound is None else np.clip(actions, -bound, bound)
        last = i == len(rewards) - 1
        records.append(pb.ChunkRecord(
            robot_id=robot, episode_id=episode, seq=first_seq + i, policy_version=version,
            task="push", observation=pb.Observation(
                images={"front": to_proto(image)}, state=to_proto(state),
                instruction="push the puck", timestamp=0.1 * i),
            prefix=to_proto(prefix), prefix_len=d, actions=to_proto(sent),
            policy_actions=None if bound is None else to_proto(actions), offsets=offsets.tolist(),
            behaviour_log_prob=gaussian_log_prob(mean[0], log_std[0], actions, offsets),
            reward=reward, terminated=last and success, truncated=last and not success,
            success=last and success))
        prev = chunk
    return records
