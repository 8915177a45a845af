"""The trainer's settings (``learner.trainer.Trainer``), one frozen dataclass.

The defaults are the setting that made 15-minute fleets gain (README, learning section; 8
robots on 2 cores with their clocks at 3x, ``sim.bench_learning --sim-speed 3``): the policy
gradient alone at lr 3e-5 on a success reward. Fleet success, first against last 3-minute
block, on two seeds: 0.43 -> 0.53 and 0.39 -> 0.55, where the previous defaults (lr 3e-6, 8
imitation steps per update, success bonus 1,000, gamma 0.9) gave 0.37 -> 0.42. Larger steps
(6e-5 and up) lost success in the lab; the imitation steps pull the policy back towards the
clone and take learner time that, at 3x, costs data dropped as too stale.

The image encoders are frozen (``frozen``, since 2026-11-24): the cloned features stay put, and
an update costs about a third less, so at 3x the learner keeps up with the robots. Three of
four 15-minute fleets with them frozen climbed 10-22 points (3-minute blocks; the fourth lost
3), where the same settings with the encoders trained ranged from -9 to +16.
"""
from __future__ import annotations

import dataclasses

from learner.verifier_fleet_train import FleetScorerConfig


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    # discount per chunk (not per tick): a 150-tick episode is ~30 chunks, 0.97^30 ~ 0.4
    gamma: float = 0.97
    # added to the reward of the chunk that reached success. Episodes end on success, so with a
    # dense reward alone a near miss that runs the full episode out-earns a quick success
    # (Meta-World reach: ~33 per chunk either way). At ~100 times a whole episode's dense return
    # the per-task normalized advantages rank chunks by whether they led to success, and the
    # dense reward breaks ties: a success reward (1,000 = a few chunks' worth of dense reward
    # trained the dense return up while success stayed flat)
    success_bonus: float = 100_000.0
    lr: float = 3e-5                # Adam, for the network (see the module docstring)
    log_std_lr: float = 3e-3        # Adam, for the policy's global log_std (the noise)
    # raise the pretrained policy's log_std to at least this when RL starts from it (a version
    # without optimizer state): behaviour cloning fits the noise to the demonstrations' spread,
    # which may be too little to explore with. None: as pretrained
    explore_log_std: float | None = None
    value_lr: float = 1e-3          # Adam, for the value head (not scaled by the ESS)
    gae_lambda: float = 0.95        # advantages: lambda-returns minus values (1: Monte Carlo)
    clip: float = 0.2
    max_is_ratio: float = 2.0       # behaviour weights prox/mu above this are masked out
    pg_coef: float = 1.0            # the decoupled-PPO policy gradient
    value_coef: float = 0.5
    bc_coef: float = 0.5            # imitation on successful episodes and human interventions
    # a pull towards the policy RL started from (the anchor: the clone's means, kept from the
    # version the trainer first loaded): per chunk, the KL between the current and the anchor's
    # Gaussians at the current noise, over the executed rows. Without it, each update's noisy
    # gradient moves the means a little, and over ~100 updates the walk leaves the clone
    # (lab, noise fixed: 0.36 -> 0.12). It held the lab's gains over 150 updates but slowed a
    # 15-minute fleet (docs/learner.md, "The anchor"). 0 = off
    anchor_coef: float = 0.0
    epochs: int = 4
    minibatch: int = 128
    # imitation on the aggregated set (learner/imitation.py: demonstrations, interventions, the
    # policy's own successes) with an optimizer of its own, after each update's PG steps; 0 = off
    # (the default: see the module docstring; the PG loss's ``bc_coef`` term still imitates the
    # policy's own successes and the operators' interventions in every update)
    imitation_lr: float = 1e-4
    imitation_steps: int = 0        # per update
    imitation_batch: int = 64
    imitation_capacity: int = 16384  # fleet chunks kept (demonstrations are kept besides)
    imitation_prefix_noise: float = 0.02
    # the demonstrations the policy was cloned from (.npz, learner.demos.DemoSet), kept in the
    # imitation set; every trainer rank reads this path ("": none)
    demos: str = ""
    # S > 0: train once this many new episodes are ready (or a publish is due). An update's
    # advantages are normalized per task, so a small batch (8 gave ~13 episodes an update in a 3x
    # fleet, 4 or 5 a task) gives noisy steps; 40 is about what a synchronous update sees (a 3x
    # fleet's 10 s between versions).
    # 15-minute S = 4 fleets, same seed and clone: +27.5 and +24 points (first to last 3-minute
    # block) with 40, +17 with 8 (README, "Tasks inside the band")
    update_episodes: int = 40
    # PPO ratio per executed row (the chunk's log-ratio over its rows, as GSPO does per token):
    # a chunk holds ~6 rows x 4 dims, so its raw ratio leaves any clip range after tiny steps
    row_ratio: bool = True
    detach_value: bool = True       # the value loss trains the value head, not the policy trunk
    grad_clip: float = 1.0
    # parameters kept as cloned: ReferenceVLA module names, matched as prefixes of the parameter
    # names ("encoders": the image encoders; () trains every module). Frozen parts take no
    # gradient, so an update costs less, and one task's gradients cannot move the features the
    # others read (see the module docstring)
    frozen: tuple[str, ...] = ("encoders",)
    staleness: int = 4              # S: versions of staleness allowed (0 = synchronous on-policy)
    snapshots: int = 8              # K recent versions' weights kept for exact proximal log-probs
    ewma_decay: float = 0.95        # PPO-EWMA proximal fallback, per optimizer step
    sync_wait_s: float = 10.0       # S = 0: wait at most this for episodes still on the version
    replay_episodes: int = 32       # bounded window of recent complete episodes
    replay_sample: int = 4          # old (but not stale) episodes mixed into each update
    min_new_episodes: int = 2       # publish after this many new complete episodes ...
    publish_interval_s: float = 25.0  # ... and at least this long after the last publish
    # S > 0: publish every update at once (robots do not wait for it, so holding a version
    # back only makes their data older); publish_interval_s then bounds how long ready
    # episodes wait for an update when fewer than update_episodes come in. The side-by-side
    # benchmark's async_speedup: 1.44 with it, 0.93 publishing every publish_interval_s
    # (README, "Publishing every update")
    publish_each_update: bool = True
    poll_s: float = 0.5
    read_limit: int = 512
    max_pending_records: int = 50_000  # incomplete episodes held; oldest dropped beyond this
    ess_scaled_lr: bool = True
    # the verifier scorer, retrained and shipped with every ``every``-th published version
    # (`tether learner --verifier-every N`, 0 = never). A scorer without held-out evidence that
    # it separates unsafe chunks from safe ones ships advisory (no veto; see
    # learner/verifier_train.py): a few minutes of fleet data rarely give that evidence
    verifier: FleetScorerConfig = FleetScorerConfig(every=1)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "frozen", tuple(self.frozen))  # JSON gives a list
        checks = {
            "gamma": 0 <= self.gamma <= 1, "success_bonus": self.success_bonus >= 0,
            "lr": self.lr > 0, "log_std_lr": self.log_std_lr >= 0,
            "value_lr": self.value_lr >= 0, "gae_lambda": 0 <= self.gae_lambda <= 1, "clip": 0 < self.clip < 1,
            "max_is_ratio": self.max_is_ratio >= 1, "pg_coef": self.pg_coef >= 0,
            "value_coef": self.value_coef >= 0, "bc_coef": self.bc_coef >= 0,
            "anchor_coef": self.anchor_coef >= 0,
            "epochs": self.epochs >= 1, "minibatch": self.minibatch >= 1,
            "imitation_lr": self.imitation_lr >= 0, "imitation_steps": self.imitation_steps >= 0,
            "imitation_batch": self.imitation_batch >= 1,
            "imitation_capacity": self.imitation_capacity >= 1,
            "imitation_prefix_noise": self.imitation_prefix_noise >= 0,
            "update_episodes": self.update_episodes >= 1, "grad_clip": self.grad_clip > 0,
            "staleness": self.staleness >= 0, "snapshots": self.snapshots >= 1,
            "ewma_decay": 0 <= self.ewma_decay < 1, "sync_wait_s": self.sync_wait_s >= 0,
            "replay_episodes": self.replay_episodes >= 1, "replay_sample": self.replay_sample >= 0,
            "min_new_episodes": self.min_new_episodes >= 1,
            "publish_interval_s": self.publish_interval_s >= 0, "poll_s": self.poll_s > 0,
            "read_limit": self.read_limit >= 1, "max_pending_records": self.max_pending_records >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError("TrainerConfig: invalid "
                             + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                             + "; see learner/trainer_config.py for each setting's range")
