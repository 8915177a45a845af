"""The asynchronous trainer: fleet experience in, new policy versions out.

Off-policy correction is decoupled PPO (``learner.ppo``) with the three policies kept apart:
behaviour mu (the robot's log-probability, in each record), proximal (the learner's snapshot of
the record's own version, EWMA of weights as the fallback; ``learner.proximal``) and current pi.
Advantages are chunk-level GAE (lambda-returns, with a success bonus, minus the value head's
estimate), normalized per task within an update; the value head, at a step size of its own,
regresses the running-normalized lambda-returns. Successful episodes and human interventions also train through an imitation term
(Gaussian NLL of the executed rows). The step size is scaled by the effective sample size of
the behaviour weights (VCPO).

One staleness parameter S (``TrainerConfig.staleness``). When the trainer starts an update that
will become version v+1 it gates the fleet at ``min_version = v + 1 - S`` (robots do not start
an episode on an older version) and drops data more than S versions behind. S = 0 is
synchronous on-policy: the trainer collects ``min_new_episodes`` episodes of version v, closes
the gate, waits (at most ``sync_wait_s``) for episodes still running on v, trains and publishes
at once. S > 0 trains whenever ``update_episodes`` new episodes are ready and publishes every
``publish_interval_s``.

Every publish checkpoints model, optimizer, RNGs, return statistics, the EWMA weights and the
store position (``learner.episodes``); a new Trainer on the same registry resumes from there.
One JSON line per update goes to ``log_path`` (``DATA/updates.jsonl`` in ``tether learner``).
The update itself (advantages, PPO epochs, imitation, diagnostics) is ``learner.update``.
The number of optimizer steps of an update depends only on its number of records (epochs x
minibatches), so data-parallel ranks with equal shards stay in lockstep (``after_backward``).
"""
from __future__ import annotations

import collections
import copy
import json
import logging
import pathlib
import threading
import time
import zipfile

import numpy as np
import torch

from learner.batches import DecodeSpec, decode
from learner.demos import DemoSet
from learner.episodes import Episode, EpisodeFeed, group_episodes, usable_episodes
from learner.imitation import ImitationSet
from learner.export import config_from_manifest
from learner.model import ReferenceVLA
from learner.proximal import ProximalPolicies
from learner.registry import Registry
from learner.store import ExperienceStore
from learner.trainer_config import TrainerConfig
from learner.trainer_state import pack_state, unpack_rng
from learner.update import UpdateStep, record_keys
from learner.verifier_fleet_train import train_fleet_scorer

__all__ = ["Trainer", "TrainerConfig"]

log = logging.getLogger("tether.learner.trainer")


class Trainer(UpdateStep):
    def __init__(self, store: ExperienceStore, registry: Registry,
                 config: TrainerConfig = TrainerConfig(), *, log_path=None,
                 demos: DemoSet | None = None):
        """``demos``: the demonstrations the policy was cloned from, imitated alongside the
        fleet's data (learner/imitation.py; ``imitation_steps`` 0, the default, or
        ``imitation_lr`` 0 turns that off); default: read from ``config.demos``."""
        self.store, self.registry, self.config = store, registry, config
        self.log_path = pathlib.Path(log_path) if log_path else None
        self.version = registry.latest()
        if self.version == 0:
            raise RuntimeError("the registry is empty; import the pretrained artifact first "
                               "(Registry.import_initial / --init-artifact)")
        keep = getattr(registry, "keep_versions", 0)
        if 0 < keep <= config.staleness:
            log.warning("the registry keeps the newest %d versions and staleness %d trains on "
                        "data up to %d versions old: data older than the kept checkpoints gets "
                        "the EWMA proximal policy, not its version's (--keep-versions %d keeps "
                        "them all)", keep, config.staleness, config.staleness, config.staleness + 1)
        ckpt = registry.load_checkpoint(self.version)
        if ckpt is None:
            raise RuntimeError(f"version {self.version} has no torch checkpoint, so there are no "
                               f"weights to train; pass --init-checkpoint (pretrain's model.pt)")
        torch.manual_seed(config.seed)
        manifest = registry.manifest(self.version)
        self.spec = DecodeSpec.from_manifest(manifest, config_from_manifest(manifest))
        self.model = ReferenceVLA(self.spec.config)
        self.model.load_state_dict(ckpt["model"])
        self.anchor: ReferenceVLA | None = None
        if config.anchor_coef > 0:
            self.anchor = copy.deepcopy(self.model).eval().requires_grad_(False)
        if config.explore_log_std is not None and not ckpt.get("optimizer"):
            with torch.no_grad():
                self.model.log_std.clamp_(min=config.explore_log_std)
        # the exploration noise (one global log_std per chunk row and action dim) has its own
        # step size: its gradient sums over every chunk, far less noisy than the network's. So
        # has the value head: it starts untrained (pretraining has no returns) and must track
        # the returns within a few updates to be a baseline at all, at a step size that would
        # wreck the policy
        value = list(self.model.value_head.parameters())
        skip = {id(p) for p in value} | {id(self.model.log_std)}
        skip |= {id(p) for p in _freeze(self.model, config.frozen)}
        rest = [p for p in self.model.parameters() if id(p) not in skip]
        self._base_lr = (config.lr, config.log_std_lr, config.value_lr)
        self.optimizer = torch.optim.Adam([{"params": rest}, {"params": [self.model.log_std]},
                                           {"params": value}], lr=config.lr)
        if ckpt.get("optimizer"):
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as e:  # written by a trainer with other parameter groups
                log.warning("version %d's optimizer state does not fit (%s); starting Adam afresh",
                            self.version, e)
        self.imitation: ImitationSet | None = None
        self.imitation_optimizer: torch.optim.Optimizer | None = None
        if config.imitation_lr > 0 and config.imitation_steps > 0:
            self.imitation = ImitationSet(self.spec.config, config.imitation_capacity)
            if demos is None and config.demos:
                try:
                    demos = DemoSet.load(config.demos)
                except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
                    raise RuntimeError(f"demonstrations {config.demos} cannot be read: {e}; "
                                       f"run `tether pretrain` or leave them out") from None
            if demos is not None:
                self.imitation.add_demos(demos, self.spec)
                log.info("imitation set: %d demonstration ticks from %s", len(demos),
                         config.demos or "the caller")
            self.imitation_optimizer = torch.optim.Adam(rest, lr=config.imitation_lr)
        self.proximal = ProximalPolicies(self.spec.config, registry.load_checkpoint,
                                         keep=config.snapshots, ewma_decay=config.ewma_decay)
        self.proximal.put(self.version, ckpt["model"])
        self._gen = torch.Generator().manual_seed(config.seed)
        self._rng = np.random.default_rng(config.seed)
        self._ret_mean, self._ret_std, self._ret_seen = 0.0, 1.0, False
        self.feed = EpisodeFeed(store, config.read_limit, config.max_pending_records)
        self._ready: list[Episode] = []
        self._replay: collections.deque[Episode] = collections.deque(maxlen=config.replay_episodes)
        self._dropped = collections.Counter()  # records dropped since the last update, by why
        self._new_since_publish = 0
        self._sync_since: float | None = None  # S = 0: when the gate closed for this update
        self._last_publish = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.train_steps = 0       # policy-gradient steps
        self.imitation_steps = 0   # steps of the imitation optimizer (not checkpointed)
        self.versions_published = 0
        self.reverts = 0
        self.last_metrics: dict = {}
        self.error: BaseException | None = None
        self._scorer = None  # the last trained verifier scorer (learner.verifier_train)
        # called with the model between backward() and the optimizer step (learner.distributed)
        self.after_backward = None
        self._revert: int | None = None  # a version to go back to (a canary was rolled back)
        if ckpt.get("trainer"):
            self._resume(ckpt["trainer"])
        else:
            self.proximal.reset_ewma(self.model)

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything besides model and optimizer that the next update depends on (plain data
        and tensors only: it is read back with torch.load(weights_only=True))."""
        return pack_state(
            gen=self._gen, rng=self._rng, ret=(self._ret_mean, self._ret_std, self._ret_seen),
            ewma=self.proximal.ewma_state(), position=self.feed.position(self._ready, self._replay),
            train_steps=self.train_steps, new_since_publish=self._new_since_publish,
            imitation_optimizer=(self.imitation_optimizer.state_dict()
                                 if self.imitation_optimizer is not None else None),
            anchor=self.anchor.state_dict() if self.anchor is not None else None)

    def _resume(self, state: dict) -> None:
        unpack_rng(state, self._gen, self._rng)
        self._ret_mean, self._ret_std, self._ret_seen = state["ret"]
        self.proximal.reset_ewma(self.model, state["ewma"])
        self.train_steps = int(state["train_steps"])
        self._new_since_publish = int(state["new_since_publish"])
        self._ready, replay = self.feed.restore(state["position"])
        self._replay.extend(replay)
        if self.anchor is not None and state.get("anchor"):  # where RL started, not this version
            self.anchor.load_state_dict(state["anchor"])
        if self.imitation_optimizer is not None and state.get("imitation_optimizer"):
            self.imitation_optimizer.load_state_dict(state["imitation_optimizer"])
        if self.imitation is not None and replay:
            # the fleet's part of the imitation set is not in the checkpoint: it starts again
            # from the replay window's episodes (the store keeps every record regardless)
            episodes, _ = usable_episodes([r for ep in replay for r in ep.records], self.spec,
                                          self.version, self.config.staleness)
            flat = [r for ep in episodes for r in ep]
            if flat:
                imitate, human = self._imitated(episodes)
                self.imitation.add(decode(flat, self.spec), imitate, human, record_keys(flat))
        log.info("resumed at version %d: store position %d, %d pending, %d ready and %d replay "
                 "episodes", self.version, self.feed.cursor, len(self.feed.pending),
                 len(self._ready), len(replay))

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

    def revert_to(self, version: int) -> None:
        """A canary was rolled back (learner.canary, any thread): the next update starts again
        from ``version``'s weights and optimizer state. Versions stay monotonic: the next
        publish is a new number. Data the rolled back versions collected stays usable (its
        behaviour log-probabilities and proximal snapshots are per version)."""
        self._revert = version

    def _apply_revert(self) -> bool:
        version, self._revert = self._revert, None
        if version is None:
            return False
        ckpt = self.registry.load_checkpoint(version)
        if ckpt is None:
            log.warning("cannot go back to version %d: it has no checkpoint; training on", version)
            return False
        self.model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer"):
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as e:
                log.warning("version %d's optimizer state does not fit (%s); keeping Adam's", version, e)
        self.proximal.reset_ewma(self.model)
        self.reverts += 1
        log.warning("trainer: back to version %d's weights (the versions after it were rolled "
                    "back); the next version builds on them", version)
        self._reverted()
        return True

    def _reverted(self) -> None:
        """Hook for the data-parallel trainer: bring the other ranks to the reverted state."""

    def step(self, now: float | None = None) -> bool:
        """Poll the store once, train on newly completed episodes, publish if due.

        Returns whether anything was done (the loop sleeps otherwise)."""
        self._apply_revert()
        got = self.poll()
        now = time.monotonic() if now is None else now
        if self.config.staleness == 0:
            return self._step_sync(now) or got > 0
        trained = False
        if self._ready and (len(self._ready) >= self.config.update_episodes
                            or self._publish_due(now, len(self._ready))):
            self._gate(self.version + 1 - self.config.staleness)
            self._update()
            trained = True
            if self.config.publish_each_update and self._new_since_publish >= self.config.min_new_episodes:
                self.publish(now)
        self.maybe_publish(now)
        return got > 0 or trained

    def _step_sync(self, now: float) -> bool:
        c = self.config
        if self._sync_since is None:
            if len(self._ready) < c.min_new_episodes or now - self._last_publish < c.publish_interval_s:
                return False
            self._sync_since = now
            self._gate(self.version + 1)  # robots finishing an episode wait for version v + 1
        running = any(ep.records[-1].policy_version >= self.version
                      for ep in self.feed.pending.values())
        if running and now - self._sync_since < c.sync_wait_s:
            return False
        self._update()
        self.publish(now)
        return True

    def _gate(self, min_version: int) -> None:
        self.registry.set_min_version(max(0, min_version))

    def _fresh(self, ep: Episode) -> bool:
        return self.version - ep.oldest_version <= self.config.staleness

    def poll(self) -> int:
        """Read new records in insertion order; complete, fresh episodes become ready."""
        got, done, overflow = self.feed.poll()
        self._dropped["incomplete"] += overflow
        # episodes still running on versions already too old can never train: stop holding them
        self._dropped["stale"] += self.feed.drop_pending(lambda ep: not self._fresh(ep))
        for ep in done:
            if self._fresh(ep):
                self._ready.append(ep)
            else:
                self._dropped["stale"] += len(ep.records)
        return got

    def remember(self, records: list) -> None:
        """Keep these complete episodes in the replay window (what later updates sample and
        the verifier's scorer trains on) without the store: for callers that hand records to
        ``train_on`` directly (sim.learning_lab, tests)."""
        self._replay.extend(Episode((g[0].robot_id, g[0].episode_id), 0, g)
                            for g in group_episodes(records))

    def _update(self) -> dict:
        """One update on the ready episodes plus a sample of recent, still fresh, replay."""
        new, self._ready = self._ready, []
        fresh = [ep for ep in self._replay if self._fresh(ep)]
        k = min(self.config.replay_sample, len(fresh))
        old = [fresh[i] for i in self._rng.choice(len(fresh), k, replace=False)] if k else []
        metrics = self.train_on([r for ep in new + old for r in ep.records])
        self._replay.extend(new)
        self._new_since_publish += len(new)
        return metrics

    def _publish_due(self, now: float, pending: int = 0) -> bool:
        c = self.config
        return (self._new_since_publish + pending >= c.min_new_episodes
                and now - self._last_publish >= c.publish_interval_s)

    def maybe_publish(self, now: float | None = None):
        now = time.monotonic() if now is None else now
        return self.publish(now) if self._publish_due(now) else None

    def publish(self, now: float | None = None):
        if self._apply_revert():  # trained on a rolled back lineage: that update is dropped
            self._sync_since = None
            return None
        self._new_since_publish = 0  # as the checkpoint must say: a resumed trainer starts afresh
        manifest = self.registry.publish(self.model, optimizer_state=self.optimizer.state_dict(),
                                         verifier=self._train_verifier(),
                                         trainer_state=self.state_dict())
        self.version = manifest.version
        self.versions_published += 1
        self.proximal.put(self.version, self.model.state_dict())
        self._sync_since = None
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
            episodes, _ = usable_episodes([r for ep in self._replay for r in ep.records],
                                          self.spec, self.version, self.config.staleness)
            try:
                trained = train_fleet_scorer(
                    self.model, self.spec, episodes, self.config.gamma, c, previous=self._scorer,
                    value_scale=(self._ret_mean, self._ret_std),
                    success_bonus=self.config.success_bonus)
            except ValueError as e:  # a scorer is optional: publish the policy regardless
                log.warning("verifier scorer not retrained for this version: %s", e)
                trained = None
            else:
                if trained is None:
                    log.info("verifier scorer not retrained for this version: %d usable "
                             "episodes in the replay window, fewer than it needs; shipping %s",
                             len(episodes), "the previous one" if self._scorer else "none")
            self._scorer = trained or self._scorer
        return self._scorer

    def _log(self, metrics: dict) -> dict:
        metrics = dict(metrics, time=time.time())
        self.last_metrics = metrics
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(metrics, sort_keys=True) + "\n")
        return metrics


def _freeze(model: ReferenceVLA, prefixes: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Stop the gradient to the parameters whose names start with one of ``prefixes`` (module
    names, e.g. "encoders"); returns them (once per prefix that matches them). A prefix that
    names nothing is a typo: an error."""
    named = dict(model.named_parameters())
    out = []
    for prefix in prefixes:
        mine = [p for n, p in named.items() if n == prefix or n.startswith(prefix + ".")]
        if not mine:
            modules = sorted({n.split(".")[0] for n in named})
            raise ValueError(f"TrainerConfig.frozen: {prefix!r} names no parameter of the "
                             f"policy; its modules are {', '.join(modules)}")
        out += mine
    for p in out:
        p.requires_grad_(False)
    return out
