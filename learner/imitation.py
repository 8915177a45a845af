"""Imitation on an aggregated dataset, next to the policy gradient (DESIGN.md, Learning).

The policy gradient moves the network in small steps (``TrainerConfig.lr``): larger ones wreck a
behaviour-cloned policy within minutes. Imitation has no such problem -- it is the objective
the policy was pretrained with -- so it runs as its own optimizer at its own step size
(``imitation_lr``) on a dataset that grows as the fleet works (DAgger's aggregation):

- the demonstrations the policy was cloned from (``learner.demos.DemoSet``), kept for good: it
  does not forget them while it learns from the fleet;
- human interventions: an operator's commands on the states the policy got itself into, the
  data DAgger asks an expert for;
- the policy's own chunks from episodes it finished successfully on its own (filtered
  behaviour cloning: what worked, on the states the policy visits).

Fleet chunks are kept up to ``capacity`` (oldest out first). A sample trains like pretraining:
a random number ``d`` of leading rows is given as the committed prefix (with a little noise),
the mean is regressed onto the rows after it (mean squared error, normalized action space).
The exploration noise (``log_std``) is left to the policy gradient. A fleet chunk's target is its
committed prefix followed by the rows that were executed: both are what the robot did.
"""
from __future__ import annotations

import numpy as np
import torch

from learner.batches import Batch, DecodeSpec
from learner.demos import DemoSet
from learner.model import VLAConfig
from runtime.tokenizer import tokenize


def committed_prefix(target: torch.Tensor, valid: torch.Tensor, generator: torch.Generator,
                     noise: float, keep_one: bool = False) -> tuple:
    """Pretraining's prefix draw for imitation targets [B, H, A] (known rows ``valid`` [B, H]):
    a random number d <= H/2 of leading rows given as the committed prefix, with ``noise``;
    ``keep_one``: d never covers all the known rows. Returns (prefix, d, mask): ``mask``
    [B, H, 1] marks the known rows after the prefix, which the mean is regressed onto."""
    b, h = target.shape[:2]
    d = torch.randint(0, h // 2 + 1, (b,), generator=generator)
    if keep_one:
        d = torch.minimum(d, (valid.sum(1) - 1).clamp(min=0))
    committed = torch.arange(h).reshape(1, h) < d.reshape(-1, 1)
    jitter = noise * torch.randn(target.shape, generator=generator)
    prefix = torch.where(committed.unsqueeze(-1), (target + jitter).clamp(-1, 1),
                         torch.zeros_like(target))
    return prefix, d, (valid & ~committed).unsqueeze(-1).float()


class ImitationSet:
    """Demonstrations plus a bounded ring of fleet chunks, sampled uniformly together."""

    def __init__(self, config: VLAConfig, capacity: int):
        if capacity < 1:
            raise ValueError(f"ImitationSet capacity must be >= 1, got {capacity}")
        c = config
        self.config, self.capacity = c, int(capacity)
        self._cams = tuple(c.cameras)
        self._fleet = self._arrays(self.capacity)
        self._demos = self._arrays(0)
        self._n = 0          # fleet chunks held
        self._next = 0       # ring position
        self._keys: list = [None] * self.capacity  # (robot, seq) per slot: a chunk goes in once
        self._held: set = set()
        self.added = {"demonstration": 0, "intervention": 0, "success": 0}

    def _arrays(self, n: int) -> dict:
        c, h, a = self.config, self.config.horizon, self.config.action_dim
        out = {f"image_{cam}": np.zeros((n, c.channels, *c.image_hw), np.uint8)
               for cam in self._cams}
        out.update(state=np.zeros((n, c.state_dim), np.float32),
                   tokens=np.zeros((n, c.max_tokens), np.int64),
                   target=np.zeros((n, h, a), np.float32), valid=np.zeros((n, h), bool))
        return out

    def __len__(self) -> int:
        return self._n + len(self._demos["state"])

    @property
    def fleet(self) -> int:
        return self._n

    @property
    def demonstrations(self) -> int:
        return len(self._demos["state"])

    # -- adding ----------------------------------------------------------------------------
    def add_demos(self, demos: DemoSet, spec: DecodeSpec) -> int:
        """Every tick of ``demos`` with its next H expert actions (demos of the model's camera
        and state layout; normalized like the fleet's records)."""
        c = self.config
        if len(self._cams) != 1:
            raise ValueError(f"demonstrations hold one camera; the model has {list(self._cams)}")
        if demos.images.shape[1:] != (*c.image_hw, c.channels) or \
                demos.state.shape[1:] != (c.state_dim,) or demos.actions.shape[1:] != (c.action_dim,):
            raise ValueError(f"demonstrations of images {demos.images.shape[1:]}, state "
                             f"{demos.state.shape[1:]}, actions {demos.actions.shape[1:]} do not "
                             f"fit the model ({(*c.image_hw, c.channels)}, {c.state_dim}, "
                             f"{c.action_dim})")
        target, valid = demos.chunk_targets(c.horizon)
        tokens = np.stack([tokenize(t, spec.tokenizer) for t in demos.instructions])
        self._demos = {
            f"image_{self._cams[0]}": np.ascontiguousarray(demos.images.transpose(0, 3, 1, 2)),
            "state": ((demos.state - spec.state_mean) / spec.state_std).astype(np.float32),
            "tokens": tokens[demos.task_index].astype(np.int64), "target": target,
            "valid": valid}
        self.added["demonstration"] += len(demos)
        return len(demos)

    def add(self, batch: Batch, take: torch.Tensor, human: torch.Tensor, keys: list) -> int:
        """The chunks of ``batch`` where ``take`` is set and that are not held yet (``keys``:
        one (robot, seq) per chunk; an update also replays episodes trained before);
        ``human``: an operator's. Returns how many went in."""
        h = self.config.horizon
        rows = np.arange(h)
        added = 0
        for i in torch.nonzero(take).flatten().tolist():
            if keys[i] in self._held:
                continue
            j = self._next
            self._held.discard(self._keys[j])
            self._keys[j] = keys[i]
            self._held.add(keys[i])
            for cam in self._cams:
                self._fleet[f"image_{cam}"][j] = np.rint(
                    batch.images[cam][i].numpy() * 255.0).astype(np.uint8)
            self._fleet["state"][j] = batch.state[i].numpy()
            self._fleet["tokens"][j] = batch.tokens[i].numpy()
            d = int(batch.prefix_len[i])
            executed = batch.row_mask[i].numpy() > 0
            target = batch.executed[i].numpy().copy()  # what the robot did, within bounds
            target[:d] = batch.prefix[i, :d].numpy()
            valid = executed | (rows < d)
            # the target must run from row 0 without a gap: a prefix then the executed rows
            gap = np.flatnonzero(~valid)
            end = int(gap[0]) if len(gap) else h
            valid[end:] = False
            self._fleet["target"][j], self._fleet["valid"][j] = target, valid
            self._next = (j + 1) % self.capacity
            self._n = min(self._n + 1, self.capacity)
            self.added["intervention" if bool(human[i]) else "success"] += 1
            added += 1
        return added

    # -- training --------------------------------------------------------------------------
    def sample(self, n: int, rng: np.random.Generator) -> dict:
        """``n`` samples drawn uniformly from demonstrations and fleet chunks together."""
        total = len(self)
        if total == 0:
            raise ValueError("ImitationSet.sample on an empty set")
        pick = rng.integers(0, total, n)
        demo = pick[pick < self.demonstrations]
        fleet = pick[pick >= self.demonstrations] - self.demonstrations
        return {k: np.concatenate([self._demos[k][demo], self._fleet[k][fleet]])
                for k in self._fleet}

    def loss(self, model, batch: dict, generator: torch.Generator,
             prefix_noise: float) -> torch.Tensor:
        """Pretraining's objective: a random committed prefix of d <= H/2 rows (never all the
        known rows), the mean's squared error on the known rows after it."""
        target = torch.from_numpy(batch["target"])
        prefix, d, mask = committed_prefix(target, torch.from_numpy(batch["valid"]), generator,
                                           prefix_noise, keep_one=True)
        images = {cam: torch.from_numpy(batch[f"image_{cam}"]).float() / 255.0
                  for cam in self._cams}
        mean, _, _ = model(images, torch.from_numpy(batch["state"]),
                           torch.from_numpy(batch["tokens"]), prefix, d)
        denom = mask.sum().clamp(min=1.0) * self.config.action_dim
        return (((mean - target) ** 2) * mask).sum() / denom
