"""One update of the trainer (``learner.trainer.Trainer``): advantages, the decoupled-PPO
epochs, the imitation steps and the per-update diagnostics.

``UpdateStep`` is a mixin: it works on the trainer's model, optimizers, proximal policies,
imitation set and random streams, which ``Trainer.__init__`` sets up; the trainer decides when
to update and what happens around it (gating, publishing, checkpoints).
"""
from __future__ import annotations

import collections
import logging
import time

import numpy as np
import torch

from learner import ppo
from learner.batches import decode
from learner.episodes import usable_episodes
from learner.model import gaussian_log_prob
from learner.proximal import batch_log_probs
from tether.wire import tether_pb2 as pb

log = logging.getLogger("tether.learner.trainer")

DROPPED = ("stale", "unusable", "masked", "incomplete")


def _counts(dropped: collections.Counter) -> dict:
    """Records dropped, by why: too stale, unusable (a gap or a shape the model cannot take),
    behaviour weight masked (kept for value and imitation only), incomplete (pending limit)."""
    return {k: int(dropped[k]) for k in DROPPED}


def record_keys(records) -> list[tuple[str, int]]:
    """(robot, seq) of each record: what the imitation set deduplicates by."""
    return [(r.robot_id, r.seq) for r in records]


class UpdateStep:
    """The trainer's update step (see the module docstring)."""

    def _returns(self, episodes, values_raw: np.ndarray) -> np.ndarray:
        """Chunk-level lambda-returns (GAE's value targets; lambda 1: discounted returns), the
        success bonus on the chunk that succeeded; an episode that did not end in
        ``terminated`` bootstraps from the value estimate of its last chunk."""
        c, out, at = self.config, [], 0
        for ep in episodes:
            out += ppo.episode_returns(ep, values_raw[at:at + len(ep)], c.gamma, c.gae_lambda,
                                       c.success_bonus)
            at += len(ep)
        return np.asarray(out, np.float64)

    def _values(self, batch) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([self.model.policy_and_value(*part.inputs_for(self.model))[2]
                              for part in batch.parts(self.config.minibatch)]).double()

    def _anchor_means(self, batch) -> torch.Tensor | None:
        """The anchor policy's means on the batch ([N, H, A]), or None without an anchor."""
        if self.anchor is None:
            return None
        with torch.no_grad():
            return torch.cat([self.anchor(*part.inputs_for(self.anchor))[0]
                              for part in batch.parts(self.config.minibatch)])

    def train_on(self, records: list[pb.ChunkRecord]) -> dict:
        """One update on the given episodes' records; returns (and logs) its metrics."""
        c = self.config
        t0 = time.monotonic()
        episodes, dropped = usable_episodes(records, self.spec, self.version, c.staleness)
        dropped.update(self._dropped)
        self._dropped.clear()
        flat = [r for ep in episodes for r in ep]
        if not flat:
            return self._log({"version": self.version, "records": 0, "dropped": _counts(dropped)})
        self.model.train()
        batch = decode(flat, self.spec)
        if not any(p.requires_grad for p in self.model.encoders.parameters()):
            batch = batch.encoded(self.model)  # frozen: encode once, not on each of ~8 passes
        logp_prox, exact = self.proximal.log_probs(batch, c.minibatch)
        values_raw = self._values(batch).numpy() * self._ret_std + self._ret_mean
        returns = self._returns(episodes, values_raw)
        self._update_return_stats(returns)
        returns_n = torch.from_numpy((returns - self._ret_mean) / self._ret_std)
        values_n = torch.from_numpy((values_raw - self._ret_mean) / self._ret_std)
        adv = ppo.normalize(returns_n - values_n, [r.task for r in flat])
        w, valid = ppo.behaviour_weights(logp_prox, batch.behaviour_log_prob, c.max_is_ratio)
        # an operator's rows (human interventions) were not sampled from any policy: they train
        # the imitation and value terms only, and do not count in the behaviour weights' ESS
        imitate, human = self._imitated(episodes)
        own = ~human
        valid = valid & own
        ess = ppo.effective_sample_size(w[own], valid[own]) if bool(own.any()) else 1.0
        for group, base, scaled in zip(self.optimizer.param_groups, self._base_lr,
                                       (True, True, False)):
            group["lr"] = base * (ess if c.ess_scaled_lr and scaled else 1.0)
        successful = [any(r.success for r in ep) for ep in episodes]
        rows = batch.row_mask.sum(-1).clamp(min=1.0)
        anchor_means = self._anchor_means(batch)
        sums = collections.defaultdict(float)
        steps = 0
        for _ in range(c.epochs):
            perm = torch.randperm(len(batch), generator=self._gen)
            for s in range(0, len(batch), c.minibatch):
                idx = perm[s:s + c.minibatch]
                part = batch.select(idx)
                mean, log_std, v = self.model.policy_and_value(*part.inputs_for(self.model),
                                                               detach_value=c.detach_value)
                logp = gaussian_log_prob(mean, log_std, part.actions, part.row_mask,
                                         self.model.config.row_correlation)
                pg, r, clip_frac = ppo.surrogate_loss(logp, logp_prox[idx], adv[idx], w[idx],
                                                      valid[idx], c.clip,
                                                      rows[idx] if c.row_ratio else None)
                value_loss = torch.nn.functional.mse_loss(v.double(), returns_n[idx])
                bc = ppo.imitation_loss(logp, rows[idx], imitate[idx])
                loss = c.pg_coef * pg + c.value_coef * value_loss + c.bc_coef * bc
                if anchor_means is not None:
                    anchor = ppo.anchor_kl(mean, anchor_means[idx], log_std.detach(),
                                           part.row_mask)
                    loss = loss + c.anchor_coef * anchor
                    sums["loss_anchor"] += anchor.item()
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.after_backward is not None:  # data-parallel: average the gradients
                    self.after_backward(self.model)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                self.proximal.update_ewma(self.model)
                steps += 1
                self.train_steps += 1
                sums["loss_pg"] += pg.item()
                sums["loss_value"] += value_loss.item()
                sums["loss_bc"] += bc.item()
                sums["ratio_mean"] += float((r * w[idx]).mean())
                sums["clip_frac"] += clip_frac
        metrics = {k: v / steps for k, v in sums.items()}
        if self.imitation is not None:
            self.imitation.add(batch, imitate, human, record_keys(flat))
            metrics.update(self._imitate())
        metrics.update(self._diagnostics(batch, logp_prox, exact & own, w, valid, dropped, own))
        metrics.update(
            version=self.version, records=len(flat), episodes=len(episodes), steps=steps,
            lr=self.optimizer.param_groups[0]["lr"], ess=ess, success_episodes=sum(successful),
            imitate_frac=float(imitate.double().mean()), return_mean=float(returns.mean()),
            human_records=int(human.sum()),
            seconds=round(time.monotonic() - t0, 3))
        m = metrics
        log.info("update v%d: %d records/%d episodes (%d successful), pg %.4f value %.4f bc %.4f, "
                 "clip %.3f, masked %.3f, ess %.3f, kl %.4f/%.4f, staleness %s, exact %.2f, "
                 "gap %.4f, log_std %.3f", self.version, len(flat), len(episodes),
                 m["success_episodes"], m["loss_pg"], m["loss_value"], m["loss_bc"],
                 m["clip_frac"], m["masked_frac"], ess, m["kl_behaviour"], m["kl_update"],
                 m["staleness_hist"], m["proximal_exact_frac"], m["logp_gap_mean"], m["log_std"])
        return self._log(metrics)

    @staticmethod
    def _imitated(episodes) -> tuple[torch.Tensor, torch.Tensor]:
        """Per record: imitate it? is it an operator's? The policy's own chunks are imitated
        when its episode succeeded on its own: an episode an operator rescued succeeded because
        of the operator, after the policy had stalled."""
        human = torch.tensor([r.human_intervention for ep in episodes for r in ep],
                             dtype=torch.bool)
        own_success = [any(r.success for r in ep) and not any(r.human_intervention for r in ep)
                       for ep in episodes]
        imitate = torch.tensor([ok for ok, ep in zip(own_success, episodes) for _ in ep],
                               dtype=torch.bool) | human
        return imitate, human

    def _imitate(self) -> dict:
        """``imitation_steps`` steps of the imitation optimizer on the aggregated set."""
        c, data = self.config, self.imitation
        if len(data) == 0 and self.after_backward is None:
            return {"imitation_set": 0}
        total = 0.0
        for _ in range(c.imitation_steps):
            if len(data):
                loss = data.loss(self.model, data.sample(c.imitation_batch, self._rng),
                                 self._gen, c.imitation_prefix_noise)
            else:  # data-parallel, nothing here yet: a zero step keeps this rank in step
                loss = sum(p.sum() for p in self.model.parameters()) * 0.0
            self.imitation_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.after_backward is not None:
                self.after_backward(self.model)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
            self.imitation_optimizer.step()
            self.proximal.update_ewma(self.model)
            self.imitation_steps += 1
            total += loss.item()
        return {"loss_imitation": total / max(1, c.imitation_steps), "imitation_set": len(data),
                "imitation_fleet": data.fleet, "imitation_added": dict(data.added)}

    def _diagnostics(self, batch, logp_prox, exact, w, valid, dropped, own) -> dict:
        """Behaviour KL, update KL, staleness and robot/learner discrepancy of one update
        (``own``: the policy's records; an operator's have no behaviour probability)."""
        logp_new = batch_log_probs(self.model, batch, self.config.minibatch)
        gap = (batch.behaviour_log_prob - logp_prox).abs()[exact]
        behind = (self.version - batch.policy_version).tolist()
        masked = ~valid & own
        dropped["masked"] += int(masked.sum())
        n_own = max(1, int(own.sum()))
        return dict(
            ratio_start=float(w[own].mean()) if bool(own.any()) else 1.0,
            masked_frac=float(masked.sum()) / n_own,
            kl_behaviour=ppo.k3_kl(batch.behaviour_log_prob[own], logp_prox[own]),
            kl_update=ppo.k3_kl(logp_prox, logp_new, torch.where(valid, w, torch.zeros_like(w))),
            proximal_exact_frac=float(exact.double().mean()),
            logp_gap_mean=float(gap.mean()) if len(gap) else 0.0,
            logp_gap_max=float(gap.max()) if len(gap) else 0.0,
            masked_by_gap_frac=float((masked & exact).sum()) / n_own,
            staleness=float(np.mean(behind)),
            staleness_hist={str(k): n for k, n in sorted(collections.Counter(behind).items())},
            dropped=_counts(dropped), log_std=float(self.model.log_std.detach().mean()))

    def _update_return_stats(self, returns: np.ndarray) -> None:
        """Running mean/std of returns: the value head regresses normalized returns."""
        mean, std = float(returns.mean()), float(max(returns.std(), 1e-3))
        if not self._ret_seen:
            self._ret_mean, self._ret_std, self._ret_seen = mean, std, True
        else:
            self._ret_mean = 0.9 * self._ret_mean + 0.1 * mean
            self._ret_std = max(0.9 * self._ret_std + 0.1 * std, 1e-3)
