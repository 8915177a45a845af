"""``tether bench learner --out FILE.json``: the cloud learner measured side by side in one run.

1. ``ingest``: durable ingest from 16 concurrent robot streams against a real learner process
   (sim/bench_ingest.py).
2. ``rollout``: a ~20 MB signed version published to 8 running robot processes: seconds until all
   serve it, control ticks missed (sim/bench_rollout.py).
3. ``learning``: success rate against wall-clock time for a fleet of simulated robots starting from
   the behaviour-cloned policy, at staleness 0 (synchronous) and at the default asynchronous
   staleness (sim/bench_learning.py); ``async_speedup`` = the synchronous run's time to its final
   success over the asynchronous run's time to the same success.

``--only ingest,rollout`` runs a subset; ``--minutes`` shortens the learning runs (15 by default);
``--sim-speed`` sets how fast the learning fleets' simulated clocks run (3x by default).
The learning curves are also drawn to ``FILE.png`` next to the JSON.

``--combine A.json B.json ...`` runs nothing: it reads earlier results and writes their learning
part as one measurement (``sim.bench_learning.combine``: the mean curves, ``async_speedup`` on
them, per run and over every pairing), with the plot.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

from runtime.artifact import write_atomic

PARTS = ("ingest", "rollout", "learning")
DEFAULT_STALENESS = 4  # TrainerConfig's default asynchronous setting, measured against 0
# the learning fleets' simulated clocks: at real time 8 robots and the learner leave about half
# of 2 cores idle, at 3x they use ~93 % with ~1 % of ticks late (README, "Faster than real time")
DEFAULT_SIM_SPEED = 3.0


def plot(runs: list[dict], path: pathlib.Path, faint: list[list[dict]] = ()) -> None:
    """``runs``' curves, and each of ``faint`` (the single runs behind a mean) thin beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, run in enumerate(runs):
        for single in faint:
            c = single[i]["curve"]
            ax.plot([p[0] / 60 for p in c], [p[1] for p in c], color=f"C{i}", lw=0.6, alpha=0.35)
        xs = [p[0] / 60 for p in run["curve"]]
        ys = [p[1] for p in run["curve"]]
        label = "synchronous (staleness 0)" if run["staleness"] == 0 else \
            f"asynchronous (staleness {run['staleness']})"
        if faint:
            label += f", mean of {len(faint)}"
        ax.plot(xs, ys, color=f"C{i}", label=label)
    ax.set_xlabel("wall-clock minutes")
    ax.set_ylabel("success rate (moving window)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tether bench learner", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    p.add_argument("--rt-priority", type=int, default=None,
                   help="rollout: run the robots' control loops under SCHED_FIFO at this priority "
                        "(needs root, CAP_SYS_NICE or ulimit -r; a robot not allowed runs normally)")
    p.add_argument("--minutes", type=float, default=15.0, help="each learning run")
    p.add_argument("--robots", type=int, default=8, help="robots in the learning fleet")
    p.add_argument("--staleness", type=int, default=DEFAULT_STALENESS,
                   help="the asynchronous run's staleness (the other run uses 0)")
    p.add_argument("--supervision", type=float, default=0.0,
                   help="fraction of the learning fleet's episodes a simulated operator watches "
                        "and takes over when a robot stalls (human interventions); the curves "
                        "count the unwatched episodes only")
    p.add_argument("--sim-speed", type=float, default=DEFAULT_SIM_SPEED,
                   help="learning: the simulated robots' clocks run this many times as fast as "
                        "the wall (curves stay in wall-clock seconds; default "
                        f"{DEFAULT_SIM_SPEED:g}; 1: real time)")
    p.add_argument("--combine", nargs="+", metavar="RESULT.json",
                   help="run nothing: combine these results' learning runs into --out")
    a = p.parse_args(argv)
    if a.combine:
        return combine_files(a.combine, pathlib.Path(a.out))
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--only: unknown parts {unknown}; choose from {PARTS}")
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / (out.stem + "-work")
    result = {"host": platform.node(), "machine": platform.processor() or platform.machine(),
              "command": "tether bench learner " + " ".join(argv or sys.argv[1:])}
    t0 = time.monotonic()
    from sim.fleet import stop_on_sigterm

    stop_on_sigterm()  # SIGTERM runs each part's clean-up: no learner or robot left behind

    def save() -> None:
        result["seconds_total"] = round(time.monotonic() - t0, 1)
        write_atomic(out, (json.dumps(result, indent=2) + "\n").encode())

    if "ingest" in parts:
        from sim.bench_ingest import run_ingest

        result["ingest"] = run_ingest(streams=16, work_dir=work / "ingest")
        print(f"bench learner: ingest {result['ingest']}", flush=True)
        save()
    if "rollout" in parts:
        from sim.bench_rollout import run_rollout

        result["rollout"] = run_rollout(robots=8, artifact_mb=20.0, work_dir=work / "rollout",
                                        rt_priority=a.rt_priority)
        print(f"bench learner: rollout {result['rollout']}", flush=True)
        save()
    if "learning" in parts:
        from sim.bench_learning import async_speedup, run_learning

        runs = []
        for staleness in (0, a.staleness):
            run = run_learning(staleness, minutes=a.minutes, robots=a.robots,
                               out_dir=work / f"learning-s{staleness}",
                               supervision=a.supervision, sim_speed=a.sim_speed)
            runs.append(run)
            print(f"bench learner: learning staleness {staleness}: start "
                  f"{run['start_success']:.3f} final {run['final_success']:.3f}", flush=True)
            result["learning"] = runs
            save()
        result["async_speedup"] = async_speedup(runs[0], runs[1])
        plot(runs, out.with_suffix(".png"))
    save()
    print(json.dumps({k: v for k, v in result.items() if k != "learning"}, indent=2))
    return 0


def combine_files(paths: list[str], out: pathlib.Path) -> int:
    from sim.bench_learning import combine

    try:
        results = [json.loads(pathlib.Path(f).read_text()) for f in paths]
        combined = combine(results)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"tether bench learner --combine: {e}", file=sys.stderr)
        return 2
    combined["files"] = list(paths)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, (json.dumps(combined, indent=2) + "\n").encode())
    singles = [sorted(res["learning"], key=lambda r: r["staleness"]) for res in results]
    plot(combined["mean"], out.with_suffix(".png"), faint=singles)
    print(json.dumps({k: v for k, v in combined.items() if k != "mean"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
