"""Decoupled PPO (AReaL) in small functions: behaviour weights, ESS, the clipped surrogate, KL.

Three policies per chunk: behaviour mu (the robot's log-probability, in the record), proximal
(the learner's weights of the record's version, ``learner.proximal``) and current pi::

    w = prox / mu      behaviour importance weight, masked (w = 0) above max_is_ratio
    r = pi / prox      the PPO ratio, clipped to [1 - clip, 1 + clip]; per executed row by
                       default: (pi / prox) ** (1 / rows), as GSPO normalizes per token
    loss_pg = -sum(w * min(r A, clip(r) A)) / n_valid      (w r = pi / mu)

All log-probabilities are float64 sums over a chunk's executed rows.
"""
from __future__ import annotations

import torch

# exp() of a chunk log-ratio beyond this overflows the KL estimate without telling more
_MAX_LOG_RATIO = 20.0


def behaviour_weights(logp_prox: torch.Tensor, logp_mu: torch.Tensor,
                      max_is_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(w, valid): w = prox / mu, and which records keep it (w <= max_is_ratio)."""
    w = torch.exp((logp_prox - logp_mu).clamp(max=_MAX_LOG_RATIO))
    return w, w <= max_is_ratio


def effective_sample_size(w: torch.Tensor, valid: torch.Tensor) -> float:
    """Kish's ESS of the behaviour weights as a fraction of the batch, masked records counting
    as weight 0: (sum w)^2 / (n sum w^2), in (0, 1]; 1 when all weights are equal."""
    wv = torch.where(valid, w, torch.zeros_like(w))
    denom = len(w) * float((wv ** 2).sum())
    return float(wv.sum() ** 2 / denom) if denom > 0 else 0.0


def k3_kl(logp_sampled: torch.Tensor, logp_other: torch.Tensor,
          weights: torch.Tensor | None = None) -> float:
    """Schulman's k3 estimator of KL(p || q) from samples of p: E[(r - 1) - log r], r = q / p,
    optionally importance-weighted (self-normalized) when the samples came from elsewhere."""
    log_r = (logp_other - logp_sampled).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    k3 = torch.expm1(log_r) - log_r
    if weights is None:
        return float(k3.mean()) if len(k3) else 0.0
    total = float(weights.sum())
    return float((weights * k3).sum() / total) if total > 0 else 0.0


def surrogate_loss(logp: torch.Tensor, logp_prox: torch.Tensor, advantages: torch.Tensor,
                   w: torch.Tensor, valid: torch.Tensor, clip: float,
                   rows: torch.Tensor | None = None):
    """(loss_pg, r, clip_frac) for one minibatch; ``logp`` carries the gradient. With ``rows``
    (executed rows per chunk) the ratio is per row: exp(chunk log-ratio / rows)."""
    log_r = logp.double() - logp_prox
    r = torch.exp(log_r if rows is None else log_r / rows.double())
    surrogate = torch.min(r * advantages, r.clamp(1 - clip, 1 + clip) * advantages)
    m = valid.double()
    n = m.sum().clamp(min=1.0)
    wv = torch.where(valid, w, torch.zeros_like(w))
    loss = -(wv * surrogate).sum() / n
    clip_frac = float((((r.detach() - 1).abs() > clip).double() * m).sum() / n)
    return loss, r.detach(), clip_frac


def anchor_kl(mean: torch.Tensor, anchor_mean: torch.Tensor, log_std: torch.Tensor,
              row_mask: torch.Tensor) -> torch.Tensor:
    """Mean over chunks of KL(N(mean, s) || N(anchor_mean, s)) on the executed rows (row_mask
    [B, H]), s = exp(log_std): half the squared distance of the means in units of the noise."""
    z = (mean - anchor_mean) * torch.exp(-log_std)
    return (0.5 * (z * z).sum(-1) * row_mask).sum(-1).mean()


def imitation_loss(logp: torch.Tensor, rows: torch.Tensor, imitate: torch.Tensor) -> torch.Tensor:
    """Mean per-row negative log-likelihood of the chunks to imitate (zero if there are none)."""
    if not bool(imitate.any()):
        return logp.sum() * 0.0
    return -(logp / rows)[imitate].mean()


def normalize(adv: torch.Tensor, groups: list | None = None) -> torch.Tensor:
    """Zero mean, unit std; within each group (e.g. task) when ``groups`` is given, so one task's
    larger rewards do not read as a better action on every chunk of that task."""
    if groups is None:
        groups = [0] * len(adv)
    out = torch.zeros_like(adv)
    keys = sorted(set(groups))
    for g in keys:
        idx = torch.tensor([i for i, x in enumerate(groups) if x == g], dtype=torch.long)
        if len(idx) >= 2:
            a = adv[idx]
            out[idx] = (a - a.mean()) / (a.std(unbiased=False) + 1e-8)
    return out


def lambda_returns(rewards: list[float], values, gamma: float, lam: float,
                   bootstrap: float = 0.0) -> list[float]:
    """Per-chunk lambda-returns of one episode (GAE: advantage = lambda-return - value).
    ``values[i]`` is the estimate at chunk i; ``bootstrap`` the value after the last chunk.
    lam = 1 gives the discounted returns, lam = 0 the one-step targets r + gamma V'."""
    out, acc = [0.0] * len(rewards), float(bootstrap)
    for i in range(len(rewards) - 1, -1, -1):
        nxt = float(values[i + 1]) if i + 1 < len(rewards) else float(bootstrap)
        # G_i = r_i + gamma ((1 - lam) V_{i+1} + lam G_{i+1})
        acc = rewards[i] + gamma * ((1.0 - lam) * nxt + lam * acc)
        out[i] = acc
    return out


def episode_returns(records, values, gamma: float, lam: float, success_bonus: float) -> list[float]:
    """Per-chunk lambda-returns of one episode's records, as the trainer's value targets and the
    scorer's advantage targets both use them: the success bonus added on the chunk that
    succeeded; an episode that did not end in ``terminated`` bootstraps from the value estimate
    of its last chunk (``values``: per record, in return units)."""
    rewards = [r.reward + success_bonus * r.success for r in records]
    bootstrap = 0.0 if records[-1].terminated else float(values[-1])
    return lambda_returns(rewards, values, gamma, lam, bootstrap)
