"""The policy's action distribution, in numpy, matching the learner's torch code exactly.

Chunks are diagonal Gaussians over normalized actions: ``mean`` and ``log_std`` of shape [H, A].
The behaviour log-probability of an executed span is the sum over its rows (chunk offsets) of
log N(action | mean[offset], exp(log_std[offset])).
"""
from __future__ import annotations

import math

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_log_prob(mean: np.ndarray, log_std: np.ndarray, actions: np.ndarray,
                      offsets: np.ndarray) -> float:
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) == 0:
        return 0.0
    m = mean[offsets].astype(np.float64)
    ls = log_std[offsets].astype(np.float64)
    z = (np.asarray(actions, np.float64) - m) * np.exp(-ls)
    return float(np.sum(-0.5 * z * z - ls - 0.5 * LOG_2PI))


def sample(mean: np.ndarray, log_std: np.ndarray, rng: np.random.Generator,
           temperature: float = 1.0) -> np.ndarray:
    """A chunk drawn from N(mean, (temperature * std)^2); temperature 0 gives the mean."""
    noise = rng.standard_normal(mean.shape).astype(np.float32)
    return (mean + temperature * np.exp(log_std) * noise).astype(np.float32)
