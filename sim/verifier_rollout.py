"""Synchronous Meta-World rollouts through the verifier, for the verifier benchmark.

Each chunk: one policy call (ORT) gives the Gaussian's mean, log_std and features; candidates are
draws from that Gaussian (plus ``noise`` for the deliberately degraded policy); the scheduler
picks one (or none: then the previous chunk's remainder runs, or the robot holds); the first
``execute`` rows go through the envelope to the robot. Every executed chunk is kept as a
training row for the scorer (features, state, mean, chosen chunk, envelope interventions beyond
plain saturation, rewards) so the same loop collects data and evaluates.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from runtime.policy import PolicyRunner
from verifier.envelope import Envelope
from verifier.scheduler import VerifierScheduler


@dataclasses.dataclass
class Episode:
    task: str
    success: bool
    steps: int
    holds: int
    rejected_chunks: int
    rows: list  # per executed chunk: dict(features, state, mean, actions, start, n, reward)
    clamped: np.ndarray  # [steps] bool: the envelope intervened beyond plain saturation
    failed: bool = False  # terminated without success (a time limit is not a failure)


def make_draw(mean, log_std, rng: np.random.Generator, temperature: float, noise: float):
    std = np.exp(log_std).astype(np.float32) * temperature

    def draw(k: int) -> np.ndarray:
        eps = rng.standard_normal((k, *mean.shape)).astype(np.float32)
        out = mean[None] + std[None] * eps
        if noise > 0:
            out = out + noise * rng.standard_normal(out.shape).astype(np.float32)
        return out
    return draw


def run_episode(robot, runner: PolicyRunner, scheduler: VerifierScheduler, envelope: Envelope,
                rng: np.random.Generator, *, noise: float = 0.0, temperature: float = 1.0,
                execute: int = 4) -> Episode:
    h, a = runner.horizon, runner.action_dim
    obs = robot.reset()
    envelope.reset()
    last_cmd = None
    remainder: np.ndarray | None = None
    rows, clamped_ticks = [], []
    success = done = failed = False
    holds = rejected = 0
    state_mean, state_std = runner._state_mean, runner._state_std
    while not done:
        out = runner.infer(obs)
        state_n = ((obs.state - state_mean) / state_std).astype(np.float32)
        chunk, verdict = scheduler.choose(
            make_draw(out.mean, out.log_std, rng, temperature, noise), h, a,
            features=out.features, state=obs.state, mean=out.mean, log_std=out.log_std,
            rows=(0, execute))
        row = None
        if chunk is None:
            rejected += 1
            plan = remainder if remainder is not None and len(remainder) else None
        else:
            plan = chunk[:execute]
            remainder = chunk[execute:2 * execute]
            row = {"features": out.features, "state": state_n, "mean": out.mean,
                   "actions": chunk, "start": len(clamped_ticks), "n": 0, "reward": 0.0}
        if plan is None:
            hold = envelope.hold(last_cmd)
            plan = np.repeat(runner.from_command(hold)[None], execute, axis=0)
            holds += execute
        elif chunk is None:
            remainder = None
        for a_n in plan:
            want = runner.to_command(a_n)
            cmd, was_clamped, _ = envelope.apply(want, last_cmd, obs.state)
            res = robot.send_action(cmd)
            last_cmd = cmd
            # an intervention beyond plain saturation at the action bounds (Envelope.intervened)
            clamped_ticks.append(bool(was_clamped) and envelope.intervened())
            if row is not None:
                row["n"] += 1
                row["reward"] += res.reward
            success = success or res.success
            done = res.terminated or res.truncated
            failed = failed or (res.terminated and not success)
            obs = robot.observe()
            if done:
                break
        if row is not None:
            rows.append(row)
    return Episode(robot.task, success, len(clamped_ticks), holds, rejected, rows,
                   np.asarray(clamped_ticks, bool), failed)
