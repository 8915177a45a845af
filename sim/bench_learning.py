"""Benchmark part 3 (learning): fleet success rate against wall-clock time, starting from the
behaviour-cloned policy, at a given staleness S (0 = synchronous on-policy).

Each run is a real fleet (``sim.fleet``: a ``tether learner`` process and N ``tether robot``
processes on loopback) trained live. The curve is the success rate of the fleet's most recent
``window`` episodes, read from the robots' status files about once a second. By default the
window is ``WINDOW_EPISODES`` times the sim speed, so that it spans about the same wall time at
any speed (at 3x, 48 episodes are ten seconds of the fleet and +-0.07 of binomial noise).
``start_success`` is the first full window (the BC policy, mostly version 1), ``final_success``
the last window before the robots stop.

Tasks (``LEARNING_TASKS``, cloned with ``LEARNING_PRETRAIN``): the goal asks for tasks where the
behaviour-cloned policy succeeds 20-60 % of the time, each of them. The default robot tasks
(reach, push, door-open) do not qualify one by one (push starts near 0.1, door-open near 0.8);
reach-v3, lever-pull-v3 and dial-turn-v3 cloned for 500 steps start at about 0.2, 0.45 and 0.3
with the robots' sampled actions (``python -m sim.learning_lab``, 100 episodes a task; the
README's learning section has the screening). In the fleet dial-turn starts lower, 0.12-0.15.

``.venv/bin/python -m sim.bench_learning --staleness 0 --minutes 2 --robots 4``
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import numpy as np

LEARNING_TASKS: tuple[str, ...] = ("reach-v3", "lever-pull-v3", "dial-turn-v3")
LEARNING_PRETRAIN: dict = {"steps": 500}
WINDOW_EPISODES = 48
BLOCK_S = 180.0  # per-task and whole-fleet success in blocks of this much wall time
PUBLISH_INTERVAL_S = 10.0


def default_window(sim_speed: float) -> int:
    """Episodes per curve point: ``WINDOW_EPISODES`` at real time, scaled with the sim speed."""
    return max(1, round(WINDOW_EPISODES * max(sim_speed, 1.0)))


def moving_success(samples: list, window: int, until_s: float | None = None,
                   every_s: float = 5.0) -> list[list[float]]:
    """[[seconds, success rate of the last ``window`` episodes], ...] from cumulative
    (seconds, episodes, successes) samples; a point every ``every_s`` once half a window has
    ended (until then a rate says little)."""
    pts = [s for s in samples if until_s is None or s[0] <= until_s + 1.0]
    curve, next_t = [], 0.0
    for i, (t, eps, succ) in enumerate(pts):
        if eps < max(1, window // 2) or t < next_t:
            continue
        j = i  # the latest sample at least a window before this one
        while j > 0 and eps - pts[j][1] < window:
            j -= 1
        e0, s0 = (pts[j][1], pts[j][2]) if eps - pts[j][1] >= window else (0, 0)
        curve.append([round(t, 1), round((succ - s0) / (eps - e0), 4)])
        next_t = t + every_s
    return curve


def block_success(samples: list, block_s: float, until_s: float) -> list[list[float]]:
    """[[block end seconds, success rate, episodes], ...] over consecutive ``block_s`` blocks of
    wall time up to ``until_s``, from cumulative (seconds, episodes, successes) samples; a
    block without an ended episode has rate None."""
    out, prev, end = [], (0, 0), block_s
    while end <= until_s + 1e-9:
        upto = [s for s in samples if s[0] <= end + 1.0]
        eps, succ = (upto[-1][1], upto[-1][2]) if upto else prev
        n = eps - prev[0]
        out.append([round(end, 1), round((succ - prev[1]) / n, 4) if n > 0 else None, n])
        prev, end = (eps, succ), end + block_s
    return out


def time_to(curve: list, level: float) -> float | None:
    """Seconds until the curve first reaches ``level`` (None: never)."""
    return next((t for t, rate in curve if rate >= level - 1e-9), None)


def async_speedup(sync: dict, asynchronous: dict) -> float | None:
    """The synchronous run's time to its final success over the asynchronous run's time to the
    same success (None when the asynchronous run never reaches it)."""
    level = sync["final_success"]
    t_sync, t_async = time_to(sync["curve"], level), time_to(asynchronous["curve"], level)
    if t_sync is None or t_async is None or t_async <= 0:
        return None
    return round(t_sync / t_async, 3)


def mean_curve(curves: list[list], every_s: float = 5.0) -> list[list[float]]:
    """The pointwise mean of several runs' curves, interpolated on a common grid every
    ``every_s`` seconds over the span they all cover."""
    start = max(c[0][0] for c in curves)
    end = min(c[-1][0] for c in curves)
    if end < start:
        raise ValueError("the curves do not overlap in time")
    grid = np.arange(start, end + 1e-9, every_s)
    if grid[-1] < end:
        grid = np.append(grid, end)
    ys = np.mean([np.interp(grid, [p[0] for p in c], [p[1] for p in c]) for c in curves], axis=0)
    return [[round(float(t), 1), round(float(y), 4)] for t, y in zip(grid, ys)]


def combine(results: list[dict]) -> dict:
    """Several side-by-side results (``tether bench learner`` JSONs) as one measurement: the
    mean curve of each staleness and ``async_speedup`` on those means, next to each run's own
    and every pairing of a synchronous with an asynchronous run (a single run's ratio swings
    with where its curves start and end)."""
    pairs = []
    for i, result in enumerate(results):
        runs = result.get("learning") or []
        sync = [r for r in runs if r["staleness"] == 0]
        other = [r for r in runs if r["staleness"] > 0]
        if len(sync) != 1 or len(other) != 1:
            raise ValueError(f"result {i}: needs one synchronous and one asynchronous learning "
                             f"run, has staleness {[r['staleness'] for r in runs]}")
        pairs.append((sync[0], other[0]))
    if len({a["staleness"] for _, a in pairs}) != 1:
        raise ValueError("the asynchronous runs differ in staleness: "
                         f"{sorted({a['staleness'] for _, a in pairs})}")
    means = []
    for k in (0, 1):
        curve = mean_curve([pair[k]["curve"] for pair in pairs])
        means.append({"staleness": pairs[0][k]["staleness"], "curve": curve,
                      "start_success": curve[0][1], "final_success": curve[-1][1],
                      "runs_final_success": [pair[k]["final_success"] for pair in pairs]})
    crossed = [async_speedup(s, a) for s, _ in pairs for _, a in pairs]
    # an asynchronous run that never reaches the level counts as the slowest (0) in the median
    median = float(np.median([0.0 if x is None else x for x in crossed]))
    return {"runs": len(pairs), "mean": means, "async_speedup": async_speedup(*means),
            "async_speedup_per_run": [async_speedup(s, a) for s, a in pairs],
            "async_speedup_pairs": crossed, "async_speedup_pairs_median": round(median, 3)}


def run_learning(staleness: int, minutes: float = 15.0, robots: int = 8, tasks=None,
                 out_dir=None, *, window: int | None = None,
                 publish_interval_s: float = PUBLISH_INTERVAL_S, seed: int = 0,
                 cache_dir: str = ".tether-cache/pretrained", supervision: float = 0.0,
                 trainer: dict | None = None, sim_speed: float = 1.0,
                 pretrain: dict | None = None) -> dict:
    """One learning run at staleness S; returns {"staleness", "curve", "start_success",
    "final_success", "episodes", "versions", ...}. Canary rollout is off (fraction 0): every
    robot gets each version at once, so S alone sets how synchronous the fleet is."""
    from sim.fleet import FleetConfig, run_fleet

    window = window or default_window(sim_speed)
    out = pathlib.Path(out_dir) if out_dir else pathlib.Path(tempfile.mkdtemp(prefix="tether-learning-"))
    config = FleetConfig(robots=robots, minutes=minutes, out=str(out / f"staleness-{staleness}"),
                         tasks=tuple(tasks or LEARNING_TASKS), seed=seed,
                         publish_interval_s=publish_interval_s, min_episodes=robots,
                         staleness=staleness, canary_fraction=0.0, cache_dir=cache_dir,
                         supervision=supervision, trainer=dict(trainer or {}),
                         sim_speed=sim_speed, pretrain=dict(
                             LEARNING_PRETRAIN if pretrain is None else pretrain))
    summary = run_fleet(config)
    samples = summary["samples"]
    curve = moving_success(samples, window, until_s=minutes * 60)
    episodes = max((s[1] for s in samples), default=0)
    first = next((s for s in samples if s[1] >= window), samples[-1] if samples else [0, 0, 0])
    updates = _updates(pathlib.Path(config.out) / "learner" / "updates.jsonl")
    statuses = _statuses(config.out)
    return {
        "staleness": staleness, "robots": robots, "minutes": minutes, "tasks": list(config.tasks),
        "supervision": supervision, "trainer": dict(trainer or {}), "sim_speed": sim_speed,
        "seed": seed, "pretrain": dict(config.pretrain),
        "supervised_episodes": sum(int(s.get("supervised_episodes", 0)) for s in statuses),
        "interventions": sum(int(s.get("interventions", 0)) for s in statuses),
        "window_episodes": window, "curve": curve,
        "blocks": block_success(samples, BLOCK_S, minutes * 60),
        # each task's own blocks: a fleet-wide gain can hide a task that was unlearned
        "per_task_blocks": {task: block_success(rows, BLOCK_S, minutes * 60)
                            for task, rows in summary.get("task_samples", {}).items()},
        "start_success": round(first[2] / first[1], 4) if first[1] else 0.0,
        "final_success": curve[-1][1] if curve else 0.0,
        "episodes": episodes, "versions": summary["latest_version"],
        "success_rate_by_version": summary["success_rate_by_version"],
        "gate_wait_frac": _gate_wait_frac(statuses),
        "updates": len(updates),
        "records_trained": sum(u.get("records", 0) for u in updates),
        "human_records_trained": sum(u.get("human_records", 0) for u in updates),
        "dropped": {k: sum(u.get("dropped", {}).get(k, 0) for u in updates)
                    for k in ("stale", "unusable", "masked", "incomplete")},
        "out": str(config.out),
    }


def _updates(path: pathlib.Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _gate_wait_frac(statuses: list[dict]) -> float:
    """The fraction of control ticks robots spent waiting at the staleness gate."""
    ticks = sum(s.get("control", {}).get("ticks", 0) for s in statuses)
    return round(sum(s.get("gate_wait_ticks", 0) for s in statuses) / ticks, 4) if ticks else 0.0


def _statuses(out: str) -> list[dict]:
    found = []
    for path in sorted(pathlib.Path(out).glob("robots/*/status.json")):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            pass
    return found


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.bench_learning", description=__doc__.splitlines()[0])
    p.add_argument("--staleness", default="0", help="comma-separated staleness values, e.g. 0,4")
    p.add_argument("--minutes", type=float, default=15.0)
    p.add_argument("--robots", type=int, default=8)
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: LEARNING_TASKS)")
    p.add_argument("--window", type=int, default=None,
                   help=f"episodes per curve point (default {WINDOW_EPISODES} x the sim speed)")
    p.add_argument("--publish-interval", type=float, default=PUBLISH_INTERVAL_S)
    p.add_argument("--out-dir", default=None, help="where the fleets write (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument("--supervision", type=float, default=0.0,
                   help="fraction of episodes a simulated operator watches (sim/supervisor.py); "
                        "the curve counts the other episodes only")
    p.add_argument("--trainer", default="{}",
                   help="the learner's TrainerConfig overrides, as JSON (tether learner --trainer)")
    p.add_argument("--pretrain", default=None,
                   help="the cloned start's settings (learner.pretrain.PretrainConfig fields), as "
                        "JSON (default: LEARNING_PRETRAIN)")
    p.add_argument("--seed", type=int, default=0,
                   help="the fleet's seed: the cloned policy (pretrained per seed), the robots' "
                        "episodes and the trainer")
    p.add_argument("--sim-speed", type=float, default=1.0,
                   help="the simulated robots' clocks run this many times as fast as the wall "
                        "(the curve stays in wall-clock seconds; default 1: real time)")
    a = p.parse_args(argv)
    tasks = tuple(t for t in a.tasks.split(",") if t) or None
    runs = [run_learning(int(s), a.minutes, a.robots, tasks, a.out_dir, window=a.window,
                         publish_interval_s=a.publish_interval, supervision=a.supervision,
                         trainer=json.loads(a.trainer), sim_speed=a.sim_speed, seed=a.seed,
                         pretrain=None if a.pretrain is None else json.loads(a.pretrain))
            for s in a.staleness.split(",")]
    result = {"learning": runs}
    sync = next((r for r in runs if r["staleness"] == 0), None)
    others = [r for r in runs if r["staleness"] > 0]
    if sync and others:
        result["async_speedup"] = async_speedup(sync, others[0])
    text = json.dumps(result, indent=1)
    if a.out:
        pathlib.Path(a.out).write_text(text)
    for r in runs:
        print(f"staleness {r['staleness']}: start {r['start_success']:.3f} -> final "
              f"{r['final_success']:.3f} over {r['episodes']} episodes, {r['versions']} versions")
    if "async_speedup" in result:
        print(f"async speedup: {result['async_speedup']}")
    print(text if not a.out else f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
