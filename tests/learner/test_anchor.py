"""The anchor (TrainerConfig.anchor_coef): a KL pull towards the policy RL started from, kept
across publishes and restarts."""
import torch

from learner import ppo
from learner.batches import decode
from learner.trainer import Trainer, TrainerConfig
from tests.learner.test_trainer import episodes


def test_anchor_kl_is_the_gaussian_kl_over_the_executed_rows():
    g = torch.Generator().manual_seed(0)
    mean, anchor = torch.randn(5, 6, 4, generator=g), torch.randn(5, 6, 4, generator=g)
    log_std = torch.randn(6, 4, generator=g).expand(5, 6, 4) * 0.3 - 1.0
    rows = (torch.arange(6).reshape(1, 6) < torch.tensor([[1], [6], [3], [0], [4]])).float()
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mean, log_std.exp()),
                                           torch.distributions.Normal(anchor, log_std.exp()))
    expected = (kl.sum(-1) * rows).sum(-1).mean()
    assert torch.allclose(ppo.anchor_kl(mean, anchor, log_std, rows), expected, atol=1e-5)
    assert ppo.anchor_kl(anchor, anchor, log_std, rows) == 0


def mean_distance(trainer, records) -> float:
    """Mean squared distance of the policy's means from the anchor's (the clone's) on records."""
    b = decode(records, trainer.spec)
    with torch.no_grad():
        return float((trainer.model(*b.inputs())[0] - trainer.anchor(*b.inputs())[0])
                     .square().mean())


def test_the_anchor_holds_the_means_near_the_clone_across_a_restart(setup):
    store, registry, manifest, session = setup
    good, bad = episodes(session, manifest)
    base = dict(lr=3e-3, epochs=2, minibatch=64, bc_coef=0.0, staleness=8)
    free = Trainer(store, registry, TrainerConfig(anchor_coef=1e-9, **base))
    held = Trainer(store, registry, TrainerConfig(anchor_coef=3.0, **base))
    clone = {k: v.clone() for k, v in held.model.state_dict().items()}
    for _ in range(3):
        free.train_on(good + bad)
        held.train_on(good + bad)
    d_free, d_held = mean_distance(free, good + bad), mean_distance(held, good + bad)
    assert d_free > 0 and d_held < 0.5 * d_free, (d_free, d_held)
    assert all(torch.equal(held.anchor.state_dict()[k], v) for k, v in clone.items())
    # a learner restarted from the published version anchors to the clone, not to that version
    held.publish()
    resumed = Trainer(store, registry, TrainerConfig(anchor_coef=3.0, **base))
    assert resumed.version == held.version > 1
    assert all(torch.equal(resumed.anchor.state_dict()[k], v) for k, v in clone.items())
    assert mean_distance(resumed, good + bad) == mean_distance(held, good + bad) > 0
