"""Weight rollout benchmark (issue 5, benchmark part 2): how fast a new signed version of a
~20 MB policy reaches a running fleet, and whether any robot misses a control tick meanwhile.

A real learner gRPC service (store, signed registry, rollout controller without canaries: this
measures distribution, not the canary's wait) runs in this process; ``robots`` real ``tether
robot`` processes (Meta-World, fast camera) run from the learner's signed version 1 and are
ticking and streaming experience before anything is published. Then ``rounds`` new versions
(same shapes, all weights different: the worst case for a transfer) are published one after the
other, each timed:

    seconds_to_all         commit of version 2 in the registry -> the last robot's swap
    per_robot_s            the same, per robot (swap = the inference worker switched policies,
                           at a chunk boundary; read from ``swapped_at`` in status.json)
    announce_to_serve_p50_s  p50 over robots of (announcement received -> swap)
    missed_ticks           deadline misses + mid-episode underruns near the swap, summed over
                           robots, from the commit until swap_window_s after the last swap;
    baseline_missed_ticks  the same counters over 2 s before the publish (the machine's load
                           alone)

The headline figures are the median round's time and the worst round's missed ticks; every
round is in ``rounds``. Counters come from status.json files written every 0.2 s, so a window's
edges are accurate to about that.

The artifact's size comes from the token embedding (a large vocabulary, as VLAs have): a real
weight tensor the graph gathers from, so the ONNX loads and runs like any other policy.
All timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by the processes of a machine).

``.venv/bin/python -m sim.bench_rollout [--robots 8] [--artifact-mb 20] [--rounds 3]
[--out FILE]``
prints the JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

TASKS = ("reach-v3", "push-v3", "door-open-v3", "drawer-close-v3")
SWAP_WINDOW_S = 1.0   # the node counts underruns this long after a swap against the swap
STATUS_INTERVAL_S = 0.2


def _model(artifact_mb: float, seed: int):
    """A reference VLA for the Meta-World Sawyer whose exported ONNX is ~artifact_mb MB."""
    import torch

    from learner.model import ReferenceVLA, VLAConfig
    from robots.description import load_description

    desc = load_description("sawyer_metaworld")
    cam = desc.cameras[0]
    base = VLAConfig(action_dim=desc.action_dim, state_dim=desc.state_dim, cameras=(cam.name,),
                     image_hw=(cam.height, cam.width), channels=cam.channels)
    small = ReferenceVLA(base)
    size = sum(p.numel() for p in small.parameters()) * 4
    row = small.embed.embedding_dim * 4
    vocab = max(base.vocab, base.vocab + int((artifact_mb * 1e6 - size) / row))
    torch.manual_seed(seed)
    return ReferenceVLA(dataclasses.replace(base, vocab=vocab)).eval(), desc


def _child_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def _read(path: pathlib.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _counters(statuses: dict[str, dict]) -> dict:
    out = {"deadline_misses": 0, "swap_stall_ticks": 0, "ticks": 0}
    for s in statuses.values():
        out["deadline_misses"] += int(s.get("control", {}).get("deadline_misses", 0))
        out["ticks"] += int(s.get("control", {}).get("ticks", 0))
        out["swap_stall_ticks"] += int(s.get("swap_stall_ticks", 0))
    return out


def _diff(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def run_rollout(robots: int = 8, artifact_mb: float = 20.0, work_dir=None, *,
                rounds: int = 3, tasks=TASKS, timeout_s: float = 60.0,
                start_timeout_s: float = 240.0, rt_priority: int | None = None,
                fetch: str = "idle", log=print) -> dict:
    """Start the learner and the robots, publish ``rounds`` versions one after the other, and
    report the median round (``seconds_to_all``) and the worst (``missed_ticks``). ``fetch``:
    where the robots fetch (``tether robot --fetch``): ``thread``, or a child process at
    ``idle`` (SCHED_IDLE) or a nice increment (``10``)."""
    from learner.canary import CanaryConfig, RolloutController
    from learner.registry import Registry
    from learner.service import serve
    from learner.signing import PRIVATE_NAME, PUBLIC_NAME, SigningKey
    from learner.store import ExperienceStore

    import torch
    torch.set_num_threads(1)  # the learner shares the machine's cores with the robots
    # a temporary folder (~0.6 GB: each robot's staged versions and spool) goes with the run
    work = pathlib.Path(work_dir or tempfile.mkdtemp(prefix="tether-rollout-"))
    data = work / "learner"
    key = SigningKey.generate()
    key.save(data / PRIVATE_NAME, data / PUBLIC_NAME, overwrite=True)
    registry = Registry(data / "registry", signing_key=key)
    store = ExperienceStore(data / "experience")
    model, desc = _model(artifact_mb, seed=0)
    norm = {"state_mean": [0.0, 0.6, 0.2, 0.5], "state_std": [0.2, 0.2, 0.1, 0.5],
            "action_mean": [0.0] * desc.action_dim, "action_std": [0.5] * desc.action_dim}
    if registry.latest() == 0:
        registry.publish(model, norm, robot=desc.name, control_rate_hz=desc.control_rate_hz)
    v1 = registry.latest()
    size_mb = sum(s for _, _, s in registry.files(v1)) / 1e6
    rollout = RolloutController(registry, store, CanaryConfig(fraction=0.0))
    server, port = serve("127.0.0.1:0", store, registry, rollout=rollout)
    addr = f"127.0.0.1:{port}"
    procs: dict[str, subprocess.Popen] = {}
    homes = {f"robot-{i}": work / "robots" / f"robot-{i}" for i in range(robots)}
    try:
        for i, (rid, home) in enumerate(homes.items()):
            home.mkdir(parents=True, exist_ok=True)
            args = [sys.executable, "-m", "tether.cli", "robot", "--robot-id", rid,
                    "--task", tasks[i % len(tasks)], "--artifact", str(registry.artifact_dir(v1)),
                    "--learner", addr, "--insecure", "--trusted-key", str(data / PUBLIC_NAME),
                    "--spool", str(home / "spool"), "--status", str(home / "status.json"),
                    "--seed", str(1000 + i), "--camera", "fast",
                    "--status-interval", str(STATUS_INTERVAL_S),
                    "--insecure"]  # plaintext on loopback: this measures the weights path
            if rt_priority:  # the robots' control loops under SCHED_FIFO (runtime/priority.py)
                args += ["--rt-priority", str(rt_priority)]
            args += (["--fetch", "thread"] if fetch == "thread"
                     else ["--fetch", "process", "--fetch-priority", fetch])
            with open(home / "robot.log", "w") as out:
                procs[rid] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                              env=_child_env())
        log(f"rollout: {robots} robots starting on v{v1} ({size_mb:.1f} MB)")
        _wait_running(homes, procs, rollout, v1, start_timeout_s)
        results = []
        for i in range(rounds):
            results.append(_round(registry, homes, procs, _model(artifact_mb, seed=1 + i)[0],
                                  timeout_s))
            log(f"rollout: round {i + 1}: all {robots} robots on v{results[-1]['version']} "
                f"{results[-1]['seconds_to_all']:.2f} s after the publish, "
                f"{results[-1]['missed_ticks']} ticks missed")
        # headline: the median round's time, the worst round's missed ticks
        median = sorted(results, key=lambda r: r["seconds_to_all"])[(len(results) - 1) // 2]
        return {"robots": robots, "artifact_mb": round(size_mb, 2),
                "seconds_to_all": median["seconds_to_all"],
                "missed_ticks": max(r["missed_ticks"] for r in results),
                "announce_to_serve_p50_s": median["announce_to_serve_p50_s"],
                "per_robot_s": median["per_robot_s"], "rounds": results,
                "cpus": os.cpu_count(), "rt_priority": rt_priority, "fetch": fetch,
                "load_average": [round(x, 2) for x in os.getloadavg()],
                "work_dir": str(work) if work_dir else None}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        registry.close()
        server.stop(1.0).wait()
        store.close()
        if not work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _statuses(homes) -> dict[str, dict]:
    """Each robot's status.json, by robot id."""
    return {rid: _read(home / "status.json") for rid, home in homes.items()}


def _round(registry, homes, procs, model, timeout_s: float) -> dict:
    """Publish ``model`` as the next version and time it until every robot serves it."""
    t_pre = time.monotonic()
    before = _counters(_statuses(homes))
    time.sleep(2.0)  # the load-only miss rate, over a window as long as a quick rollout
    at_export = _counters(_statuses(homes))
    t_export = time.monotonic()
    version = registry.publish(model).version
    t_commit = registry.committed_at[version]
    at_publish = _counters(_statuses(homes))
    swapped = _wait_swapped(homes, procs, version, t_commit + timeout_s)
    last_swap = max(s["swapped_at"] for s in swapped.values())
    # the node counts underruns up to SWAP_WINDOW_S after a swap; then a few status writes
    time.sleep(max(0.0, last_swap + SWAP_WINDOW_S - time.monotonic()) + 3 * STATUS_INTERVAL_S)
    after = _statuses(homes)
    missed = _diff(at_publish, _counters(after))
    baseline = _diff(before, at_export)
    per_robot = {r: round(s["swapped_at"] - t_commit, 3) for r, s in sorted(swapped.items())}
    w = [s["weights"] for s in swapped.values()]
    timings = [x.get("timings") or {} for x in w]
    return {
        "version": version,
        "committed_at": round(t_commit, 4),  # CLOCK_MONOTONIC, to line up with profiles
        "seconds_to_all": round(max(per_robot.values()), 3),
        "missed_ticks": missed["deadline_misses"] + missed["swap_stall_ticks"],
        "announce_to_serve_p50_s": round(statistics.median(
            s["swapped_at"] - x["announced_at"] for s, x in zip(swapped.values(), w)), 3),
        "per_robot_s": list(per_robot.values()),
        "announce_to_installed_p50_s": round(statistics.median(
            x["installed_at"] - x["announced_at"] for x in w), 3),
        # where the time goes: commit -> announcement received -> fetch starts -> fetched ->
        # loaded, warmed up and staged -> swapped in at the next chunk boundary
        "commit_to_announce_p50_s": round(statistics.median(
            x["announced_at"] - t_commit for x in w), 3),
        "announce_to_fetch_p50_s": round(statistics.median(
            x["installed_at"] - x["announced_at"] - t.get("fetch_s", 0.0) - t.get("load_s", 0.0)
            for x, t in zip(w, timings)), 3),
        "install_to_swap_p50_s": round(statistics.median(
            s["swapped_at"] - x["installed_at"] for s, x in zip(swapped.values(), w)), 3),
        "fetch_p50_s": round(statistics.median(t.get("fetch_s", 0.0) for t in timings), 3),
        "load_p50_s": round(statistics.median(t.get("load_s", 0.0) for t in timings), 3),
        "deadline_misses": missed["deadline_misses"],
        # what the robot was doing when its deadline misses happened (from the commit on)
        "misses_by_phase": _misses_by_phase(after, swapped, t_commit),
        "swap_stall_ticks": missed["swap_stall_ticks"],
        "ticks_in_window": missed["ticks"], "window_s": round(time.monotonic() - t_commit, 2),
        "baseline_missed_ticks": baseline["deadline_misses"] + baseline["swap_stall_ticks"],
        "baseline_ticks": baseline["ticks"], "baseline_window_s": round(t_export - t_pre, 2),
        "publish_s": round(t_commit - t_export, 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


PHASES = ("before_fetch", "fetch", "load", "staged", "after_swap")


def _misses_by_phase(now: dict[str, dict], swapped: dict[str, dict], t_commit: float) -> dict:
    """Deadline misses after ``t_commit`` by what the robot was doing: waiting for the
    announcement or the fetch thread, fetching + verifying, loading + warming up + checking,
    staged (waiting for a chunk boundary), or running the new version."""
    out = dict.fromkeys(PHASES, 0)
    for rid, s in swapped.items():
        w, t = s["weights"], s["weights"].get("timings") or {}
        installed = w["installed_at"]
        loaded_from = installed - t.get("load_s", 0.0)
        fetch_from = loaded_from - t.get("fetch_s", 0.0)
        edges = (fetch_from, loaded_from, installed, s["swapped_at"])
        for at, n in now.get(rid, {}).get("control", {}).get("recent_misses", []):
            if at >= t_commit:
                out[PHASES[sum(at >= e for e in edges)]] += int(n)
    return out


def _wait_running(homes, procs, rollout, version, timeout_s) -> list[dict]:
    """Until every robot ticks on ``version``, is subscribed, and has run a few seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        for rid, p in procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{rid} exited with {p.returncode} before the rollout; see "
                                   f"{homes[rid] / 'robot.log'}")
        statuses = [_read(h / "status.json") for h in homes.values()]
        ready = all(s.get("policy_version") == version and s.get("control", {}).get("ticks", 0)
                    >= 100 for s in statuses)
        if ready and len(rollout.status()["robots"]) == len(homes):
            return statuses
        if time.monotonic() > deadline:
            raise RuntimeError(f"robots not running after {timeout_s:g} s: "
                               f"{[s.get('control', {}).get('ticks') for s in statuses]} ticks")
        time.sleep(0.25)


def _wait_swapped(homes, procs, version, deadline) -> dict[str, dict]:
    done: dict[str, dict] = {}
    while len(done) < len(homes):
        for rid, home in homes.items():
            if rid in done:
                continue
            s = _read(home / "status.json")
            if s.get("policy_version") == version and s.get("swapped_at"):
                done[rid] = s
            elif procs[rid].poll() is not None:
                raise RuntimeError(f"{rid} exited with {procs[rid].returncode} during the "
                                   f"rollout; see {home / 'robot.log'}")
        if time.monotonic() > deadline:
            missing = sorted(set(homes) - set(done))
            raise RuntimeError(f"robots {missing} did not serve version {version} in time; "
                               f"see their robot.log")
        time.sleep(0.05)
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sim.bench_rollout",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--robots", type=int, default=8)
    p.add_argument("--artifact-mb", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=3, help="versions published one after another")
    p.add_argument("--rt-priority", type=int, default=None,
                   help="run the robots' control loops under SCHED_FIFO at this priority")
    p.add_argument("--fetch", default="idle",
                   help="where the robots fetch: thread, or a process at idle (SCHED_IDLE) or "
                        "at a nice increment 1..19")
    p.add_argument("--work-dir", default=None, help="default: a new temporary directory")
    p.add_argument("--out", default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    result = run_rollout(a.robots, a.artifact_mb, a.work_dir, rounds=a.rounds,
                         rt_priority=a.rt_priority, fetch=a.fetch,
                         log=lambda m: print(m, file=sys.stderr))
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        pathlib.Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
