"""The chunk scorer trained in the live learner, from the fleet's stored records (torch).

At publish time the trainer turns its replay window of complete episodes into ``ScorerData``
with the policy that is being published (so ``features`` and ``mean`` are what that version
will hand the scorer on the robot):

- safety label: ``chunk_labels`` over the episode's ticks, a chunk's executed span counting as
  intervened when its record says ``verifier.actions_clamped > 0`` (the recorder counts
  interventions beyond plain saturation there); failure = the episode *terminated* without
  ``success`` (a time limit is not a failure);
- advantage: the chunk's lambda-return (``advantage_lambda``; 1 = the discounted return, 0 =
  the one-step target r + gamma V', which depends most on the chunk itself) minus the value
  head's estimate in return units, with the trainer's success bonus and bootstrap, normalized;
- candidate chunk: as the robot's candidates look: the committed prefix, the executed rows at
  their offsets, and fresh draws from the policy's Gaussian elsewhere (filling those rows with
  the mean made every real candidate look unlike anything the scorer was trained on).

Cheap by design (the fleet runs on 2 cores): one no-grad pass over at most the replay window,
a few epochs of the small scorer, warm-started from the previous version's scorer.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from learner.batches import decode
from learner.ppo import episode_returns
from learner.verifier_train import (ScorerData, ScorerTrainConfig, TrainedScorer, chunk_labels,
                                    train_scorer)

log = logging.getLogger("tether.learner.verifier")


@dataclasses.dataclass(frozen=True)
class FleetScorerConfig:
    every: int = 1                 # train a scorer at every n-th publish (0: never)
    min_chunks: int = 64           # fewer usable chunks: ship the previous scorer (or none)
    min_episodes: int = 4          # episode-wise calibration split needs a few episodes
    advantage_lambda: float = 1.0  # the advantage target's lambda (module docstring)
    train: ScorerTrainConfig = ScorerTrainConfig(epochs=8)

    def __post_init__(self):
        if (self.every < 0 or self.min_chunks < 8 or self.min_episodes < 2
                or not 0 <= self.advantage_lambda <= 1):
            raise ValueError(f"FleetScorerConfig: every >= 0, min_chunks >= 8, "
                             f"min_episodes >= 2, advantage_lambda in [0, 1]: {self}")


def scorer_data(model, spec, episodes: list[list], gamma: float, lookahead: int,
                minibatch: int = 64, seed: int = 0, *, value_scale: tuple[float, float] = (0.0, 1.0),
                success_bonus: float = 0.0, lam: float = 1.0) -> ScorerData | None:
    """``episodes``: complete, usable episodes of records (sorted by seq). None if empty.
    ``value_scale``: (mean, std) of the returns the value head was trained on (it regresses
    normalized returns); ``success_bonus`` and ``lam`` as in the trainer's update."""
    flat = [r for ep in episodes for r in ep]
    if not flat:
        return None
    batch = decode(flat, spec).encoded(model)  # two passes below, one encoding
    feats, means, stds, values = [], [], [], []
    with torch.no_grad():
        for part in batch.parts(minibatch):
            mean, log_std, f = model(*part.inputs_for(model))
            _, _, v = model.policy_and_value(*part.inputs_for(model))
            feats.append(f)
            means.append(mean)
            stds.append(log_std.exp())
            values.append(v)
    mean = torch.cat(means)
    gen = torch.Generator().manual_seed(seed)
    drawn = mean + torch.cat(stds) * torch.randn(mean.shape, generator=gen)
    h = mean.shape[1]
    committed = (torch.arange(h)[None] < batch.prefix_len[:, None]).unsqueeze(-1)
    rows = batch.row_mask.unsqueeze(-1) > 0
    actions = torch.where(rows, batch.actions, torch.where(committed, batch.prefix, drawn)).numpy()
    values = torch.cat(values).double().numpy() * value_scale[1] + value_scale[0]
    safe, adv, success, episode = [], [], [], []
    i = 0
    for e, ep in enumerate(episodes):
        n = np.array([max(len(r.offsets), 1) for r in ep])
        start = np.concatenate([[0], np.cumsum(n)[:-1]])
        intervened = np.repeat([r.verifier.actions_clamped > 0 for r in ep], n)
        won = any(r.success for r in ep)
        failed = not won and any(r.terminated for r in ep)
        safe.append(chunk_labels(list(zip(start, n)), intervened, int(n.sum()), failed, lookahead))
        v = values[i:i + len(ep)]
        adv.append(np.asarray(episode_returns(ep, v, gamma, lam, success_bonus)) - v)
        success.append(np.full(len(ep), won))
        episode.append(np.full(len(ep), e, np.int64))
        i += len(ep)
    adv = np.concatenate(adv)
    adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return ScorerData(features=torch.cat(feats).numpy(), state=batch.state.numpy(),
                      mean=mean.numpy(), actions=actions.astype(np.float32),
                      safe=np.concatenate(safe), advantage=adv.astype(np.float32),
                      led_to_success=np.concatenate(success), episode=np.concatenate(episode))


def train_fleet_scorer(model, spec, episodes: list[list], gamma: float,
                       config: FleetScorerConfig = FleetScorerConfig(),
                       previous: TrainedScorer | None = None, *,
                       value_scale: tuple[float, float] = (0.0, 1.0),
                       success_bonus: float = 0.0) -> TrainedScorer | None:
    """A scorer for the policy ``model`` is about to publish, or None when the data is too
    thin (fewer than ``min_episodes`` episodes or ``min_chunks`` chunks)."""
    if len(episodes) < config.min_episodes:
        return None
    data = scorer_data(model, spec, episodes, gamma, config.train.lookahead_ticks,
                       value_scale=value_scale, success_bonus=success_bonus,
                       lam=config.advantage_lambda)
    if data is None or len(data) < config.min_chunks:
        return None
    warm = None if previous is None else previous.model
    trained = train_scorer(data, config.train, model=warm)
    log.info("fleet scorer: %d chunks from %d episodes, %.1f%% unsafe, threshold %.3f, "
             "held-out AUC %.3f%s", len(data), len(episodes),
             100 * trained.metrics["unsafe_frac"], trained.threshold,
             trained.metrics["calib_auc"],
             f" (advisory: {trained.veto_withheld})" if trained.veto_withheld else "")
    return trained
