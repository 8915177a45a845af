"""The proximal policy of decoupled PPO: the learner's own copy of the version that acted.

Robots act with version ``v`` (the behaviour policy mu; its log-probability comes in each
record). The proximal log-probability of a record must come from the learner's weights *of that
same version*: then ``prox / mu`` measures only robot/learner numerical drift (ONNX vs torch,
a quantized engine), and ``pi / prox`` only what the learner changed. So the learner keeps:

- **snapshots** of the last ``keep`` versions' weights in memory (LRU), loaded from the
  registry's per-version checkpoints on a miss (exact);
- an **EWMA of the learner's weights** (PPO-EWMA, updated after every optimizer step), used
  as the proximal policy only when a version's snapshot is gone (no checkpoint on disk).

Which records got an exact proximal is returned with the log-probabilities, so the trainer can
report robot/learner discrepancy (exact records only) apart from staleness.
"""
from __future__ import annotations

import collections
import logging

import torch

from learner.batches import Batch
from learner.model import ReferenceVLA, VLAConfig, gaussian_log_prob

log = logging.getLogger("tether.learner.proximal")


def batch_log_probs(model: ReferenceVLA, batch: Batch, minibatch: int) -> torch.Tensor:
    """[B] float64 log-probabilities of the executed rows under ``model`` (no grad)."""
    out = []
    with torch.no_grad():
        for part in batch.parts(minibatch):
            mean, log_std, _ = model(*part.inputs_for(model))
            out.append(gaussian_log_prob(mean, log_std, part.actions, part.row_mask,
                                         model.config.row_correlation))
    return torch.cat(out).double() if out else torch.zeros(0, dtype=torch.float64)


class ProximalPolicies:
    """Snapshots of recent versions plus the EWMA fallback. Not thread-safe: the trainer's
    thread owns it."""

    def __init__(self, config: VLAConfig, load_checkpoint, *, keep: int = 8,
                 ewma_decay: float = 0.95):
        """``load_checkpoint(v)`` returns a registry checkpoint dict ({"model": ...}) or None."""
        if keep < 1:
            raise ValueError(f"ProximalPolicies keep must be >= 1 (TrainerConfig.snapshots), got {keep}")
        if not 0.0 <= ewma_decay < 1.0:
            raise ValueError(f"ewma_decay must be in [0, 1) (TrainerConfig.ewma_decay), got {ewma_decay}")
        self.config = config
        self.keep = keep
        self.ewma_decay = ewma_decay
        self._load_checkpoint = load_checkpoint
        self._snapshots: collections.OrderedDict[int, ReferenceVLA] = collections.OrderedDict()
        self._missing: set[int] = set()  # versions known to have no checkpoint
        self.ewma: ReferenceVLA | None = None
        self.loads = 0  # snapshots read back from the registry (LRU misses)

    # -- snapshots -------------------------------------------------------------------------
    def _model(self, state: dict) -> ReferenceVLA:
        model = ReferenceVLA(self.config)
        model.load_state_dict(state)
        return model.eval().requires_grad_(False)

    def put(self, version: int, state: dict) -> None:
        """Remember ``state`` as the weights of ``version`` (at publish: no disk read later)."""
        self._snapshots[int(version)] = self._model(state)
        self._snapshots.move_to_end(int(version))
        self._missing.discard(int(version))
        while len(self._snapshots) > self.keep:
            self._snapshots.popitem(last=False)

    def snapshot(self, version: int) -> ReferenceVLA | None:
        """The exact weights of ``version``, or None if they are gone."""
        v = int(version)
        if v in self._snapshots:
            self._snapshots.move_to_end(v)
            return self._snapshots[v]
        if v in self._missing or v <= 0:
            return None
        ckpt = self._load_checkpoint(v)
        if ckpt is None or ckpt.get("model") is None:
            self._missing.add(v)
            log.warning("no checkpoint for version %d: its records use the EWMA proximal policy", v)
            return None
        self.loads += 1
        self.put(v, ckpt["model"])
        return self._snapshots[v]

    def versions(self) -> list[int]:
        return list(self._snapshots)

    # -- EWMA --------------------------------------------------------------------------------
    def reset_ewma(self, model: ReferenceVLA, state: dict | None = None) -> None:
        """Start the EWMA at ``model``'s weights (or at a checkpointed EWMA ``state``)."""
        self.ewma = self._model(state if state is not None else model.state_dict())

    def update_ewma(self, model: ReferenceVLA) -> None:
        """ewma <- decay * ewma + (1 - decay) * model; after every optimizer step."""
        if self.ewma is None:
            self.reset_ewma(model)
            return
        with torch.no_grad():
            for e, p in zip(self.ewma.state_dict().values(), model.state_dict().values()):
                if e.is_floating_point():
                    e.mul_(self.ewma_decay).add_(p.detach(), alpha=1.0 - self.ewma_decay)
                else:
                    e.copy_(p)

    def ewma_state(self) -> dict:
        return {k: t.detach().clone() for k, t in self.ewma.state_dict().items()}

    # -- log-probabilities -------------------------------------------------------------------
    def log_probs(self, batch: Batch, minibatch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(logp [B] float64, exact [B] bool): each record under its own version's snapshot,
        or under the EWMA policy (exact False) when that snapshot is gone."""
        logp = torch.zeros(len(batch), dtype=torch.float64)
        exact = torch.zeros(len(batch), dtype=torch.bool)
        for v in torch.unique(batch.policy_version).tolist():
            idx = torch.nonzero(batch.policy_version == v).squeeze(1)
            model = self.snapshot(v)
            if model is None:
                if self.ewma is None:
                    raise RuntimeError("the EWMA proximal policy is not initialized; call "
                                       "reset_ewma(model) first")
                model = self.ewma
            else:
                exact[idx] = True
            logp[idx] = batch_log_probs(model, batch.select(idx), minibatch)
        return logp, exact
