"""``tether bench verifier --out FILE.json``: the learned verifier, measured side by side.

1. The pretrained reference policy (cached) and a degraded copy (Gaussian noise of std
   ``--noise`` added to every action) roll out with the verifier off, collecting training
   chunks on their own seeds.
2. The scorer trains on them (focal + advantage regression; Platt calibration and threshold
   fitted on held-out training episodes) and is exported to ONNX.
3. Each policy runs the same task variations (same seeds) with the verifier off / filter /
   filter+resample (P(safe) vetoes, a passing candidate is chosen as ``SchedulerConfig``
   says: by default likelihood selection towards the policy's declared Gaussian over the rows
   that will run): success rate with a Wilson 95% interval, mean steps, and the paired
   difference to "off" with its 95% interval. One ablation, the degraded policy in filter mode
   with the scorer's veto switched off (threshold 0), separates the selection from the veto.
4. Latency of one scheduler decision with K = 1, 4, 16, 64 candidates (ORT on CPU, one
   thread), ECE of P(safe) and the false-reject rate on the held-out evaluation episodes
   (verifier off).
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import tempfile
import time

import numpy as np

from verifier.scheduler import SchedulerConfig, VerifierScheduler

PRETRAINED = ".tether-cache/pretrained"


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def paired_ci(a: np.ndarray, b: np.ndarray) -> dict:
    d = np.asarray(a, float) - np.asarray(b, float)
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else 0.0
    return {"diff": round(float(d.mean()), 4),
            "ci95": [round(float(d.mean() - 1.96 * se), 4), round(float(d.mean() + 1.96 * se), 4)]}


def rollouts(runner, tasks, episodes, seed, scheduler_for, noise, log, stats=None):
    """``episodes`` per task on the task's fixed seeds; ``stats`` (a list) collects each
    task's scheduler stats."""
    from sim.metaworld_robot import MetaWorldRobot
    from sim.verifier_rollout import run_episode
    from verifier.envelope import Envelope

    out = []
    for ti, task in enumerate(tasks):
        robot = MetaWorldRobot(task, seed=seed + 101 * ti)
        envelope = Envelope(robot.describe())
        scheduler = scheduler_for(envelope)
        rng = np.random.default_rng(seed * 31 + ti)
        try:
            out.extend(run_episode(robot, runner, scheduler, envelope, rng, noise=noise)
                       for _ in range(episodes))
        finally:
            robot.close()
        if stats is not None:
            stats.append(scheduler.stats())
    log(f"  {len(out)} episodes, success {np.mean([e.success for e in out]):.3f}")
    return out


def to_data(episodes, lookahead: int, gamma: float, baseline: dict | None, first_id: int):
    """Episodes -> ScorerData; returns (data, baseline) with baseline {(task, i): mean return}."""
    from learner.verifier_train import ScorerData, chunk_labels, discounted_returns

    parts, returns = [], []
    for e in episodes:
        if not e.rows:
            continue
        safe = chunk_labels([(r["start"], r["n"]) for r in e.rows], e.clamped, e.steps,
                            e.failed, lookahead)
        g = discounted_returns(np.array([r["reward"] for r in e.rows]), gamma)
        returns.append((e.task, g))
        parts.append((e, safe, g))
    if baseline is None:
        acc: dict = {}
        for task, g in returns:
            for i, x in enumerate(g):
                acc.setdefault((task, i), []).append(x)
        baseline = {k: float(np.mean(v)) for k, v in acc.items()}
        baseline["_scale"] = float(np.std([x for _, g in returns for x in g]) or 1.0)
    scale = baseline["_scale"]
    rows = []
    for j, (e, safe, g) in enumerate(parts):
        adv = [(x - baseline.get((e.task, i), np.mean(g))) / scale for i, x in enumerate(g)]
        rows.append(ScorerData(
            features=np.stack([r["features"] for r in e.rows]),
            state=np.stack([r["state"] for r in e.rows]),
            mean=np.stack([r["mean"] for r in e.rows]),
            actions=np.stack([r["actions"] for r in e.rows]),
            safe=safe, advantage=np.asarray(adv, np.float32),
            led_to_success=np.full(len(e.rows), e.success),
            episode=np.full(len(e.rows), first_id + j, np.int64)))
    return ScorerData.concat(rows), baseline


def latency(scorer, runner, ks, reps: int, execute: int, resample: SchedulerConfig,
            noise: float) -> list[dict]:
    """One scheduler decision (draws, ORT scorer, selection), filter mode with K candidates;
    and the ``resample`` config on the degraded policy's candidates (its extra rounds)."""
    from verifier.metrics import percentiles_ms
    from sim.verifier_rollout import make_draw

    out = runner.infer(runner.synthetic_observation())
    state = np.zeros(runner.manifest.inputs["state_dim"], np.float32)
    rng = np.random.default_rng(0)
    rows = []
    runs = [(k, "filter", SchedulerConfig(mode="filter", k=k, threshold=0.0), 0.0) for k in ks]
    runs.append((resample.k, "resample (degraded)", resample, noise))
    for k, mode, config, noise_k in runs:
        s = VerifierScheduler(scorer, config)
        draw = make_draw(out.mean, out.log_std, rng, 1.0, noise_k)
        secs, rounds = [], []
        for i in range(reps + 20):
            _, v = s.choose(draw, runner.horizon, runner.action_dim, features=out.features,
                            state=state, mean=out.mean, log_std=out.log_std, rows=(0, execute))
            if i >= 20:
                secs.append(v.seconds)
                rounds.append(v.rounds)
        rows.append({"k": k, "mode": mode, **percentiles_ms(secs), "reps": reps,
                     "mean_rounds": round(float(np.mean(rounds)), 2)})
    return rows


def _row(name, mode, eps, tasks) -> dict:
    wins = np.array([e.success for e in eps], float)
    return {"policy": name, "mode": mode, "episodes": len(eps),
            "success_rate": round(float(wins.mean()), 4),
            "ci95": wilson(int(wins.sum()), len(eps)),
            "mean_steps": round(float(np.mean([e.steps for e in eps])), 2),
            "hold_ticks_per_episode": round(float(np.mean([e.holds for e in eps])), 2),
            "vetoed_chunks_per_episode": round(float(np.mean([e.rejected_chunks for e in eps])), 2),
            "by_task": {t: round(float(np.mean([e.success for e in eps if e.task == t])), 4)
                        for t in tasks}}


def run(args, log=print) -> dict:
    from learner.pretrain import ensure_pretrained
    from learner.verifier_train import ScorerTrainConfig, predict, train_scorer
    from runtime.policy import PolicyRunner
    from sim.tasks import DEFAULT_TASKS
    from verifier.metrics import expected_calibration_error, false_reject_rate
    from verifier.scorer import OnnxScorer

    t0 = time.monotonic()
    tasks = tuple(args.tasks.split(",")) if args.tasks else DEFAULT_TASKS
    artifact = ensure_pretrained(DEFAULT_TASKS, PRETRAINED, log=log)
    runner = PolicyRunner(artifact, seed=args.seed)
    policies = {"reference": 0.0, "degraded": args.noise}
    off = lambda env: VerifierScheduler(None, SchedulerConfig(mode="off"), env)  # noqa: E731
    tcfg = ScorerTrainConfig(lookahead_ticks=args.lookahead, seed=args.seed)
    log("collecting training episodes (verifier off)")
    train_eps = []
    for i, (name, noise) in enumerate(policies.items()):
        train_eps += rollouts(runner, tasks, args.train_episodes, 50_000 + 1000 * i, off, noise, log)
    data, baseline = to_data(train_eps, tcfg.lookahead_ticks, 0.9, None, 0)
    trained = train_scorer(data, tcfg)

    def config(mode: str, **kw) -> SchedulerConfig:
        return SchedulerConfig(mode=mode, k=args.k, budget_ms=args.budget_ms,
                               max_rounds=args.max_rounds, selection=args.selection,
                               advantage_weight=args.advantage_weight,
                               safety_weight=args.safety_weight,
                               proximity_weight=args.proximity_weight, seed=args.seed, **kw)

    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "verifier.onnx"
        path.write_bytes(trained.onnx_bytes())
        scorer = OnnxScorer(path, trained.threshold, state_mean=runner._state_mean,
                             state_std=runner._state_std)
        results, held_out, per_episode = [], [], {}
        conditions = [(name, mode, {}) for name in policies
                      for mode in ("off", "filter", "resample")]
        if not args.no_ablation:
            conditions.append(("degraded", "filter", {"threshold": 0.0}))
        ablations = []
        for name, mode, kw in conditions:
            log(f"evaluating {name} / {mode}{' (no veto)' if kw else ''}")
            make = (off if mode == "off" else
                    (lambda env, m=mode, kw=kw: VerifierScheduler(scorer, config(m, **kw), env)))
            stats: list = []
            eps = rollouts(runner, tasks, args.episodes, args.seed, make, policies[name], log,
                           stats)
            row = _row(name, mode, eps, tasks)
            if mode != "off":
                row["verifier"] = {key: sum(int(st.get(key, 0)) for st in stats) for key in
                                   ("chunks_checked", "chunks_rejected", "veto_overrides",
                                    "scorers_distrusted", "resample_rounds")}
            wins = np.array([e.success for e in eps], float)
            if mode == "off":
                per_episode[name] = wins
                held_out += eps
            else:
                row["vs_off"] = paired_ci(wins, per_episode[name])
            if kw:
                ablations.append({**row, "ablation": "selection only: the scorer's veto off "
                                                     "(threshold 0)"})
            else:
                results.append(row)
        lat = latency(scorer, runner, (1, 4, 16, 64), args.latency_reps, 4,
                      config("resample"), args.noise)
    test, _ = to_data(held_out, tcfg.lookahead_ticks, 0.9, baseline, 10 ** 6)
    p, _ = predict(trained.model, test)
    good = (test.safe > 0.5) & test.led_to_success
    return {
        "success": results, "ablations": ablations, "latency_ms": lat,
        "ece": round(expected_calibration_error(p, test.safe), 4),
        "false_reject_rate": round(false_reject_rate(p, good, trained.threshold), 4),
        "held_out_chunks": len(test), "held_out_unsafe_frac": round(float(1 - test.safe.mean()), 4),
        "threshold": round(trained.threshold, 4),
        "calibration": [round(x, 4) for x in trained.calibration],
        "train": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in trained.metrics.items()},
        "settings": {"tasks": list(tasks), "k": args.k, "noise": args.noise,
                     "selection": args.selection, "budget_ms": args.budget_ms,
                     "max_rounds": args.max_rounds, "advantage_weight": args.advantage_weight,
                     "safety_weight": args.safety_weight,
                     "proximity_weight": args.proximity_weight,
                     "train_episodes_per_task_and_policy": args.train_episodes,
                     "episodes_per_task": args.episodes, "lookahead_ticks": args.lookahead,
                     "intervention_tol": 0.2, "seed": args.seed, "execute_per_chunk": 4,
                     "policy_temperature": 1.0},
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tether bench verifier", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes per task and condition")
    p.add_argument("--train-episodes", type=int, default=40, help="training episodes per task and policy")
    p.add_argument("--tasks", default="", help="comma-separated Meta-World tasks (default: the fleet's)")
    p.add_argument("--k", type=int, default=64, help="candidates per chunk")
    p.add_argument("--noise", type=float, default=0.5, help="action noise std of the degraded policy")
    p.add_argument("--selection", default="likelihood", choices=("likelihood", "rank"),
                   help="how a passing candidate is chosen (SchedulerConfig.selection)")
    p.add_argument("--budget-ms", type=float, default=SchedulerConfig.budget_ms,
                   help="resample budget per chunk")
    p.add_argument("--max-rounds", type=int, default=4, help="sampling rounds in resample mode")
    p.add_argument("--proximity-weight", type=float, default=1.0,
                   help="rank selection: weight of a candidate's distance from the policy mean")
    p.add_argument("--advantage-weight", type=float, default=0.0,
                   help="weight of the predicted advantage among passing candidates")
    p.add_argument("--safety-weight", type=float, default=0.0,
                   help="weight of P(safe) among passing candidates")
    p.add_argument("--lookahead", type=int, default=8, help="T: ticks after a chunk for its label")
    p.add_argument("--latency-reps", type=int, default=500)
    p.add_argument("--no-ablation", action="store_true", help="skip the no-veto ablation run")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.episodes < 2 or a.train_episodes < 2:
        p.error("--episodes and --train-episodes must be >= 2")
    result = run(a)
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for r in result["success"] + result["ablations"]:
        print(f"{r['policy']:9s} {r['mode']:8s} success {r['success_rate']:.3f} {r['ci95']} "
              f"steps {r['mean_steps']:.1f} {r.get('vs_off', '')} {r.get('ablation', '')}")
    print("latency", result["latency_ms"], "ece", result["ece"], "false_reject",
          result["false_reject_rate"])
    return 0
