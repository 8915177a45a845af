"""The asynchronous trainer: fleet experience in, new policy versions out.

Off-policy correction follows decoupled PPO. Three policies are kept apart: the behaviour policy
mu (what ran on the robot; its log-probability is in each record), the proximal policy (the
learner's weights at the start of an update, whose log-probabilities are computed exactly before
any step) and the current policy pi. Per chunk:

    w = prox / mu            behaviour importance weight; chunks with w > max_is_ratio are masked
    r = pi / prox            clipped to [1 - clip, 1 + clip] as in PPO
    loss_pg = -w * min(r A, clip(r) A)        (so w r = pi / mu, the "ratio" that is logged)

Advantages are chunk-level discounted returns minus the value head's estimate, normalized per
update; the value head regresses the (running-normalized) returns. Successful episodes and human
interventions also train through an imitation term (Gaussian NLL of the executed rows). The step
size is scaled by the effective sample size of w (VCPO): stale, off-policy data moves less.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

import numpy as np
import torch

from learner.batches import Batch, DecodeSpec, check_record, decode
from learner.export import config_from_manifest
from learner.model import ReferenceVLA, gaussian_log_prob
from learner.registry import Registry
from learner.store import ExperienceStore
from learner.verifier_fleet_train import FleetScorerConfig, train_fleet_scorer
from tether.wire import tether_pb2 as pb

log = logging.getLogger("tether.learner.trainer")


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    gamma: float = 0.9              # discount per chunk (not per tick)
    lr: float = 1e-4                # Adam; keeps the clip fraction near 0.1 on 16-dim chunks
    clip: float = 0.2
    max_is_ratio: float = 2.0       # behaviour weights prox/mu above this are masked out
    value_coef: float = 0.5
    bc_coef: float = 0.5            # imitation on successful episodes and human interventions
    epochs: int = 2
    minibatch: int = 64
    grad_clip: float = 1.0
    max_staleness: int = 8          # versions; older behaviour data is dropped (0 = on-policy)
    replay_episodes: int = 32       # bounded window of recent complete episodes
    replay_sample: int = 4          # old episodes mixed into each update
    min_new_episodes: int = 2       # publish after this many new complete episodes ...
    publish_interval_s: float = 25.0  # ... and at least this long after the last publish
    poll_s: float = 0.5
    read_limit: int = 512
    max_pending_records: int = 50_000  # incomplete episodes held; oldest dropped beyond this
    ess_scaled_lr: bool = True
    # the verifier scorer shipped with each version; off by default: a scorer trained on the
    # first few episodes vetoes most candidates and stalls robots (fleet e2e); opt in with every=1
    verifier: FleetScorerConfig = FleetScorerConfig(every=0)
    seed: int = 0

    def __post_init__(self):
        checks = {"gamma": 0 <= self.gamma <= 1, "lr": self.lr > 0, "clip": 0 < self.clip < 1,
                  "max_is_ratio": self.max_is_ratio >= 1, "epochs": self.epochs >= 1,
                  "minibatch": self.minibatch >= 1, "max_staleness": self.max_staleness >= 0,
                  "replay_episodes": self.replay_episodes >= 1, "replay_sample": self.replay_sample >= 0,
                  "min_new_episodes": self.min_new_episodes >= 1,
                  "publish_interval_s": self.publish_interval_s >= 0, "poll_s": self.poll_s > 0,
                  "read_limit": self.read_limit >= 1, "value_coef": self.value_coef >= 0,
                  "bc_coef": self.bc_coef >= 0, "max_pending_records": self.max_pending_records >= 1}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainerConfig: invalid {', '.join(f'{k}={getattr(self, k)!r}' for k in bad)}")


def policy_and_value(model: ReferenceVLA, batch: Batch):
    """(mean, log_std, value) for a decoded batch, from one trunk pass."""
    return model.policy_and_value(*batch.inputs())


def group_episodes(records: list[pb.ChunkRecord]) -> list[list[pb.ChunkRecord]]:
    """Records grouped by (robot, episode), each sorted by seq, in first-seen order."""
    groups: dict[tuple[str, str], list] = {}
    for r in records:
        groups.setdefault((r.robot_id, r.episode_id), []).append(r)
    return [sorted(g, key=lambda r: r.seq) for g in groups.values()]


class Trainer:
    def __init__(self, store: ExperienceStore, registry: Registry,
                 config: TrainerConfig = TrainerConfig()):
        self.store, self.registry, self.config = store, registry, config
        self.version = registry.latest()
        if self.version == 0:
            raise RuntimeError("the registry is empty; import the pretrained artifact first "
                               "(Registry.import_initial / --init-artifact)")
        ckpt = registry.load_checkpoint(self.version)
        if ckpt is None:
            raise RuntimeError(f"version {self.version} has no torch checkpoint, so there are no "
                               f"weights to train; pass --init-checkpoint (pretrain's model.pt)")
        torch.manual_seed(config.seed)
        manifest = registry.manifest(self.version)
        self.spec = DecodeSpec.from_manifest(manifest, config_from_manifest(manifest))
        self.model = ReferenceVLA(self.spec.config)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        if ckpt.get("optimizer"):
            self.optimizer.load_state_dict(ckpt["optimizer"])
        self._gen = torch.Generator().manual_seed(config.seed)
        self._rng = np.random.default_rng(config.seed)
        self._ret_mean, self._ret_std = 0.0, 1.0
        self._ret_seen = False
        self._cursor = 0
        self._pending: collections.OrderedDict = collections.OrderedDict()
        self._pending_records = 0
        self._ready: list[list[pb.ChunkRecord]] = []
        self._replay: collections.deque = collections.deque(maxlen=config.replay_episodes)
        self._new_since_publish = 0
        self._last_publish = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.train_steps = 0
        self.versions_published = 0
        self.last_metrics: dict = {}
        self.error: BaseException | None = None
        self._scorer = None  # the last trained verifier scorer (learner.verifier_train)
        # called with the model between backward() and the optimizer step (learner.distributed)
        self.after_backward = None

    # -- background loop ---------------------------------------------------------------------
    def start(self) -> None:
        torch.set_num_threads(1)  # the learner shares its cores with the gRPC pool (and sim robots)
        self._thread = threading.Thread(target=self._run, name="trainer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.step():
                    self._stop.wait(self.config.poll_s)
        except BaseException as e:  # surfaced via .error / stats; the service keeps ingesting
            self.error = e
            log.exception("trainer stopped")

    def step(self) -> bool:
        """Poll the store once, train on newly completed episodes, publish if due.

        Returns whether anything was done (the loop sleeps otherwise)."""
        got = self.poll()
        trained = False
        if self._ready:
            new, self._ready = self._ready, []
            k = min(self.config.replay_sample, len(self._replay))
            old = [self._replay[i] for i in self._rng.choice(len(self._replay), k, replace=False)] if k else []
            self.train_on([r for ep in new + old for r in ep])
            self._replay.extend(new)
            self._new_since_publish += len(new)
            trained = True
        self.maybe_publish()
        return got > 0 or trained

    def poll(self) -> int:
        """Read new records in insertion order; complete episodes move to the ready list."""
        rows = self.store.read(self._cursor, self.config.read_limit)
        for rowid, r in rows:
            self._cursor = rowid
            key = (r.robot_id, r.episode_id)
            self._pending.setdefault(key, []).append(r)
            self._pending_records += 1
            if r.terminated or r.truncated:
                episode = self._pending.pop(key)
                self._pending_records -= len(episode)
                self._ready.append(sorted(episode, key=lambda x: x.seq))
        while self._pending_records > self.config.max_pending_records:
            key, dropped = self._pending.popitem(last=False)
            self._pending_records -= len(dropped)
            log.warning("dropped incomplete episode %s (%d records): pending limit", key, len(dropped))
        return len(rows)

    def maybe_publish(self, now: float | None = None):
        c = self.config
        now = time.monotonic() if now is None else now
        if self._new_since_publish < c.min_new_episodes or now - self._last_publish < c.publish_interval_s:
            return None
        return self.publish(now)

    def publish(self, now: float | None = None):
        manifest = self.registry.publish(self.model, optimizer_state=self.optimizer.state_dict(),
                                         verifier=self._train_verifier())
        self.version = manifest.version
        self.versions_published += 1
        self._new_since_publish = 0
        self._last_publish = time.monotonic() if now is None else now
        log.info("published version %d (%d train steps)", self.version, self.train_steps)
        return manifest

    def _train_verifier(self):
        """The chunk scorer to ship with the version being published: retrained on the replay
        window every ``verifier.every`` publishes; else (or with too little data) the last one."""
        c = self.config.verifier
        if c.every == 0:
            return None
        if self.versions_published % c.every == 0:
            flat, ep_index, _, _, _ = self._select([r for ep in self._replay for r in ep])
            episodes = [[flat[i] for i in np.nonzero(ep_index == e)[0]] for e in np.unique(ep_index)]
            try:
                trained = train_fleet_scorer(self.model, self.spec, episodes, self.config.gamma,
                                             c, previous=self._scorer)
            except ValueError as e:  # a scorer is optional: publish the policy regardless
                log.warning("verifier scorer not retrained for this version: %s", e)
                trained = None
            self._scorer = trained or self._scorer
        return self._scorer

    # -- one update ----------------------------------------------------------------------------
    def _select(self, records: list[pb.ChunkRecord]):
        """Episodes -> (flat records, returns-index data); drops stale and unusable records."""
        c = self.config
        flat, ep_index, successful = [], [], []
        stale = skipped = 0
        for episode in group_episodes(records):
            keep = []
            for r in episode:
                why = check_record(r, self.spec)
                if why is not None:
                    skipped += 1
                    log.debug("skipping %s/%s seq %d: %s", r.robot_id, r.episode_id, r.seq, why)
                elif self.version - r.policy_version > c.max_staleness:
                    stale += 1
                else:
                    keep.append(r)
            if not keep or len(keep) != len(episode):
                # a gap would corrupt the returns of every earlier chunk: use whole episodes only
                continue
            success = any(r.success for r in episode)
            for r in keep:
                flat.append(r)
                ep_index.append(len(successful))
            successful.append(success)
        return flat, np.asarray(ep_index, np.int64), successful, stale, skipped

    def _returns(self, flat, ep_index, values_raw: np.ndarray) -> np.ndarray:
        """Discounted chunk-level returns; an episode not ending in `terminated` bootstraps."""
        g = self.config.gamma
        out = np.zeros(len(flat), np.float64)
        for e in np.unique(ep_index):
            idx = np.nonzero(ep_index == e)[0]
            last = flat[idx[-1]]
            acc = 0.0 if last.terminated else float(values_raw[idx[-1]])
            for i in idx[::-1]:
                acc = flat[i].reward + g * acc
                out[i] = acc
        return out

    def _forward_all(self, batch: Batch):
        mb = self.config.minibatch
        logps, values = [], []
        with torch.no_grad():
            for s in range(0, len(batch), mb):
                part = batch.select(torch.arange(s, min(s + mb, len(batch))))
                mean, log_std, v = policy_and_value(self.model, part)
                logps.append(gaussian_log_prob(mean, log_std, part.actions, part.row_mask))
                values.append(v)
        return torch.cat(logps).double(), torch.cat(values).double()

    def train_on(self, records: list[pb.ChunkRecord]) -> dict:
        """One update on the given episodes' records; returns the metrics it logged."""
        c = self.config
        flat, ep_index, successful, stale, skipped = self._select(records)
        if not flat:
            return {"records": 0, "stale_dropped": stale, "skipped": skipped}
        self.model.train()
        batch = decode(flat, self.spec)
        logp_prox, values_n = self._forward_all(batch)
        values_raw = values_n.numpy() * self._ret_std + self._ret_mean
        returns = self._returns(flat, ep_index, values_raw)
        self._update_return_stats(returns)
        returns_n = torch.from_numpy((returns - self._ret_mean) / self._ret_std)
        values_n = torch.from_numpy((values_raw - self._ret_mean) / self._ret_std)  # new scale
        adv = returns_n - values_n
        adv = (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8) if len(adv) > 1 else adv * 0
        w = torch.exp(logp_prox - batch.behaviour_log_prob)
        valid = w <= c.max_is_ratio
        wv = w[valid]
        ess = float(wv.sum() ** 2 / (len(w) * (wv ** 2).sum())) if valid.any() else 0.0
        for group in self.optimizer.param_groups:
            group["lr"] = c.lr * (ess if c.ess_scaled_lr else 1.0)
        imitate = torch.tensor([successful[e] or r.human_intervention
                                for e, r in zip(ep_index, flat)], dtype=torch.bool)
        rows = batch.row_mask.sum(-1).clamp(min=1.0)
        sums = collections.defaultdict(float)
        steps = 0
        for _ in range(c.epochs):
            perm = torch.randperm(len(batch), generator=self._gen)
            for s in range(0, len(batch), c.minibatch):
                idx = perm[s:s + c.minibatch]
                part = batch.select(idx)
                mean, log_std, v = policy_and_value(self.model, part)
                logp = gaussian_log_prob(mean, log_std, part.actions, part.row_mask)
                r = torch.exp(logp.double() - logp_prox[idx])
                a, m, wi = adv[idx], valid[idx].double(), torch.where(valid[idx], w[idx], 0.0)
                surrogate = torch.min(r * a, r.clamp(1 - c.clip, 1 + c.clip) * a)
                pg = -(wi * surrogate * m).sum() / m.sum().clamp(min=1.0)
                value_loss = torch.nn.functional.mse_loss(v.double(), returns_n[idx])
                im = imitate[idx]
                bc = -(logp / rows[idx])[im].mean() if im.any() else logp.sum() * 0
                loss = pg + c.value_coef * value_loss + c.bc_coef * bc
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.after_backward is not None:  # data-parallel: average the gradients
                    self.after_backward(self.model)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                steps += 1
                self.train_steps += 1
                sums["loss_pg"] += pg.item()
                sums["loss_value"] += value_loss.item()
                sums["loss_bc"] += bc.item()
                sums["ratio_mean"] += float(torch.exp(logp.detach().double() - part.behaviour_log_prob).mean())
                sums["clip_frac"] += float(((r.detach() - 1).abs() > c.clip).double().mul(m).sum() / m.sum().clamp(min=1))
        metrics = {k: v / steps for k, v in sums.items()}
        metrics.update(
            records=len(flat), episodes=len(successful), steps=steps, stale_dropped=stale,
            skipped=skipped, ratio_start=float(w.mean()), masked_frac=float(1 - valid.double().mean()),
            ess=ess, staleness=float((self.version - batch.policy_version).double().mean()),
            success_episodes=int(sum(successful)), return_mean=float(returns.mean()),
            version=self.version)
        self.last_metrics = metrics
        log.info("update v%d: %d records/%d episodes, pg %.4f value %.4f bc %.4f, ratio start %.4f "
                 "mean %.4f, clip %.3f, masked %.3f, ess %.3f, staleness %.2f", self.version,
                 len(flat), len(successful), metrics["loss_pg"], metrics["loss_value"],
                 metrics["loss_bc"], metrics["ratio_start"], metrics["ratio_mean"],
                 metrics["clip_frac"], metrics["masked_frac"], ess, metrics["staleness"])
        return metrics

    def _update_return_stats(self, returns: np.ndarray) -> None:
        """Running mean/std of returns: the value head regresses normalized returns."""
        mean, std = float(returns.mean()), float(max(returns.std(), 1e-3))
        if not self._ret_seen:
            self._ret_mean, self._ret_std, self._ret_seen = mean, std, True
        else:
            self._ret_mean = 0.9 * self._ret_mean + 0.1 * mean
            self._ret_std = max(0.9 * self._ret_std + 0.1 * std, 1e-3)
