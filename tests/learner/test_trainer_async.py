"""Decoupled PPO under staleness: exact proximal snapshots per version, the EWMA fallback, the
robot/learner discrepancy measured apart from staleness, the staleness gate (S = 0 and S > 0),
imitation of interventions, and the per-update log."""
import json

import pytest
import torch

from learner import ppo
from learner.trainer import Trainer, TrainerConfig
from tests.learner.helpers import policy_episode
from tests.learner.test_trainer import logp
from tether.wire import tether_pb2 as pb


def push(store, episodes):
    for ep in episodes:
        store.append(pb.ExperienceBatch(robot_id=ep[0].robot_id, records=ep))


def ep(session, manifest, name, *, n=4, success=False, version=1, seed=None, reward=0.5):
    return policy_episode(session, manifest, f"robot-{name}", name, [reward] * n,
                          seed=seed if seed is not None else sum(map(ord, name)),
                          success=success, version=version)


def test_ppo_pieces():
    w, valid = ppo.behaviour_weights(torch.log(torch.tensor([1.0, 1.0, 3.0], dtype=torch.float64)),
                                     torch.zeros(3, dtype=torch.float64), 2.0)
    assert valid.tolist() == [True, True, False]
    assert ppo.effective_sample_size(w, valid) == pytest.approx(4 / (3 * 2))
    assert ppo.effective_sample_size(torch.ones(5), torch.ones(5, dtype=torch.bool)) == 1.0
    same = torch.tensor([-1.0, -2.0])
    assert ppo.k3_kl(same, same) == 0.0
    # k3 is unbiased for KL(N(0,1) || N(1,1)) = 0.5
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0)).double()
    lp = lambda m: -0.5 * (x - m) ** 2
    assert ppo.k3_kl(lp(0.0), lp(1.0)) == pytest.approx(0.5, abs=0.02)


def test_lambda_returns_span_monte_carlo_to_one_step_targets():
    rewards, values = [1.0, 0.0, 2.0], [0.5, -1.0, 3.0]
    g = 0.9
    mc = [1 + g * (0 + g * (2 + g * 4.0)), 0 + g * (2 + g * 4.0), 2 + g * 4.0]
    assert ppo.lambda_returns(rewards, values, g, 1.0, bootstrap=4.0) == pytest.approx(mc)
    # lambda 0: r + gamma V(next), the bootstrap after the last chunk
    assert ppo.lambda_returns(rewards, values, g, 0.0, bootstrap=4.0) == pytest.approx(
        [1 + g * -1.0, 0 + g * 3.0, 2 + g * 4.0])
    # in between: G_i = r_i + gamma ((1 - lam) V_{i+1} + lam G_{i+1})
    lam = 0.5
    g2 = 2 + g * 4.0
    g1 = 0 + g * ((1 - lam) * 3.0 + lam * g2)
    g0 = 1 + g * ((1 - lam) * -1.0 + lam * g1)
    assert ppo.lambda_returns(rewards, values, g, lam, bootstrap=4.0) == pytest.approx([g0, g1, g2])


def test_the_value_head_learns_at_its_own_step_size_while_the_policy_barely_moves(setup):
    """The value head starts untrained: at the network's small step size it would not be a
    baseline for many updates. Its own (larger) step size must not move the policy."""
    store, registry, manifest, session = setup
    eps = [ep(session, manifest, f"v{i}", reward=float(i), seed=70 + i) for i in range(4)]
    flat = [r for e in eps for r in e]
    errors = {}
    for value_lr in (0.0, 1e-2):
        trainer = Trainer(store, registry, TrainerConfig(
            value_lr=value_lr, lr=1e-9, log_std_lr=0.0, epochs=8, minibatch=8, bc_coef=0.0,
            imitation_lr=0.0, success_bonus=0.0, gae_lambda=1.0))
        before = logp(trainer, flat)
        losses = [trainer.train_on(flat)["loss_value"] for _ in range(3)]
        errors[value_lr] = losses[-1]
        assert (logp(trainer, flat) - before).abs().max() < 1e-3
    assert errors[1e-2] < 0.5 * errors[0.0]


def test_explore_log_std_raises_the_pretrained_noise_when_rl_starts_and_only_then(setup):
    store, registry, _, _ = setup
    pretrained = Trainer(store, registry, TrainerConfig()).model.log_std.detach().clone()
    floor = float(pretrained.max()) + 0.5
    trainer = Trainer(store, registry, TrainerConfig(explore_log_std=floor))
    raised = trainer.model.log_std.detach().clone()
    assert torch.equal(raised, torch.full_like(pretrained, floor))
    trainer.publish()  # a version with optimizer state: a restart resumes it as it is
    again = Trainer(store, registry, TrainerConfig(explore_log_std=floor + 1.0))
    assert torch.equal(again.model.log_std.detach(), raised)


def test_old_versions_use_their_own_snapshot_not_the_current_weights(setup):
    store, registry, manifest, session = setup
    config = TrainerConfig(staleness=4, epochs=2, minibatch=8, lr=1e-3, snapshots=1)
    trainer = Trainer(store, registry, config)
    fresh = [ep(session, manifest, f"a{i}", success=i == 0) for i in range(3)]
    trainer.train_on([r for e in fresh for r in e])
    trainer.publish()
    trainer.train_on([r for e in fresh for r in e])
    trainer.publish()
    assert trainer.version == 3
    old = [ep(session, manifest, f"b{i}", seed=50 + i) for i in range(2)]
    moved = (logp(trainer, old[0]) - torch.tensor([r.behaviour_log_prob for r in old[0]])).abs().max()
    assert moved > 0.05  # the current weights are no longer version 1 ...
    m = trainer.train_on([r for e in old for r in e])
    # ... but the proximal policy of version-1 records is version 1's snapshot: w = prox/mu = 1
    assert m["proximal_exact_frac"] == 1.0 and abs(m["ratio_start"] - 1) < 1e-3
    assert m["logp_gap_max"] < 1e-3 and m["masked_frac"] == 0.0
    assert m["staleness_hist"] == {"2": 8} and m["staleness"] == 2.0
    assert m["kl_behaviour"] < 1e-6 and m["kl_update"] > 0
    assert trainer.proximal.loads == 2  # only 1 kept in memory: v1 was read back, twice


def test_without_a_snapshot_the_ewma_policy_is_the_proximal_fallback(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(epochs=2, minibatch=4, lr=1e-3))
    data = [ep(session, manifest, f"a{i}", success=i == 0) for i in range(2)]
    trainer.train_on([r for e in data for r in e])
    registry.checkpoint_path(1).unlink()  # version 1's snapshot is gone (memory and disk)
    trainer.proximal._snapshots.clear()
    m = trainer.train_on([r for e in data for r in e])
    assert m["proximal_exact_frac"] == 0.0
    assert m["logp_gap_mean"] == 0.0 and m["masked_by_gap_frac"] == 0.0  # exact records only
    # the EWMA sits between version 1 and the current weights: w moves off 1, but less than pi
    assert abs(m["ratio_start"] - 1) > 1e-4
    ewma = torch.cat([p.flatten() for p in trainer.proximal.ewma.parameters()])
    cur = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    assert not torch.equal(ewma, cur)


def test_robot_learner_discrepancy_is_measured_apart_from_staleness(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(epochs=1, max_is_ratio=2.0))
    a, b = ep(session, manifest, "a"), ep(session, manifest, "b")
    for r in a:
        r.behaviour_log_prob += 0.1   # e.g. a quantized engine on the robot
    for r in b[:2]:
        r.behaviour_log_prob -= 3.0   # far off: w = e^3 > 2, masked
    m = trainer.train_on(a + b)
    assert m["proximal_exact_frac"] == 1.0 and m["staleness_hist"] == {"0": 8}
    assert m["logp_gap_max"] == pytest.approx(3.0, abs=1e-3)
    assert m["logp_gap_mean"] == pytest.approx((4 * 0.1 + 2 * 3.0) / 8, abs=1e-3)
    assert m["masked_by_gap_frac"] == m["masked_frac"] == 0.25 and m["dropped"]["masked"] == 2
    assert m["kl_behaviour"] > 0 and m["ess"] < 1


def test_human_interventions_train_through_the_imitation_term(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(bc_coef=1.0, value_coef=0.0, epochs=3,
                                                     minibatch=8, lr=1e-3))
    # a failed episode: without the intervention flag, only the policy gradient would act
    fixed = ep(session, manifest, "a", reward=0.0)
    other = ep(session, manifest, "b", reward=0.0)
    for r in fixed:
        r.human_intervention = True
    before = logp(trainer, fixed)
    m = trainer.train_on(fixed + other)
    assert m["imitate_frac"] == 0.5 and m["success_episodes"] == 0 and m["loss_bc"] > 0
    assert (logp(trainer, fixed) - before).mean() > 0.05


def test_staleness_is_gated_and_stale_data_dropped_and_counted(setup, tmp_path):
    store, registry, manifest, session = setup
    config = TrainerConfig(staleness=1, min_new_episodes=1, publish_interval_s=0, epochs=1,
                           replay_sample=0)
    trainer = Trainer(store, registry, config, log_path=tmp_path / "updates.jsonl")
    push(store, [ep(session, manifest, "a")])
    assert trainer.step()
    assert registry.min_version == 1 and registry.latest() == 2  # gate at v+1-S = 1
    push(store, [ep(session, manifest, "b", version=2)])
    trainer.step()
    assert registry.min_version == 2 and registry.latest() == 3
    # version-1 data is now 2 versions behind: dropped at arrival, counted in the next update
    push(store, [ep(session, manifest, "late", version=1), ep(session, manifest, "c", version=3)])
    trainer.step()
    lines = [json.loads(x) for x in (tmp_path / "updates.jsonl").read_text().splitlines()]
    assert [x["version"] for x in lines] == [1, 2, 3]
    assert lines[-1]["dropped"] == {"stale": 4, "unusable": 0, "masked": 0, "incomplete": 0} and lines[-1]["records"] == 4
    assert trainer.last_metrics == lines[-1]
    for key in ("kl_behaviour", "kl_update", "clip_frac", "ess", "staleness_hist", "lr"):
        assert key in lines[-1]


def test_synchronous_mode_waits_for_the_running_episodes_then_trains_and_publishes(setup):
    store, registry, manifest, session = setup
    config = TrainerConfig(staleness=0, min_new_episodes=2, publish_interval_s=0, epochs=1,
                           sync_wait_s=30)
    trainer = Trainer(store, registry, config)
    a, b, c = (ep(session, manifest, n) for n in "abc")
    push(store, [a])
    trainer.step()
    assert trainer.train_steps == 0 and registry.min_version == 0  # collecting
    push(store, [b, c[:2]])  # c is still running on version 1
    trainer.step()
    assert registry.min_version == 2  # gate closed: robots wait for version 2
    assert trainer.train_steps == 0 and registry.latest() == 1  # waiting for c
    push(store, [c[2:]])
    trainer.step()
    assert registry.latest() == 2 and trainer.last_metrics["episodes"] == 3
    assert trainer.last_metrics["staleness_hist"] == {"0": 12}
    # an episode still on version 1 after version 2 is out is stale at S = 0
    d, e, f, g = (ep(session, manifest, n, version=v)
                  for n, v in (("d", 1), ("e", 2), ("f", 2), ("g", 2)))
    push(store, [d[:1]])
    trainer.step()
    assert trainer._sync_since is None
    push(store, [e, g, f[:1]])
    trainer.step()
    assert trainer._sync_since is not None and registry.latest() == 2  # waits for f ...
    trainer.step(now=trainer._sync_since + 31)  # ... but not longer than sync_wait_s
    assert registry.latest() == 3 and registry.min_version == 3
    assert trainer.last_metrics["episodes"] == 2
    assert trainer.last_metrics["dropped"]["stale"] == 1


def test_intervention_records_train_imitation_only_not_the_policy_gradient_or_its_ess(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(epochs=1, minibatch=64, max_is_ratio=2.0))
    human = ep(session, manifest, "h", reward=5.0)
    for r in human:
        # an operator's rows: no behaviour probability under the policy (the recorder writes 0)
        r.human_intervention = True
        r.behaviour_log_prob = 0.0
    own = ep(session, manifest, "own", reward=0.0)
    m = trainer.train_on(human + own)
    # with their 0.0 behaviour log-probabilities the human rows would read as weights
    # exp(logp_prox) far below 1 (and as an ESS far below 1); they are left out instead
    assert m["human_records"] == len(human)
    assert m["ess"] == pytest.approx(1.0) and m["masked_frac"] == 0.0
    assert m["dropped"]["masked"] == 0 and m["logp_gap_max"] < 1e-3
    only_human = trainer.train_on(human)
    assert only_human["loss_pg"] == 0.0 and only_human["loss_bc"] != 0.0
    assert only_human["ess"] == 1.0


def test_an_episode_an_operator_rescued_does_not_teach_the_policys_own_chunks(setup):
    store, registry, manifest, session = setup
    trainer = Trainer(store, registry, TrainerConfig(epochs=1, minibatch=64))
    rescued = ep(session, manifest, "r", success=True)
    for r in rescued[2:]:  # the operator took over after two of the policy's chunks, and won
        r.human_intervention = True
        r.behaviour_log_prob = 0.0
    alone = ep(session, manifest, "a", success=True)
    m = trainer.train_on(rescued + alone)
    # imitated: the operator's chunks and the episode the policy won alone, not the two chunks
    # that led to the stall
    n = len(rescued) + len(alone)
    assert m["imitate_frac"] == pytest.approx((len(rescued) - 2 + len(alone)) / n)
