"""A fast lab for trainer settings: the fleet's robot pipeline on virtual clocks, feeding the
trainer directly.

Each iteration rolls the registry's latest version out on every task (the real ``ControlLoop``,
``InferenceWorker``, ``Recorder`` and ``PolicyRunner`` with its sampling, one ``MetaWorldRobot``
per task on a ``VirtualClock``), hands the records to ``Trainer.train_on`` and publishes (signed
ONNX export) -- synchronous on-policy, S = 0. No gRPC, store or wall clock: on one core it runs
about 35 times faster than a real-time robot, so a trainer setting can be tried on as many
episodes as a 15-minute fleet collects in a few minutes. What it does not measure (ingest,
rollout, asynchrony) is ``sim.bench_learning``'s part.

``.venv/bin/python -m sim.learning_lab --iterations 50 --episodes 6 --out lab.jsonl``
``--trainer '{"lr": 3e-5}'`` overrides ``TrainerConfig`` fields, ``--pretrain
'{"episodes_per_task": 100}'`` the behaviour-cloned start; ``--supervision 0.5`` adds the
simulated operator (its watched episodes are left out of the success rates).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

from sim.tasks import DEFAULT_TASKS

MAX_STEPS = 150  # the fleet's episode length (MetaWorldRobot's default)


class _Sink:
    """The recorder's spool, in memory: sequence numbers and the records it was handed."""

    def __init__(self):
        self.seq = 0
        self.records: list = []

    def next_record_seq(self) -> int:
        self.seq += 1
        return self.seq

    def append(self, batch) -> None:
        self.records.extend(batch)


def rollout(artifact, robot, clock, task: str, episodes: int, seed: int,
            max_steps: int = MAX_STEPS, temperature: float = 1.0,
            verifier: dict | None = None) -> tuple[list, list]:
    """(records, outcomes) of ``episodes`` episodes; an outcome is None for a watched episode.
    ``verifier``: ``SchedulerConfig`` fields; the robot then runs the scorer the version ships
    (as ``tether robot`` does), else only the gate's invariants."""
    from runtime.chunks import ActionQueue
    from runtime.control import ControlLoop
    from runtime.inference import InferenceWorker
    from runtime.policy import PolicyRunner
    from runtime.recorder import Recorder
    from verifier.envelope import Envelope
    from verifier.gate import ChunkGate

    policy = PolicyRunner(artifact, seed=seed, temperature=temperature)
    desc = robot.describe()
    rate = policy.manifest.control_rate_hz or desc.control_rate_hz
    queue, envelope = ActionQueue(policy.action_dim), Envelope(desc)
    gate = ChunkGate(envelope)
    if verifier is not None:
        from verifier.scheduler import SchedulerConfig, VerifierScheduler
        from verifier.scorer import OnnxScorer
        policy.scorer = OnnxScorer.from_artifact(artifact, policy.manifest)
        gate = VerifierScheduler(config=SchedulerConfig(**{"budget_ms": 1e9, "seed": seed,
                                                           **verifier}), envelope=envelope)
    worker = InferenceWorker(policy, queue, clock, rate_hz=rate, gate=gate,
                             threaded=False, simulated_latency_s=policy.latency["total"].quantile(0.5))
    sink = _Sink()
    recorder = Recorder(sink, "lab", task, background=False, envelope=envelope)
    outcomes: list = []
    loop_ref: list = []

    def on_end(epoch: int, success: bool) -> None:
        recorder.end_episode()
        outcomes.append(None if getattr(robot, "supervised", False) else bool(success))
        if len(outcomes) >= episodes:
            loop_ref[0].stop()

    loop = ControlLoop(robot, queue, envelope, clock, rate, recorder.on_tick, worker=worker,
                       to_command=worker.to_command, from_command=worker.from_command,
                       on_episode_start=lambda epoch: recorder.start_episode(),
                       on_episode_end=on_end)
    loop_ref.append(loop)
    loop.run(max_ticks=episodes * (max_steps + 1) + 10)
    return sink.records, outcomes


def run(iterations: int, episodes: int, tasks=DEFAULT_TASKS, trainer: dict | None = None,
        supervision: float = 0.0, seed: int = 0, cache_dir: str = ".tether-cache/pretrained",
        work_dir=None, log=print, pretrain: dict | None = None,
        temperature: float = 1.0, verifier: dict | None = None) -> list[dict]:
    """One JSON-able row per iteration: per-task success of the unwatched episodes, counts,
    and the update's metrics. ``temperature`` scales the robots' sampling noise (a robot's
    ``--temperature``; 0 = the mean). ``verifier``: the robots' ``SchedulerConfig`` fields; the
    trainer then retrains the scorer at every publish (else never)."""
    import torch

    from learner.pretrain import ensure_pretrained
    from learner.registry import Registry
    from learner.signing import SigningKey
    from learner.store import ExperienceStore
    from learner.trainer import Trainer, TrainerConfig
    from learner.verifier_fleet_train import FleetScorerConfig
    from runtime.clock import VirtualClock
    from sim.metaworld_robot import MetaWorldRobot

    torch.set_num_threads(1)
    pretrain = dict(pretrain or {})  # "tasks": the policy's (default: sim.tasks.DEFAULT_TASKS)
    artifact = ensure_pretrained(tuple(pretrain.pop("tasks", DEFAULT_TASKS)), cache_dir,
                                 seed=seed, **pretrain)
    work = pathlib.Path(work_dir or tempfile.mkdtemp(prefix="tether-lab-"))
    registry = Registry(work / "registry", signing_key=SigningKey.generate())
    registry.import_initial(artifact, artifact.parent / "model.pt")
    store = ExperienceStore(work / "experience")  # the trainer's feed; the lab hands records over
    verifier = dict(verifier) if verifier is not None else None
    fleet_scorer = FleetScorerConfig(every=0)
    if verifier is not None:  # "advantage_lambda" is the learner's (the scorer's target)
        fleet_scorer = FleetScorerConfig(
            every=1, advantage_lambda=float(verifier.pop("advantage_lambda", 1.0)))
    settings = dict(staleness=0, verifier=fleet_scorer, seed=seed, **(trainer or {}))
    from learner.demos import DemoSet
    model = Trainer(store, registry, TrainerConfig(**settings),
                    demos=DemoSet.load(artifact.parent / "demos.npz"))
    clocks = {t: VirtualClock() for t in tasks}
    robots = {t: MetaWorldRobot(t, seed=1000 * seed + i, clock=clocks[t], max_steps=MAX_STEPS,
                                supervision=supervision) for i, t in enumerate(tasks)}
    rows, t0 = [], time.monotonic()
    try:
        for it in range(iterations):
            version = registry.latest()
            records, row = [], {"iteration": it, "version": version, "tasks": {}}
            for i, task in enumerate(tasks):
                recs, outcomes = rollout(registry.artifact_dir(version), robots[task],
                                         clocks[task], task, episodes,
                                         seed=seed * 7919 + it * 101 + i,
                                         temperature=temperature, verifier=verifier)
                records += recs
                own = [o for o in outcomes if o is not None]
                row["tasks"][task] = {"episodes": len(own), "successes": int(sum(own)),
                                      "supervised": len(outcomes) - len(own),
                                      # the dense reward per episode (all episodes, watched too)
                                      "return": round(sum(r.reward for r in recs)
                                                      / max(len(outcomes), 1), 1)}
            m = model.train_on(records)
            model.remember(records)  # the replay window, which the scorer trains on
            model.publish()
            row.update({k: m.get(k) for k in ("records", "human_records", "kl_update",
                                               "clip_frac", "loss_value", "loss_pg", "log_std",
                                               "ess", "loss_imitation", "imitation_fleet",
                                               "seconds")})
            # candidates the robots' verifier drew per chunk (1: no scorer ran)
            row["candidates"] = round(sum(r.verifier.candidates for r in records)
                                      / max(len(records), 1), 2)
            scorer = getattr(model, "_scorer", None)
            if scorer is not None:
                row["scorer"] = {k: round(float(scorer.metrics[k]), 3)
                                 for k in ("calib_auc", "calib_adv_corr", "loss_adv")}
            row["wall_s"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            log(json.dumps(row))
    finally:
        for r in robots.values():
            r.close()
        store.close()
        if work_dir is None:  # a registry of every version and the store: ~0.25 GB a run
            shutil.rmtree(work, ignore_errors=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.learning_lab", description=__doc__.splitlines()[0])
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--episodes", type=int, default=6, help="per task per iteration")
    p.add_argument("--tasks", default="", help="comma-separated (default: sim.tasks.DEFAULT_TASKS)")
    p.add_argument("--trainer", default="{}", help="TrainerConfig overrides, as JSON")
    p.add_argument("--supervision", type=float, default=0.0)
    p.add_argument("--pretrain", default="{}",
                   help="pretraining settings (learner.pretrain.PretrainConfig fields), as JSON; "
                        "the cache keeps one policy per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the robots' sampling temperature (0: mean actions)")
    p.add_argument("--verifier", default=None,
                   help="run the shipped scorer on the robots with these SchedulerConfig fields, "
                        "as JSON (e.g. '{\"selection\": \"rank\", \"advantage_weight\": 1}'), "
                        "and retrain it at every publish")
    p.add_argument("--out", default=None, help="write one JSON line per iteration here")
    a = p.parse_args(argv)
    tasks = tuple(t for t in a.tasks.split(",") if t) or DEFAULT_TASKS
    out = open(a.out, "w") if a.out else None

    def log(line: str) -> None:
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    rows = run(a.iterations, a.episodes, tasks, json.loads(a.trainer), a.supervision, a.seed,
               log=log, pretrain=json.loads(a.pretrain), temperature=a.temperature,
               verifier=None if a.verifier is None else json.loads(a.verifier))
    for start in range(0, len(rows), 10):
        block = rows[start:start + 10]
        n = sum(t["episodes"] for r in block for t in r["tasks"].values())
        s = sum(t["successes"] for r in block for t in r["tasks"].values())
        print(f"iterations {start}-{start + len(block) - 1}: success {s}/{n}"
              f" = {s / n:.3f}" if n else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
