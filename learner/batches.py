"""ChunkRecords -> torch training tensors, decoded exactly as the robot feeds its policy.

Images HxWxC uint8 -> CxHxW float32 in [0, 1]; state normalized with the manifest's
state_mean/state_std; instruction tokens from the manifest's tokenizer; prefix/prefix_len as
recorded. The executed rows' actions are scattered into their chunk rows (``offsets``) with a
row mask, so the log-probability of exactly the executed rows can be taken under a full [H, A]
Gaussian. ``actions`` holds the rows the policy proposed (``policy_actions``: before the safety
envelope saturated or rate-limited them), which is what the behaviour probability was taken of
and what a policy gradient needs; ``executed`` holds what the robot did, which imitation copies.
A record without ``policy_actions`` (an operator's, or from a robot before the field) has the
executed rows in both.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from learner.model import VLAConfig
from runtime.artifact import Manifest
from runtime.tensors import from_proto
from runtime.tokenizer import tokenize
from tether.wire import tether_pb2 as pb

STD_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """What the policy expects, taken from a manifest."""
    config: VLAConfig
    state_mean: np.ndarray
    state_std: np.ndarray
    tokenizer: dict

    @classmethod
    def from_manifest(cls, manifest: Manifest, config: VLAConfig) -> "DecodeSpec":
        norm = manifest.normalization or {}
        s = config.state_dim
        mean = np.asarray(norm.get("state_mean", np.zeros(s)), np.float32)
        std = np.asarray(norm.get("state_std", np.ones(s)), np.float32)
        if mean.shape != (s,) or std.shape != (s,):
            raise ValueError(f"manifest normalization state_mean/state_std have shapes "
                             f"{mean.shape}/{std.shape}; the model's state_dim is {s}")
        tokenizer = manifest.inputs.get("tokenizer", {"kind": "bytes", "max_len": config.max_tokens})
        if int(tokenizer.get("max_len", -1)) != config.max_tokens:
            raise ValueError(f"manifest tokenizer max_len {tokenizer.get('max_len')} differs from "
                             f"the model's max_tokens {config.max_tokens}")
        return cls(config, mean, np.maximum(std, STD_FLOOR), tokenizer)


@dataclasses.dataclass
class Batch:
    images: dict            # cam -> [B, C, H, W] float32
    state: torch.Tensor     # [B, S] normalized
    tokens: torch.Tensor    # [B, L] int64
    prefix: torch.Tensor    # [B, H, A]
    prefix_len: torch.Tensor  # [B] int64
    actions: torch.Tensor   # [B, H, A] the policy's rows at the executed offsets, zeros elsewhere
    executed: torch.Tensor  # [B, H, A] the executed actions at their offsets, zeros elsewhere
    row_mask: torch.Tensor  # [B, H] 1 on executed rows
    behaviour_log_prob: torch.Tensor  # [B] float64 as recorded
    policy_version: torch.Tensor      # [B] int64
    # cam -> [B, width]: the images through the encoders whose weights ``encoder_state`` holds
    # (``encoded``); None: not encoded
    features: dict | None = None
    encoder_state: dict | None = None

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def inputs(self) -> tuple:
        """The network's inputs, images as decoded."""
        return self.images, self.state, self.tokens, self.prefix, self.prefix_len

    def inputs_for(self, model) -> tuple:
        """``model``'s inputs: the encoded images where its encoders are the ones that encoded
        them (bit for bit), else the images."""
        if self.features is None or not _same_encoders(model, self.encoder_state):
            return self.inputs()
        return self.features, self.state, self.tokens, self.prefix, self.prefix_len

    def encoded(self, model, size: int = 256) -> "Batch":
        """This batch with its images encoded once by ``model``'s encoders, for many passes
        through a network whose encoders are frozen (``inputs_for``). The images stay."""
        feats: dict = {cam: [] for cam in self.images}
        with torch.no_grad():
            for s in range(0, len(self), size):
                for cam, f in model.encode({k: v[s:s + size] for k, v in self.images.items()}).items():
                    feats[cam].append(f)
        state = {k: v.detach().clone() for k, v in model.encoders.state_dict().items()}
        return dataclasses.replace(self, features={k: torch.cat(v) for k, v in feats.items()},
                                   encoder_state=state)

    def select(self, idx: torch.Tensor) -> "Batch":
        rows = {f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
                if f.name not in ("images", "features", "encoder_state")}
        return Batch({k: v[idx] for k, v in self.images.items()}, **rows,
                     features=None if self.features is None else
                     {k: v[idx] for k, v in self.features.items()},
                     encoder_state=self.encoder_state)

    def parts(self, size: int):
        """Consecutive sub-batches of at most ``size`` records, in order (for no-grad passes)."""
        for s in range(0, len(self), size):
            yield self.select(torch.arange(s, min(s + size, len(self))))


def _same_encoders(model, state: dict | None) -> bool:
    if state is None:
        return False
    mine = model.encoders.state_dict()
    return mine.keys() == state.keys() and all(torch.equal(mine[k], v) for k, v in state.items())


def check_record(r: pb.ChunkRecord, spec: DecodeSpec) -> str | None:
    """Why this (store-valid) record cannot train this model, or None if it can."""
    c = spec.config
    for cam in c.cameras:
        if cam not in r.observation.images:
            return f"no image for camera {cam!r}"
        shape = tuple(r.observation.images[cam].shape)
        if shape != (*c.image_hw, c.channels):
            return f"camera {cam!r} image shape {shape}, model wants {(*c.image_hw, c.channels)}"
    if tuple(r.observation.state.shape) != (c.state_dim,):
        return f"state shape {tuple(r.observation.state.shape)}, model wants ({c.state_dim},)"
    if tuple(r.actions.shape[1:]) != (c.action_dim,):
        return f"action dim {tuple(r.actions.shape)}, model wants [n, {c.action_dim}]"
    if r.offsets and max(r.offsets) >= c.horizon:
        return f"offsets {list(r.offsets)} beyond horizon {c.horizon}"
    if r.HasField("prefix") and tuple(r.prefix.shape) != (c.horizon, c.action_dim):
        return f"prefix shape {tuple(r.prefix.shape)}, model wants {(c.horizon, c.action_dim)}"
    return None


def decode(records: list[pb.ChunkRecord], spec: DecodeSpec) -> Batch:
    """Decode records that passed ``check_record`` into one batch."""
    c = spec.config
    b, h, a = len(records), c.horizon, c.action_dim
    images = {cam: np.empty((b, c.channels, *c.image_hw), np.float32) for cam in c.cameras}
    state = np.empty((b, c.state_dim), np.float32)
    tokens = np.empty((b, c.max_tokens), np.int64)
    prefix = np.zeros((b, h, a), np.float32)
    prefix_len = np.zeros(b, np.int64)
    actions = np.zeros((b, h, a), np.float32)
    executed = np.zeros((b, h, a), np.float32)
    row_mask = np.zeros((b, h), np.float32)
    token_cache: dict[str, np.ndarray] = {}
    for i, r in enumerate(records):
        obs = r.observation
        for cam in c.cameras:
            images[cam][i] = from_proto(obs.images[cam]).transpose(2, 0, 1).astype(np.float32) / 255.0
        state[i] = (from_proto(obs.state) - spec.state_mean) / spec.state_std
        if obs.instruction not in token_cache:
            token_cache[obs.instruction] = tokenize(obs.instruction, spec.tokenizer)
        tokens[i] = token_cache[obs.instruction]
        if r.HasField("prefix"):
            prefix[i] = from_proto(r.prefix)
            prefix_len[i] = r.prefix_len
        offsets = np.asarray(r.offsets, np.int64)
        executed[i, offsets] = from_proto(r.actions)
        actions[i, offsets] = (from_proto(r.policy_actions) if r.HasField("policy_actions")
                               else executed[i, offsets])
        row_mask[i, offsets] = 1.0
    return Batch(
        images={k: torch.from_numpy(v) for k, v in images.items()},
        state=torch.from_numpy(state), tokens=torch.from_numpy(tokens),
        prefix=torch.from_numpy(prefix), prefix_len=torch.from_numpy(prefix_len),
        actions=torch.from_numpy(actions), executed=torch.from_numpy(executed),
        row_mask=torch.from_numpy(row_mask),
        behaviour_log_prob=torch.tensor([r.behaviour_log_prob for r in records], dtype=torch.float64),
        policy_version=torch.tensor([r.policy_version for r in records], dtype=torch.int64))
