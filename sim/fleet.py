"""``tether fleet``: the main job. Starts a learner and N simulated robots as separate processes
on loopback, shows live progress, and writes ``summary.json`` and ``learning_curve.png``.

Every robot is a real ``tether robot`` process (ONNX Runtime inference, its own spool, a gRPC
experience stream and weight subscription); the learner is a real ``tether learner`` process.
They talk mutual TLS: each run makes a fresh fleet CA and one certificate per robot under
``OUT/certs`` (learner/certs.py); ``--insecure`` runs them in plaintext.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import grpc

from sim import report
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

# robots see task variations that neither the demos nor the BC evaluation used (see learner.pretrain)
ROBOT_SEED_BASE = 100_000
LISTENING = re.compile(r"learner listening on (\S+:\d+)")


@dataclasses.dataclass(frozen=True)
class FleetConfig:
    robots: int = 4
    minutes: float = 3.0
    out: str = "runs/fleet"
    tasks: tuple[str, ...] = ()
    seed: int = 0
    camera: str = "fast"
    cache_dir: str = ".tether-cache/pretrained"
    publish_interval_s: float = 25.0
    min_episodes: int = 2
    staleness: int | None = None  # the learner's staleness S (None: its default; 0: synchronous)
    verifier_every: int | None = None  # the learner's --verifier-every (None: its default)
    keep_versions: int | None = None   # the learner's --keep-versions (None: its default)
    train: bool = True            # False: the learner only ingests and serves version 1
    canary_fraction: float | None = None  # the learner's canary rollout (None: its default)
    canary_episodes: int | None = None
    ray: str | None = None        # place robots with Ray: "auto" or a cluster address (sim/ray_fleet.py)
    drain_timeout_s: float = 90.0
    insecure: bool = False        # plaintext gRPC; default: mutual TLS with a fresh CA per run
    rt_priority: int | None = None  # robots' control loops under SCHED_FIFO (runtime/priority.py)
    # fraction of episodes a simulated operator watches and takes over when a robot stalls
    # (sim/supervisor.py): human interventions for the learner's imitation term; 0: none
    supervision: float = 0.0
    # the robots' clocks run this many times as fast as the wall (runtime.clock.ScaledClock):
    # ``minutes`` stays wall-clock time, each robot lives minutes * sim_speed of its own
    sim_speed: float = 1.0
    trainer: dict = dataclasses.field(default_factory=dict)  # the learner's --trainer overrides
    # the cloned start's settings (learner.pretrain.PretrainConfig fields besides tasks and seed)
    pretrain: dict = dataclasses.field(default_factory=dict)
    progress_s: float = 5.0
    curve_bin_s: float = 20.0

    def __post_init__(self):
        if self.robots < 1:
            raise ValueError(f"--robots must be >= 1, got {self.robots}")
        if self.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if not 0.0 <= self.supervision <= 1.0:
            raise ValueError(f"--supervision must be in [0, 1], got {self.supervision}")
        if not 0 < self.sim_speed < float("inf"):
            raise ValueError(f"--sim-speed must be > 0, got {self.sim_speed}")


def learner_trust(learner_data: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(version 1 as the learner signed it, the learner's public key) for a learner started with
    ``--data learner_data`` (default key location): what a robot starts from and trusts."""
    from learner.registry import version_name
    return (learner_data / "registry" / "versions" / version_name(1),
            learner_data / "signing_key.pub")


def _child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _tether(*args: str) -> list[str]:
    return [sys.executable, "-m", "tether.cli", *args]


class Fleet:
    """The processes of one fleet run and what is known about them."""

    def __init__(self, config: FleetConfig, tasks: tuple[str, ...]):
        self.config = config
        self.tasks = tasks
        self.out = pathlib.Path(config.out).resolve()
        self.learner: subprocess.Popen | None = None
        self.robots: dict[str, subprocess.Popen] = {}
        self.addr = ""
        self.placement = None  # sim.ray_fleet.RayPlacement when robots are placed by Ray
        self.publishes: list[tuple[float, int]] = []
        self.samples: list[tuple[float, int, int]] = []
        self.task_samples: dict[str, list[tuple[float, int, int]]] = {}  # the same, per task
        self.t0 = 0.0
        self.certs: dict = {}  # identity name -> learner.certs.Issued (empty: --insecure)
        self._stats_channel: grpc.Channel | None = None

    # -- processes -------------------------------------------------------------------------
    def make_certs(self) -> None:
        """A fresh fleet CA under OUT/certs for this run, the learner's certificate (for the
        addresses robots dial), one certificate per robot and an operator one for the monitor."""
        from learner import certs
        root = self.out / "certs"
        certs.init_ca(root / "ca", force=True)
        hosts = (*certs.DEFAULT_HOSTS, *([self.placement.ip] if self.placement else []))
        wanted = [(certs.LEARNER, "learner", tuple(dict.fromkeys(hosts))),
                  (certs.OPERATOR, "fleet-monitor", ())]
        wanted += [(certs.ROBOT, f"robot-{i}", ()) for i in range(self.config.robots)]
        self.certs = {name: certs.issue(root / "ca", role, name, root / name, hosts=h, force=True)
                      for role, name, h in wanted}

    def _tls_args(self, name: str) -> list[str]:
        if self.config.insecure:
            return ["--insecure"]
        issued = self.certs[name]
        return ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key),
                "--tls-ca", str(issued.ca)]

    def start_learner(self, artifact: pathlib.Path, checkpoint: pathlib.Path | None) -> None:
        c = self.config
        if not c.insecure:
            self.make_certs()
        host = self.placement.bind_host if self.placement else "127.0.0.1"
        args = ["learner", "--addr", f"{host}:0", "--data", str(self.out / "learner"),
                "--init-artifact", str(artifact), "--publish-interval", str(c.publish_interval_s),
                "--min-episodes", str(c.min_episodes), "--seed", str(c.seed),
                *self._tls_args("learner")]
        if c.staleness is not None:
            args += ["--staleness", str(c.staleness)]
        if c.verifier_every is not None:
            args += ["--verifier-every", str(c.verifier_every)]
        if c.keep_versions is not None:
            args += ["--keep-versions", str(c.keep_versions)]
        if c.trainer:
            args += ["--trainer", json.dumps(c.trainer)]
        if c.canary_fraction is not None:
            args += ["--canary-fraction", str(c.canary_fraction)]
        if c.canary_episodes is not None:
            args += ["--canary-episodes", str(c.canary_episodes)]
        if not c.train:
            args += ["--no-train"]
        if checkpoint is not None:
            args += ["--init-checkpoint", str(checkpoint)]
        log = open(self.out / "learner.log", "w")
        self.learner = subprocess.Popen(_tether(*args), stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=_child_env())
        found = threading.Event()

        def pump():
            for line in self.learner.stdout:
                log.write(line)
                log.flush()
                m = LISTENING.search(line)
                if m and not found.is_set():
                    self.addr = m.group(1)
                    found.set()
            log.close()

        threading.Thread(target=pump, daemon=True, name="learner-log").start()
        deadline = time.monotonic() + 180
        while not found.wait(0.2):
            if self.learner.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the learner did not start (exit {self.learner.poll()}); "
                                   f"see {self.out / 'learner.log'}")

    def start_robots(self, artifact: pathlib.Path) -> None:
        """``artifact``: signed by the learner (robots refuse anything else; see learner_trust)."""
        c = self.config
        _, public_key = learner_trust(self.out / "learner")
        for i in range(c.robots):
            rid = f"robot-{i}"
            home = self.out / "robots" / rid
            home.mkdir(parents=True, exist_ok=True)
            # a status left by an earlier fleet in this folder would count in this one's samples
            # until the robot writes its first (its spool stays: the robot resends from it)
            (home / "status.json").unlink(missing_ok=True)
            args = ["robot", "--robot-id", rid, "--task", self.tasks[i % len(self.tasks)],
                    "--artifact", str(artifact), "--learner", self.addr,
                    "--spool", str(home / "spool"), "--status", str(home / "status.json"),
                    "--seconds", str(c.minutes * 60 * c.sim_speed), "--seed", str(ROBOT_SEED_BASE + c.seed * 1000 + i),
                    "--camera", c.camera, "--trusted-key", str(public_key), *self._tls_args(rid)]
            if c.rt_priority:
                args += ["--rt-priority", str(c.rt_priority)]
            if c.supervision:
                args += ["--supervision", str(c.supervision)]
            if c.sim_speed != 1.0:
                args += ["--sim-speed", str(c.sim_speed)]
            if self.placement is not None:  # Ray: the same process, on some node of the cluster
                self.robots[rid] = self.placement.start(rid, args, home)
                continue
            with open(home / "robot.log", "w") as log:
                self.robots[rid] = subprocess.Popen(_tether(*args), stdout=log,
                                                    stderr=subprocess.STDOUT, env=_child_env())

    def stop(self) -> None:
        for p in list(self.robots.values()) + ([self.learner] if self.learner else []):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in list(self.robots.values()) + ([self.learner] if self.learner else []):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self._stats_channel is not None:
            self._stats_channel.close()
            self._stats_channel = None

    # -- observation -----------------------------------------------------------------------
    def statuses(self) -> list[dict]:
        out = []
        for rid in self.robots:
            path = self.out / "robots" / rid / "status.json"
            try:
                out.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                out.append({"robot_id": rid})
        return out

    def learner_stats(self) -> dict:
        if not self.addr:
            return {}
        if self._stats_channel is None:  # one channel (one TLS handshake) for the whole run
            if self.config.insecure:
                self._stats_channel = grpc.insecure_channel(self.addr)
            else:
                from runtime.tls import TlsConfig
                issued = self.certs["fleet-monitor"]
                self._stats_channel = TlsConfig(str(issued.cert), str(issued.key),
                                                str(issued.ca)).channel_factory()(self.addr)
        try:
            s = pb_grpc.LearnerStub(self._stats_channel).GetStats(pb.StatsRequest(), timeout=5)
        except grpc.RpcError:
            return {}
        return {"records_stored": s.records_stored, "duplicates_dropped": s.duplicates_dropped,
                "latest_version": s.latest_version, "versions_published": s.versions_published,
                "train_steps": s.train_steps}

    def observe(self, now: float) -> tuple[list[dict], dict]:
        statuses, stats = self.statuses(), self.learner_stats()
        t = now - self.t0
        per_task = {task: [0, 0] for task in self.tasks}
        for s in statuses:
            acc = per_task.setdefault(s.get("task", "?"), [0, 0])
            acc[0] += int(s.get("episodes", 0))
            acc[1] += int(s.get("successes", 0))
        for task in self.tasks:
            self.task_samples.setdefault(task, []).append((t, *per_task[task]))
        self.samples.append((t, sum(a[0] for a in per_task.values()),
                             sum(a[1] for a in per_task.values())))
        v = int(stats.get("latest_version", 0))
        if v and (not self.publishes or v > self.publishes[-1][1]):
            self.publishes.append((round(t, 1), v))
        return statuses, stats

    def print_progress(self, statuses: list[dict], stats: dict, now: float) -> None:
        print(f"[{now - self.t0:6.0f}s] learner: stored {stats.get('records_stored', '?')} "
              f"transitions, latest version v{stats.get('latest_version', '?')} "
              f"({stats.get('versions_published', '?')} published), "
              f"train steps {stats.get('train_steps', '?')}", flush=True)
        for s in statuses:
            eps, succ = int(s.get("episodes", 0)), int(s.get("successes", 0))
            rate = f"{100 * succ / eps:3.0f}%" if eps else "  - "
            supervised = int(s.get("supervised_episodes", 0))
            print(f"    {s.get('robot_id', '?'):9s} {str(s.get('task', '')):26s} "
                  f"v{s.get('policy_version', '?'):<3} episodes {eps:4d}  success {rate}  "
                  + (f"supervised {supervised:3d}  " if supervised else "") +
                  f"sent {s.get('records_spooled', 0):5d} acked {s.get('records_acked', 0):5d}",
                  flush=True)

    def monitor(self) -> list[dict]:
        c = self.config
        last_print = 0.0
        deadline = self.t0 + c.minutes * 60 + c.drain_timeout_s + 60
        while any(p.poll() is None for p in self.robots.values()):
            now = time.monotonic()
            if now > deadline:
                print("fleet: robots did not finish in time; stopping them", flush=True)
                break
            statuses, stats = self.observe(now)
            if now - last_print >= c.progress_s:
                self.print_progress(statuses, stats, now)
                last_print = now
            time.sleep(1.0)
        statuses, _ = self.observe(time.monotonic())
        return statuses


def stop_on_sigterm():
    """SIGTERM to the fleet's driver (``kill``, a CI timeout, a supervisor) ends it like ^C: the
    ``finally`` stops the learner and robot processes instead of leaving them running orphaned.
    Returns the function that puts the previous handler back (a no-op off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    raised = []

    def interrupt(signum, frame):
        if not raised:  # once: a second SIGTERM must not cut the clean-up short
            raised.append(signum)
            raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def run_fleet(config: FleetConfig) -> dict:
    from learner.pretrain import ensure_pretrained
    from sim.tasks import DEFAULT_TASKS

    tasks = tuple(config.tasks) or tuple(DEFAULT_TASKS)
    fleet = Fleet(config, tasks)
    fleet.out.mkdir(parents=True, exist_ok=True)
    speed = f" at {config.sim_speed:g}x real time" if config.sim_speed != 1.0 else ""
    print(f"fleet: {config.robots} robots on {', '.join(tasks)} for {config.minutes:g} min{speed} "
          f"-> {fleet.out}", flush=True)
    if config.ray:  # before pretraining: fail fast without ray or a cluster
        from sim.ray_fleet import RayPlacement
        try:
            fleet.placement = RayPlacement(config.ray, config.robots)
        except (RuntimeError, ConnectionError) as e:  # no ray installed, no cluster there
            raise SystemExit(f"tether fleet: --ray {config.ray}: {e}") from e
    t = time.monotonic()
    artifact = pathlib.Path(ensure_pretrained(tasks, config.cache_dir, seed=config.seed,
                                              **config.pretrain))
    checkpoint = artifact.parent / "model.pt"
    print(f"fleet: pretrained policy ready in {time.monotonic() - t:.0f}s: {artifact}", flush=True)
    restore = stop_on_sigterm()
    try:
        fleet.start_learner(artifact, checkpoint if checkpoint.exists() else None)
        print(f"fleet: learner at {fleet.addr}", flush=True)
        fleet.t0 = time.monotonic()
        # robots start from the learner's signed version 1, not the unsigned pretrained export
        fleet.start_robots(learner_trust(fleet.out / "learner")[0])
        statuses = fleet.monitor()
        duration = time.monotonic() - fleet.t0
        stats = fleet.learner_stats()
    finally:
        fleet.stop()
        if fleet.placement is not None:
            fleet.placement.close()
        restore()
    summary = report.aggregate(statuses, stats, duration)
    summary["robot_exit_codes"] = {rid: p.returncode for rid, p in fleet.robots.items()}
    summary["tasks"] = list(tasks)
    summary["sim_speed"] = config.sim_speed
    # cumulative (seconds, episodes, successes) about once a second: sim.bench_learning's curves
    summary["samples"] = [[round(t, 2), e, s] for t, e, s in fleet.samples]
    summary["task_samples"] = {task: [[round(t, 2), e, s] for t, e, s in rows]
                               for task, rows in fleet.task_samples.items()}
    curve = report.learning_curve(fleet.samples, config.curve_bin_s)
    report.write_outputs(fleet.out, summary, curve, fleet.publishes)
    return summary


def check(summary: dict) -> list[str]:
    """What a healthy run guarantees; each failure is a line."""
    problems = []
    if not summary["transitions_sent"] == summary["transitions_acked"] == summary["transitions_stored"]:
        problems.append(f"transitions sent {summary['transitions_sent']}, acked "
                        f"{summary['transitions_acked']}, stored {summary['transitions_stored']} differ")
    if summary["transitions_dropped"]:
        problems.append(f"{summary['transitions_dropped']} transitions dropped before the spool "
                        f"(spool full or disk error)")
    if summary["swap_stall_ticks"]:
        problems.append(f"{summary['swap_stall_ticks']} ticks without an action during swaps")
    bad = {r: c for r, c in summary["robot_exit_codes"].items() if c != 0}
    if bad:
        problems.append(f"robot processes failed: {bad}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tether fleet", description=__doc__.split("\n\n")[0])
    p.add_argument("--robots", type=int, default=FleetConfig.robots, help="simulated robots")
    p.add_argument("--minutes", type=float, default=FleetConfig.minutes, help="control time")
    p.add_argument("--out", default=FleetConfig.out, help="output directory")
    p.add_argument("--tasks", default="", help="comma-separated Meta-World tasks "
                   "(default: sim.tasks.DEFAULT_TASKS)")
    p.add_argument("--seed", type=int, default=FleetConfig.seed)
    p.add_argument("--camera", default=FleetConfig.camera, help="fast | mujoco")
    p.add_argument("--rt-priority", type=int, default=None,
                   help="robots' control loops under SCHED_FIFO at this priority (Linux, needs "
                        "root, CAP_SYS_NICE or ulimit -r; a robot not allowed says so and runs)")
    p.add_argument("--cache-dir", default=FleetConfig.cache_dir,
                   help="where the pretrained policy is cached")
    p.add_argument("--staleness", type=int, default=None,
                   help="the learner's staleness: 0 = synchronous on-policy, larger = more "
                        "asynchronous (default: the learner's)")
    p.add_argument("--verifier-every", type=int, default=None,
                   help="the learner ships a retrained verifier scorer with every N-th version "
                        "(default: the learner's, off)")
    p.add_argument("--keep-versions", type=int, default=None,
                   help="versions the learner's registry keeps (default: the learner's)")
    p.add_argument("--min-episodes", type=int, default=FleetConfig.min_episodes,
                   help="new complete episodes per published version (at least)")
    p.add_argument("--no-train", action="store_true",
                   help="no training: measure the initial policy (the learner only ingests)")
    p.add_argument("--publish-interval", type=float, default=FleetConfig.publish_interval_s,
                   help="seconds between published versions (at least)")
    p.add_argument("--canary-fraction", type=float, default=None,
                   help="fraction of robots that try each new version first (0: no canaries; "
                        "default: the learner's)")
    p.add_argument("--canary-episodes", type=int, default=None,
                   help="canary episodes before a version is promoted or rolled back")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext gRPC between robots and learner (default: mutual TLS with a "
                        "fresh CA and certificates under OUT/certs)")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS",
                   help="place the robots with Ray: auto (this machine's cluster, else a local "
                        "instance) or a cluster address (needs pip install 'tether[scale]')")
    p.add_argument("--supervision", type=float, default=0.0,
                   help="fraction of episodes a simulated operator watches, taking over (with "
                        "the task's scripted expert) when a robot stalls; recorded as human "
                        "interventions, which the learner imitates; success rates count the "
                        "episodes no operator watched (default 0: none)")
    p.add_argument("--sim-speed", type=float, default=1.0,
                   help="run the simulated robots' clocks this many times as fast as the wall "
                        "(--minutes stays wall-clock time; default 1: real time)")
    a = p.parse_args(argv)
    config = FleetConfig(ray=a.ray, robots=a.robots, minutes=a.minutes, out=a.out, seed=a.seed,
                         tasks=tuple(t for t in a.tasks.split(",") if t), camera=a.camera,
                         cache_dir=a.cache_dir, publish_interval_s=a.publish_interval,
                         staleness=a.staleness, min_episodes=a.min_episodes, train=not a.no_train,
                         canary_fraction=a.canary_fraction, canary_episodes=a.canary_episodes,
                         insecure=a.insecure, verifier_every=a.verifier_every,
                         keep_versions=a.keep_versions,
                         rt_priority=a.rt_priority, supervision=a.supervision,
                         sim_speed=a.sim_speed)
    summary = run_fleet(config)
    print(json.dumps({k: summary[k] for k in (
        "robots", "duration_s", "episodes", "transitions_sent", "transitions_acked",
        "transitions_stored", "versions_published", "versions_deployed_min",
        "success_rate_by_version", "control", "verifier")}, indent=2))
    print(f"fleet: wrote {pathlib.Path(config.out) / 'summary.json'} and learning_curve.png")
    problems = check(summary)
    for line in problems:
        print(f"fleet: PROBLEM: {line}", file=sys.stderr)
    return 1 if problems else 0
