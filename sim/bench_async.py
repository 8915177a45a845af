"""Asynchronous against synchronous chunk execution on simulated Meta-World tasks, on a virtual
clock (part 2 of ``tether bench runtime``).

Every condition replays the same task variations (one seeded robot per task) with the same
policy (mean actions, temperature 0), so conditions differ only in how chunks are executed.
While a chunk is "being inferred" the simulator advances ``latency`` seconds of control ticks:
asynchronously the robot keeps executing the queued actions; synchronously it holds (and the
hold ticks count against the episode's time budget, as they would on a real robot).

Per condition: success rate, mean completion time of the successful episodes (virtual seconds
from reset to success), mean episode time (failures counted at the time limit), and the boundary
jerk: the mean squared third difference of the commanded end-effector positions (metres, the
integrated displacement commands), in m/s^3 squared, over the two third differences that span
each chunk-to-chunk boundary (the tick where the executing chunk changes; the first chunk of an
episode, which starts from rest in every mode, is left out).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from runtime.chunks import ActionQueue
from runtime.clock import VirtualClock
from runtime.control import ControlLoop
from runtime.inference import InferenceWorker
from runtime.policy import PolicyRunner
from sim.metaworld_robot import MetaWorldRobot
from verifier.envelope import Envelope
from verifier.gate import ChunkGate


@dataclasses.dataclass(frozen=True)
class Condition:
    latency_ms: float
    strategy: str            # merge strategy; "none" for synchronous runs
    mode: str                # "async" | "sync"
    actions_per_chunk: int | None = None


def boundary_jerk(commands: np.ndarray, chunk_ids: list[int], period: float,
                  ee_scale: float) -> list[float]:
    """Squared third differences of the integrated xyz commands spanning each boundary after
    the episode's first chunk (see the module docstring)."""
    if len(commands) < 4:
        return []
    pos = np.cumsum(np.asarray(commands, np.float64)[:, :3] * ee_scale, axis=0)
    pos = np.vstack([np.zeros((3, 3)), pos])  # at rest before the episode
    jerk = (pos[3:] - 3 * pos[2:-1] + 3 * pos[1:-2] - pos[:-3]) / period ** 3  # index = tick
    changes = [t for t in range(1, len(chunk_ids)) if chunk_ids[t] != chunk_ids[t - 1]]
    out = []
    for b in changes[1:]:
        for t in (b, b + 1):
            if t < len(jerk):
                out.append(float(np.sum(jerk[t] ** 2)))
    return out


class _Episodes:
    """Collects per-episode ticks, commands and provenance from the loop's callbacks."""

    def __init__(self, loop_holder: list, target: int, to_command):
        self.loop_holder, self.target, self.to_command = loop_holder, target, to_command
        self.results: list[dict] = []
        self._commands, self._ids = [], []

    def on_tick(self, record) -> None:
        self._commands.append(self.to_command(record.action))
        self._ids.append(-1 if record.chunk is None else record.chunk.chunk_id)

    def on_start(self, epoch: int) -> None:
        self._commands, self._ids = [], []

    def on_end(self, epoch: int, success: bool) -> None:
        self.results.append({"success": bool(success), "ticks": len(self._ids),
                             "commands": np.asarray(self._commands), "ids": list(self._ids)})
        if len(self.results) >= self.target:
            self.loop_holder[0].stop()


def run_condition(policy: PolicyRunner, cond: Condition, tasks, episodes: int, seed: int,
                  max_steps: int) -> dict:
    """Run ``episodes`` per task under ``cond``; returns the JSON row for it."""
    latency = cond.latency_ms / 1e3
    all_eps, rate, desc = [], None, None
    for i, task in enumerate(tasks):
        clock = VirtualClock()
        robot = MetaWorldRobot(task, seed=seed + i, max_steps=max_steps, clock=clock)
        desc = robot.describe()
        rate = policy.manifest.control_rate_hz or desc.control_rate_hz
        queue = ActionQueue(policy.action_dim)
        envelope = Envelope(desc)
        sync = cond.mode == "sync"
        worker = InferenceWorker(
            policy, queue, clock, rate_hz=rate, gate=ChunkGate(envelope), threaded=False,
            simulated_latency_s=latency, sync=sync, actions_per_chunk=cond.actions_per_chunk,
            strategy=None if sync else cond.strategy)
        holder: list = [None]
        eps = _Episodes(holder, episodes, worker.to_command)
        loop = ControlLoop(robot, queue, envelope, clock, rate, eps.on_tick, worker=worker,
                           to_command=worker.to_command, from_command=worker.from_command,
                           on_episode_start=eps.on_start, on_episode_end=eps.on_end)
        holder[0] = loop
        try:
            loop.run(max_ticks=episodes * (max_steps + 1) + 10)
        finally:
            robot.close()
        all_eps.extend(eps.results)
    period = 1.0 / rate
    wins = [e for e in all_eps if e["success"]]
    jerks = [j for e in all_eps for j in boundary_jerk(e["commands"], e["ids"], period,
                                                        desc.ee_scale)]
    return {"latency_ms": cond.latency_ms, "strategy": cond.strategy, "mode": cond.mode,
            "actions_per_chunk": cond.actions_per_chunk, "episodes": len(all_eps),
            "success_rate": round(len(wins) / max(1, len(all_eps)), 4),
            "completion_time_s": (round(float(np.mean([e["ticks"] for e in wins]) * period), 4)
                                  if wins else None),
            "episode_time_s": round(float(np.mean([e["ticks"] for e in all_eps]) * period), 4),
            "success_ticks": [e["ticks"] if e["success"] else None for e in all_eps],
            "boundary_jerk": round(float(np.mean(jerks)), 3) if jerks else None}


def _score(row: dict) -> tuple:
    # the sync setting that finishes the tasks soonest: most successes, then least time
    return (row["success_rate"], -row["episode_time_s"])


def compare(artifact, tasks, episodes: int, latencies_ms, strategies, sync_settings,
            seed: int = 100, max_steps: int = 150, log=print) -> tuple[list[dict], list[dict]]:
    """All conditions. Returns (rows for ``async_vs_sync``, every sync setting tried)."""
    policy = PolicyRunner(artifact, temperature=0.0, seed=seed)
    policy.warmup(3)
    h = policy.horizon
    rows, sweep = [], []
    for lat in latencies_ms:
        for strategy in strategies:
            if strategy == "prefix" and not policy.accepts_prefix:
                continue
            row = run_condition(policy, Condition(lat, strategy, "async", h // 2), tasks,
                                episodes, seed, max_steps)
            log(f"bench runtime: {row}")
            rows.append(row)
        tried = [run_condition(policy, Condition(lat, "none", "sync", s), tasks, episodes,
                               seed, max_steps) for s in sync_settings(h)]
        sweep.extend(tried)
        best = max(tried, key=_score)
        log(f"bench runtime: best sync {best}")
        rows.append(best)
    return rows, sweep
