"""Simulated robots placed across a Ray cluster (``tether fleet --ray auto|ADDRESS``).

Each robot is still a real ``tether robot`` process, exactly as on one machine; Ray only decides
on which node it runs. A small actor per robot starts that process on its node, in a node-local
directory (spool, status, log), with its own copy of the files its command line names (policy
artifact, trusted key: shipped through Ray's object store, so the nodes need no shared
filesystem). The driver mirrors every robot's status.json back into the fleet's output folder,
so the fleet's monitor and report read them as they would read local robots'.

``auto`` joins the cluster this machine belongs to (``ray start``, or RAY_ADDRESS) or, if there
is none, starts a local Ray instance. On a cluster the learner listens on all interfaces and the
robots dial this machine's cluster IP. Every node needs the same Python with
``pip install 'tether[sim,scale]'``.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from runtime.artifact import write_atomic

log = logging.getLogger("tether.sim.ray_fleet")
STATUS_EVERY_S = 1.0
RPC_TIMEOUT_S = 30.0


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise RuntimeError("placing robots with Ray needs the scale extra: "
                           "pip install 'tether[scale]'") from e
    return ray


class RobotProcess:
    """A Ray actor (see RayPlacement): one ``tether robot`` process on this node."""

    def __init__(self, run_id: str, robot_id: str):
        self.home = pathlib.Path(tempfile.gettempdir()) / "tether-ray" / run_id / robot_id
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        self.proc: subprocess.Popen | None = None

    def start(self, args: list[str], files: dict, driver_home: str) -> str:
        """Materialize ``files`` ({arg index: ref to {relative path: bytes}}), point those
        arguments at the copies and the driver's robot home at this node's, start; returns the
        node's IP."""
        import ray
        args = list(args)
        for index, ref in files.items():
            content = ray.get(ref)
            target = self.home / "files" / str(index)
            for rel, data in content.items():
                path = target / rel if rel else target
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            args[int(index)] = str(target)
        args = [a.replace(driver_home, str(self.home)) for a in args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        with open(self.home / "robot.log", "w") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "tether.cli", *args], stdout=out,
                                         stderr=subprocess.STDOUT, env=env, cwd=self.home)
        return ray.util.get_node_ip_address()

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def status(self) -> bytes | None:
        try:
            return (self.home / "status.json").read_bytes()
        except OSError:
            return None

    def log_tail(self, limit: int = 200_000) -> bytes:
        try:
            with open(self.home / "robot.log", "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
                return f.read()
        except OSError:
            return b""

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.home, ignore_errors=True)
        try:
            self.home.parent.rmdir()  # the run's folder, once its last robot is gone
        except OSError:
            pass


class RayRobot:
    """The driver's handle on one placed robot, shaped like subprocess.Popen (poll, wait,
    send_signal, kill, returncode) so that the fleet treats it like a local robot process."""

    def __init__(self, ray, actor, robot_id: str, home: pathlib.Path, node: str):
        self._ray, self.actor, self.robot_id, self.home, self.node = ray, actor, robot_id, home, node
        self.returncode: int | None = None

    def _get(self, ref, timeout: float = RPC_TIMEOUT_S):
        try:
            return self._ray.get(ref, timeout=timeout)
        except self._ray.exceptions.GetTimeoutError:
            log.warning("%s on node %s did not answer in %.0fs", self.robot_id, self.node, timeout)
        except self._ray.exceptions.RayActorError as e:  # its node or worker died
            log.error("%s on node %s is gone: %s", self.robot_id, self.node, e)
            if self.returncode is None:
                self.returncode = -signal.SIGKILL
        return None

    def poll(self) -> int | None:
        if self.returncode is None:
            rc = self._get(self.actor.poll.remote())
            if rc is not None and self.returncode is None:
                self.returncode = rc
                self.sync(final=True)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            rc = self._get(self.actor.wait.remote(timeout or 1e9), (timeout or 1e9) + RPC_TIMEOUT_S)
            if rc is None and self.returncode is None:
                raise subprocess.TimeoutExpired(f"tether robot {self.robot_id}", timeout)
            if self.returncode is None:
                self.returncode = rc
                self.sync(final=True)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            self._get(self.actor.send_signal.remote(int(sig)))

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)
        self.wait(RPC_TIMEOUT_S)

    def sync(self, final: bool = False) -> None:
        """Copy the robot's status.json (and, at the end, its log) to the driver's robot home."""
        status = self._get(self.actor.status.remote())
        if status:
            write_atomic(self.home / "status.json", status)
        if final:
            (self.home / "robot.log").write_bytes(self._get(self.actor.log_tail.remote()) or b"")


class RayPlacement:
    """Robots as Ray actors, spread over the cluster's nodes (one CPU each by default)."""

    def __init__(self, address: str = "auto", robots: int = 1, cpus_per_robot: float = 1.0):
        ray = self._ray = import_ray()
        self.local = False
        self._owns = not ray.is_initialized()  # else the caller's session: left running
        if self._owns:
            self.local = self._connect(address, max(2, int(robots * cpus_per_robot + 0.999)))
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        self.ip = ray.util.get_node_ip_address()
        # robots on other machines must reach the learner: listen on all interfaces then
        self.bind_host = "127.0.0.1" if self.local else "0.0.0.0"
        self.cpus = cpus_per_robot
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.robots: list[RayRobot] = []
        self._shipped: dict[str, object] = {}
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        log.info("ray: %s with %d node(s), %g CPUs", "local instance" if self.local else address,
                 len(nodes), ray.cluster_resources().get("CPU", 0))

    def _connect(self, address: str, cpus: int) -> bool:
        """Join the cluster; True when it is a local instance started here."""
        if address != "auto":
            self._ray.init(address=address, log_to_driver=False)
            return False
        try:
            self._ray.init(address="auto", log_to_driver=False)
            return False
        except ConnectionError:  # no cluster to join: this machine is the cluster
            self._ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            return True

    def learner_addr(self, listening: str) -> str:
        """The address robots dial, given the one the learner printed."""
        host, port = listening.rsplit(":", 1)
        return f"{self.ip}:{port}" if host in ("0.0.0.0", "[::]", "") else listening

    def _ship(self, path: pathlib.Path):
        """Object-store reference to a file's or directory's bytes, uploaded once per path."""
        key = str(path)
        if key not in self._shipped:
            if path.is_dir():
                content = {str(p.relative_to(path)): p.read_bytes()
                           for p in sorted(path.rglob("*")) if p.is_file()}
            else:
                content = {"": path.read_bytes()}
            self._shipped[key] = self._ray.put(content)
        return self._shipped[key]

    def start(self, robot_id: str, args: list[str], home: pathlib.Path) -> RayRobot:
        """Place one robot. Arguments that name existing files or folders outside ``home``
        travel with it; ``home`` becomes a folder on its node."""
        ray = self._ray
        home = pathlib.Path(home).resolve()
        args = [self.learner_addr(a) if i and args[i - 1] == "--learner" else a
                for i, a in enumerate(args)]
        files = {}
        for i, a in enumerate(args):
            p = pathlib.Path(a)
            if i and args[i - 1].startswith("--") and p.is_absolute() and p.exists() \
                    and not p.resolve().is_relative_to(home):
                files[i] = self._ship(p)
        # threaded, so that a status call is answered while another call waits on the process
        actor_cls = ray.remote(num_cpus=self.cpus, scheduling_strategy="SPREAD",
                               max_concurrency=4)(RobotProcess)
        actor = actor_cls.options(name=f"tether-{self.run_id}-{robot_id}").remote(
            self.run_id, robot_id)
        node = ray.get(actor.start.remote(args, files, str(home)), timeout=300)
        robot = RayRobot(ray, actor, robot_id, home, node)
        self.robots.append(robot)
        log.info("%s placed on node %s", robot_id, node)
        if self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True, name="ray-status")
            self._syncer.start()
        return robot

    def _sync_loop(self) -> None:
        while not self._stop.wait(STATUS_EVERY_S):
            for robot in list(self.robots):
                if robot.returncode is None:
                    robot.sync()

    def close(self) -> None:
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(10)
        for robot in self.robots:
            if robot.returncode is None:
                robot.kill()
            try:
                self._ray.get(robot.actor.cleanup.remote(), timeout=RPC_TIMEOUT_S)
                self._ray.kill(robot.actor)
            except Exception as e:  # a lost node: nothing left to clean there
                log.warning("could not clean up %s: %s", robot.robot_id, e)
        if self._owns:
            self._ray.shutdown()
