"""Real processes for the fault tests: ``tether learner`` and ``tether robot`` processes that can
be killed with SIGKILL and restarted on the same port and directories, a subscriber that records
every version the learner announces, what the store holds, and the experience client processes.

``Clients`` starts experience client processes (tests/faults/stream_client.py): simulated robots
without a simulator, each acknowledged batch logged durably in ``DIR/<robot>/acked.log``
(``acked_keys`` reads it back).
"""
from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"learner listening on (\S+:\d+)")
TASKS = ("reach-v3", "push-v3", "door-open-v3")


def child_env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def tether(*args: str) -> list[str]:
    return [sys.executable, "-m", "tether.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrained() -> pathlib.Path:
    """The fleet's pretrained artifact (cached; a cold cache pretrains first, ~70 s)."""
    from learner.pretrain import ensure_pretrained
    from sim.tasks import DEFAULT_TASKS
    return pathlib.Path(ensure_pretrained(tuple(DEFAULT_TASKS), REPO / ".tether-cache" / "pretrained"))


def rss_mb(pid: int) -> float | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def terminate(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM (a clean stop), SIGKILL after ``timeout``; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- the learner ------------------------------------------------------------------------------

class Learner:
    """A ``tether learner --insecure`` process on a fixed port, restartable on the same data."""

    def __init__(self, data: pathlib.Path, artifact: pathlib.Path, *, port: int | None = None,
                 train: bool = False, extra: tuple[str, ...] = ()):
        self.data, self.artifact = pathlib.Path(data), pathlib.Path(artifact)
        self.port = port or free_port()
        self.addr = f"127.0.0.1:{self.port}"
        self.train, self.extra = train, tuple(extra)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data.parent / f"{self.data.name}.log"

    def start(self, timeout: float = 120.0) -> "Learner":
        args = ["learner", "--data", str(self.data), "--addr", self.addr, "--insecure",
                "--init-artifact", str(self.artifact), "--canary-fraction", "0", *self.extra]
        if not self.train:
            args.append("--no-train")
        log = open(self.log_path, "a")
        log.write(f"=== start {self.starts} at {time.time():.3f}\n")
        log.flush()
        self.proc = subprocess.Popen(tether(*args), cwd=REPO, env=child_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        found = threading.Event()
        proc = self.proc

        def pump():  # the log must be read while the learner runs, or its pipe fills up
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if LISTENING.search(line):
                    found.set()
            log.close()

        threading.Thread(target=pump, daemon=True, name="learner-log").start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.05):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the learner did not start (exit {proc.poll()}); see "
                                   f"{self.log_path}:\n{self.log_path.read_text()[-3000:]}")
        self.starts += 1
        return self

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)  # no close, no flush: whatever was in flight
        self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int | None:
        return terminate(self.proc, timeout) if self.proc is not None else None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def signed_v1(self) -> tuple[pathlib.Path, pathlib.Path]:
        """(version 1 as this learner signed it, its public key): what robots start from."""
        from sim.fleet import learner_trust
        return learner_trust(self.data)

    def duplicates_dropped(self) -> int:
        """Resent records the (last) learner process recognised and did not store again."""
        try:
            return int(json.loads((self.data / "learner.json").read_text())["duplicates_dropped"])
        except (OSError, ValueError, KeyError):
            return 0

    def registry_latest(self) -> int:
        """The registry's LATEST file (written after each committed version)."""
        path = self.data / "registry" / "LATEST"
        return int(path.read_text()) if path.exists() else 0


# -- the robots ---------------------------------------------------------------------------------
class RobotProc:
    """A ``tether robot`` process (Meta-World, fast camera) with its own spool and status file;
    killed with SIGKILL and restarted with the same id, spool and status."""

    def __init__(self, home: pathlib.Path, robot_id: str, artifact: pathlib.Path,
                 trusted_key: pathlib.Path, learner: str, *, seed: int = 0, task: str = "reach-v3"):
        self.home, self.robot_id = pathlib.Path(home), robot_id
        self.args = ["robot", "--robot-id", robot_id, "--task", task, "--artifact", str(artifact),
                     "--learner", learner, "--insecure", "--camera", "fast",
                     "--spool", str(self.home / "spool"), "--status", str(self.status_path),
                     "--seed", str(seed), "--trusted-key", str(trusted_key),
                     "--status-interval", "0.2"]
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.home.mkdir(parents=True, exist_ok=True)

    @property
    def status_path(self) -> pathlib.Path:
        return self.home / "status.json"

    def start(self) -> "RobotProc":
        self.status_path.unlink(missing_ok=True)  # a fresh one marks this run's first tick
        with open(self.home / "robot.log", "a") as log:
            log.write(f"=== start {self.starts} at {time.time():.3f}\n")
            log.flush()
            self.proc = subprocess.Popen(tether(*self.args), cwd=REPO, env=child_env(),
                                         stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        return self

    def status(self) -> dict:
        try:
            return json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}

    def ticks(self) -> int:
        return int(self.status().get("control", {}).get("ticks", 0))

    def wait_ticking(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ticks() <= 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"robot {self.robot_id} did not start ticking (exit "
                                   f"{self.proc.poll()}):\n{self.log_tail()}")
            time.sleep(0.1)

    def spool_state(self) -> dict:
        """The spool's persisted counters (runtime/spool.py state.json)."""
        return json.loads((self.home / "spool" / "state.json").read_text())

    def pending_batches(self) -> int:
        return len(list((self.home / "spool").glob("b*.pb")))

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM: the node stops its loop, drains its spool (bounded), exits 0."""
        return terminate(self.proc, timeout)

    def log_tail(self, n: int = 3000) -> str:
        path = self.home / "robot.log"
        return path.read_text()[-n:] if path.exists() else ""


class TickWatch:
    """Watches robots while they should be running. A robot stopped if its process exited, if its
    control loop ran a tick more than ``stall_s`` late (the loop's own clock: ``jitter_max_ms``
    in status.json), or if its status file showed no new tick for ``silent_s``. The last is a
    looser bound on purpose: the file is written by a separate thread every 0.2 s, so on a
    loaded machine it also measures that thread's scheduling and this watcher's, not the loop.
    """

    def __init__(self, robots: list[RobotProc], stall_s: float = 1.0, silent_s: float = 2.0,
                 every_s: float = 0.05):
        self.robots, self.stall_s, self.silent_s, self.every_s = robots, stall_s, silent_s, every_s
        self.late_ms: dict[str, float] = {}
        self.last: dict[str, tuple[int, float]] = {}
        self.max_gap: dict[str, float] = collections.defaultdict(float)
        self.exited: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tick-watch")

    def start(self) -> "TickWatch":
        now = time.monotonic()
        self.last = {r.robot_id: (r.ticks(), now) for r in self.robots}
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            now = time.monotonic()
            for r in self.robots:
                if r.proc.poll() is not None:
                    self.exited.add(r.robot_id)
                ticks = r.ticks()
                seen, since = self.last[r.robot_id]
                self.max_gap[r.robot_id] = max(self.max_gap[r.robot_id], now - since)
                if ticks > seen:
                    self.last[r.robot_id] = (ticks, now)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        control = {r.robot_id: r.status().get("control", {}) for r in self.robots}
        self.late_ms = {r: float(c.get("jitter_max_ms", 0.0)) for r, c in control.items()}
        return {"robot_stops": len(self.stopped()), "exited": sorted(self.exited),
                "max_tick_late_ms": round(max(self.late_ms.values(), default=0.0), 1),
                "deadline_misses": sum(int(c.get("deadline_misses", 0)) for c in control.values()),
                "max_status_gap_s": round(max(self.max_gap.values(), default=0.0), 3),
                "status_gaps_s": {r: round(g, 3) for r, g in sorted(self.max_gap.items())}}

    def stopped(self) -> set[str]:
        return (self.exited | {r for r, ms in self.late_ms.items() if ms > 1e3 * self.stall_s}
                | {r for r, gap in self.max_gap.items() if gap > self.silent_s})


# -- the store and the control plane ----------------------------------------------------------
def stored_keys(data: pathlib.Path) -> collections.Counter:
    """(robot, episode, seq) -> how often the store holds it (a restart's read-only view)."""
    from learner.store import ExperienceStore
    store = ExperienceStore(pathlib.Path(data) / "experience", readonly=True)
    out: collections.Counter = collections.Counter()
    try:
        for table in store.scan(["robot_id", "episode_id", "seq"]):
            out.update(zip(table.column("robot_id").to_pylist(),
                           table.column("episode_id").to_pylist(), table.column("seq").to_pylist()))
    finally:
        store.close()
    return out


def per_robot(stored: collections.Counter) -> dict[str, tuple[int, int]]:
    """robot -> (distinct keys stored, extra copies stored)."""
    out: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for (robot, _, _), n in stored.items():
        out[robot][0] += 1
        out[robot][1] += n - 1
    return {r: (a, b) for r, (a, b) in out.items()}


class VersionWatch:
    """A control-plane subscriber that reconnects across learner restarts and records every
    version announced to it, in order."""

    def __init__(self, addr: str, robot_id: str = "version-watch"):
        self.addr, self.robot_id = addr, robot_id
        self.seen: list[int] = []
        self.connects = 0
        self._stop = threading.Event()
        self._call = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="version-watch")

    def start(self) -> "VersionWatch":
        self._thread.start()
        return self

    def _run(self) -> None:
        import grpc

        from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc
        while not self._stop.is_set():
            channel = grpc.insecure_channel(self.addr)
            try:
                self._call = pb_grpc.LearnerStub(channel).Subscribe(pb.SubscribeRequest(
                    robot_id=self.robot_id, current_version=max(self.seen, default=0)))
                self.connects += 1
                for a in self._call:
                    self.seen.append(int(a.version))
            except grpc.RpcError:
                pass
            finally:
                channel.close()
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(5)

    def decreases(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b in zip(self.seen, self.seen[1:]) if b < a]


# -- experience client processes -----------------------------------------------------------------
class Clients:
    """tests/faults/stream_client.py processes, each streaming for several simulated robots."""

    def __init__(self, root: pathlib.Path, addr: str, robots: list[str], processes: int, *,
                 per_batch: int = 16, interval_s: float = 0.1, episode_records: int = 40):
        self.root = pathlib.Path(root)
        self.robots = robots
        groups = [robots[i::processes] for i in range(min(processes, len(robots)))]
        self.procs = [subprocess.Popen(
            [sys.executable, "-m", "tests.faults.stream_client", "--addr", addr,
             "--dir", str(self.root), "--robots", ",".join(g), "--per-batch", str(per_batch),
             "--interval", str(interval_s), "--episode-records", str(episode_records)],
            cwd=REPO, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for g in groups]
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError("a fault client process failed to start")

    def finish(self, drain_s: float = 60.0) -> list[dict]:
        """Stop producing, drain every spool, return each robot's result."""
        for p in self.procs:
            p.stdin.write(f"stop {drain_s}\n")
            p.stdin.flush()
        results = []
        for p in self.procs:
            out, _ = p.communicate(timeout=drain_s + 60)
            results += json.loads(out.strip().splitlines()[-1])
        return results

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def acked_keys(root: pathlib.Path, robot: str) -> set[tuple[str, str, int]]:
    """What a client logged as acknowledged: (robot, episode, seq) of every record."""
    out = set()
    path = pathlib.Path(root) / robot / "acked.log"
    # only whole lines: a last line without its newline may be a write still in progress
    for line in path.read_text().split("\n")[:-1] if path.exists() else ():
        _, episode, first, n = line.split()
        out.update((robot, episode, s) for s in range(int(first), int(first) + int(n)))
    return out
