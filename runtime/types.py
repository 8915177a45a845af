"""Small typed records shared by the runtime's stages."""
from __future__ import annotations

import dataclasses

import numpy as np

from robots.base import Observation
from verifier.verdict import VerifierVerdict

__all__ = ["Chunk", "TickRecord", "VerifierVerdict"]


@dataclasses.dataclass(frozen=True)
class Chunk:
    """One accepted action chunk and where it came from.

    ``actions``/``mean``/``log_std``: [H, A] in the policy's normalized action space.
    ``start_tick``: the control tick at which ``actions[0]`` executes; with a prefix of length
    ``prefix_len`` the first ``prefix_len`` rows are the committed actions it continues.
    ``epoch``: the reset epoch it belongs to; chunks of an older epoch are dropped.
    """
    chunk_id: int
    epoch: int
    policy_version: int
    weight_sha256: str
    observation: Observation
    start_tick: int
    actions: np.ndarray
    mean: np.ndarray
    log_std: np.ndarray
    prefix: np.ndarray
    prefix_len: int
    features: np.ndarray | None = None
    latency_s: float = 0.0
    verdict: VerifierVerdict = VerifierVerdict()
    row_correlation: float = 0.0   # of its rows' noise (runtime/distributions.py)

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[0])


@dataclasses.dataclass(frozen=True)
class TickRecord:
    """One executed control tick, as the recorder sees it.

    ``chunk`` is None on a tick the robot held position, and ``held`` says why: "underrun" (no
    chunk was ready in time), "verifier" (the verifier vetoed every candidate of the latest
    inference and nothing was left to run) or "observation" (the observation check refused the
    observation). ``action`` is the command actually sent, mapped back into the normalized action
    space; ``clamped`` says whether the envelope changed it. ``policy_action``: the queued action
    the envelope received (normalized, the policy's own row), None on a hold or an operator's tick.

    ``operator``: a human operator drove this tick (``StepResult.operator``); ``action`` is then
    the operator's command and ``observation`` what the robot observed before it (the recorder
    turns operator ticks into human-intervention records).
    """
    tick: int
    chunk: Chunk | None
    offset: int
    action: np.ndarray
    clamped: bool
    reward: float
    terminated: bool
    truncated: bool
    success: bool
    held: str = ""
    operator: bool = False
    observation: Observation | None = None
    policy_action: np.ndarray | None = None
