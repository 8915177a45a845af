"""The policy's action distribution, in numpy, matching the learner's torch code exactly.

Chunks are Gaussians over normalized actions: ``mean`` and ``log_std`` of shape [H, A], each row
with standard deviation exp(log_std[row]). The rows of one chunk may be correlated
(``rho``, the manifest's ``outputs.row_correlation``, 0 by default): the noise of row t is
``std[t] * (sqrt(1 - rho^2) * eta[t] + rho * eps)`` with ``eps`` drawn once per chunk and action
dimension, so every row's marginal is still N(mean, std^2) and any two rows of a dimension
correlate by rho^2. Independent noise at 25 Hz averages out within a few ticks and hardly moves
the robot; a shared part moves the whole chunk, which is exploration an outcome can depend on.

The behaviour log-probability of an executed span (its rows, the chunk offsets) is that of the
joint Gaussian of those rows, per action dimension (n rows, z = (action - mean) / std,
c = 1 - rho^2, b = rho^2; the correlation matrix c I + b 11^T has a closed-form inverse)::

    log p = -1/2 (sum z^2 - b (sum z)^2 / (c + n b)) / c - 1/2 ((n - 1) log c + log(c + n b))
            - sum log std - n/2 log 2 pi

which is the sum over rows of log N(action | mean, std) when rho = 0.
"""
from __future__ import annotations

import math

import numpy as np

LOG_2PI = math.log(2.0 * math.pi)


def check_rho(rho: float) -> float:
    rho = float(rho)
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"row correlation rho must be in [0, 1), got {rho}")
    return rho


def gaussian_log_prob(mean: np.ndarray, log_std: np.ndarray, actions: np.ndarray,
                      offsets: np.ndarray, rho: float = 0.0) -> float:
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets)
    if n == 0:
        return 0.0
    m = mean[offsets].astype(np.float64)
    ls = log_std[offsets].astype(np.float64)
    z = (np.asarray(actions, np.float64) - m) * np.exp(-ls)
    if not rho:
        return float(np.sum(-0.5 * z * z - ls - 0.5 * LOG_2PI))
    b = check_rho(rho) ** 2
    c = 1.0 - b
    quad = (np.sum(z * z, 0) - b * np.sum(z, 0) ** 2 / (c + n * b)) / c    # [A]
    logdet = (n - 1) * math.log(c) + math.log(c + n * b)                    # per dimension
    return float(np.sum(-0.5 * quad - 0.5 * logdet) - np.sum(ls) - 0.5 * z.size * LOG_2PI)


def sample(mean: np.ndarray, log_std: np.ndarray, rng: np.random.Generator,
           temperature: float = 1.0, rho: float = 0.0) -> np.ndarray:
    """A chunk drawn from the chunk Gaussian (rows correlated by ``rho``, see above) with its
    standard deviations times ``temperature``; temperature 0 gives the mean."""
    noise = rng.standard_normal(mean.shape)
    if rho:
        rho = check_rho(rho)
        shared = rng.standard_normal((1,) + mean.shape[1:])  # one draw per action dimension
        noise = math.sqrt(1.0 - rho * rho) * noise + rho * shared
    return (mean + temperature * np.exp(log_std) * noise.astype(np.float32)).astype(np.float32)
