"""The ROS 2 inference node, independent of how it talks ROS: lifecycle, sensor checks, hold,
commands and diagnostics. Two transports plug in underneath (``transport_rclpy.py`` for a ROS 2
installation, ``transport_dds.py`` for pip-only robots speaking ROS 2 over cyclonedds).

Lifecycle (as ROS 2 managed nodes): ``configure`` loads, warms up and checks the policy artifact
and opens topics; ``activate`` starts commanding; ``deactivate`` holds position; ``cleanup``
stops the threads, drains the spool and closes topics. The parts are the robot node's
(``runtime.node.RobotNode``: policy, action queue, inference worker, envelope, chunk gate,
control loop, recorder, spool, experience client, weight subscriber); this class drives its
control loop one tick at a time, and holds instead when the data are stale or out of sync.
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable, Protocol

import numpy as np

from robots.description import load_description
from robots.ros_robot import RosRobot
from runtime.clock import WallClock
from runtime.fetch_process import ChannelSpec
from runtime.node import NodeConfig, RobotNode, fetch_options
from runtime.priority import realtime, worker_rt_priority
from runtime.ros.params import RosParams
from runtime.ros.sensors import SensorCache, TeleopInput, to_stamp
from runtime.status import LatencyWindow

log = logging.getLogger(__name__)

OK, WARN, ERROR = 0, 1, 2


class Transport(Protocol):
    """The ROS I/O of the node. ``kind`` is a message kind (``runtime/ros/msgs.py`` KINDS);
    ``profile`` a QoS profile: ``sensor`` (best effort, keep last 2), ``command`` (reliable,
    keep last 1), ``latched`` (reliable, transient local, keep last 1), ``status`` (reliable,
    keep last 10). Callbacks may run on any thread. ``msg`` holds the message classes."""
    msg: object

    def now(self) -> float: ...            # ROS time, seconds (header stamps)

    def subscribe(self, kind: str, topic: str, profile: str, callback: Callable) -> object: ...

    def publisher(self, kind: str, topic: str, profile: str) -> Callable[[object], None]: ...

    def level(self, value: int) -> object: ...   # DiagnosticStatus.level in the binding's type

    def close(self) -> None: ...           # drop every subscription and publisher


class LifecycleError(RuntimeError):
    pass


class RosNodeCore:
    def __init__(self, params: RosParams, transport: Transport, name: str = "tether_robot"):
        self.params, self.transport, self.name = params, transport, name
        self.state = "unconfigured"
        self.node: RobotNode | None = None
        self.cache: SensorCache | None = None
        self.teleop: TeleopInput | None = None  # the operator's input (teleop_topic)
        self.robot: RosRobot | None = None
        self.holding: str | None = None
        self.hold_counts: collections.Counter[str] = collections.Counter()
        self.lateness = LatencyWindow(4096)
        self.deadline_misses = 0
        self.commands_sent = 0
        self._publish_cmd = self._publish_diag = None
        self._held = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_diag = 0.0
        self.control_sched: tuple[str, int] = ("not started", 0)
        self._lock = threading.Lock()   # lifecycle transitions

    # -- lifecycle ---------------------------------------------------------------------------
    def _expect(self, *states: str) -> None:
        if self.state not in states:
            raise LifecycleError(f"{self.name}: cannot do this from state {self.state!r} "
                                 f"(needs {' or '.join(states)})")

    def configure(self) -> None:
        with self._lock:
            self._expect("unconfigured")
            p = self.params
            if not p.artifact:
                raise ValueError(f"{self.name}: parameter 'artifact' is empty; set it to a "
                                 f"policy artifact directory")
            desc = load_description(p.robot_description)
            self.robot = RosRobot(desc, self._send)
            secure = bool(p.learner and p.learner_ca)
            config = NodeConfig(robot_id=p.robot_id, task=p.task, artifact=p.artifact,
                                learner=None if secure else (p.learner or None),
                                spool=p.spool or None, rate_hz=p.control_rate_hz or None,
                                backend=p.backend, temperature=p.temperature,
                                on_violation=p.on_violation, margin_ticks=p.margin_ticks,
                                trusted_keys=p.trusted_key_files, allow_unsigned=p.allow_unsigned,
                                fetch=p.fetch, fetch_priority=p.fetch_priority)
            self.node = node = RobotNode(config, robot=self.robot, clock=WallClock())
            if secure:
                self._attach_learner(ChannelSpec(p.learner, p.learner_cert, p.learner_key,
                                                 p.learner_ca))
            m = node.policy.manifest
            if int(m.inputs["state_dim"]) != desc.state_dim:
                raise ValueError(f"{p.artifact}: policy state_dim {m.inputs['state_dim']} != "
                                 f"{desc.state_dim} joints of {desc.name!r}")
            cams = {c["name"]: (int(c["height"]), int(c["width"]), int(c.get("channels", 3)))
                    for c in m.cameras}
            self.cache = SensorCache(desc.joints, cams, p.max_age_s, p.max_skew_s, p.instruction)
            self._open_topics(cams)
            node.worker.start(rt_priority=worker_rt_priority(p.rt_priority or None))
            if node.client is not None:
                node.client.start()
                node.subscriber.start()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="tether-ros-control",
                                            daemon=True)
            self.state = "inactive"
            self._thread.start()
            log.info("%s: configured: policy v%d, %d Hz, cameras %s", self.name,
                     node.policy.version, round(1 / node.loop.period), sorted(cams))

    def _attach_learner(self, spec: ChannelSpec) -> None:
        """The learner over TLS (mutual when the robot has a certificate)."""
        from runtime.stream import ExperienceClient
        from runtime.weights import WeightSubscriber
        n, p = self.node, self.params
        factory = spec.channel_factory()
        n.client = ExperienceClient(p.learner, n.spool, p.robot_id, channel_factory=factory)
        n.subscriber = WeightSubscriber(p.learner, p.robot_id, n.config.staging_dir,
                                        n._on_artifact, n.policy.version,
                                        channel_factory=factory, trust=n.trust,
                                        on_rollback=n._on_rollback,
                                        **fetch_options(n.config, spec))

    def _open_topics(self, cams: dict) -> None:
        p, t, cache = self.params, self.transport, self.cache
        t.subscribe("joint_state", p.joint_states_topic, "sensor",
                    lambda m: cache.on_joint_state(m, t.now()))
        kind = "compressed_image" if p.image_transport == "compressed" else "image"
        for cam in cams:
            t.subscribe(kind, p.image_topic_for(cam), "sensor",
                        lambda m, c=cam: cache.on_image(c, m, t.now(), kind != "image"))
        t.subscribe("string", p.instruction_topic, "latched", cache.on_instruction)
        if p.teleop_topic:
            self.teleop = TeleopInput(self.robot.description.joints, p.teleop_timeout_s)
            t.subscribe("joint_state", p.teleop_topic, "sensor",
                        lambda m: self.teleop.on_joint_state(m, t.now()))
        cmd_kind = "trajectory" if p.command_mode == "trajectory" else "float64_array"
        self._publish_cmd = t.publisher(cmd_kind, p.command_topic, "command")
        self._publish_diag = t.publisher("diagnostics", p.diagnostics_topic, "status")

    def activate(self, timeout: float = 1.0) -> None:
        with self._lock:
            self._expect("inactive")
            self._held.clear()
            self.state = "active"

    def deactivate(self, timeout: float = 1.0) -> None:
        """Back to inactive; returns once the control thread has sent the hold."""
        with self._lock:
            self._expect("active")
            self._held.clear()
            self.state = "inactive"
        if not self._held.wait(timeout):
            log.warning("%s: the control thread did not confirm the hold within %.1f s",
                        self.name, timeout)

    def cleanup(self) -> None:
        with self._lock:
            self._expect("inactive")
            self._stop.set()
            if self._thread is not None:
                self._thread.join(5.0)
            self._shutdown_parts()
            self.transport.close()
            self.node = self.cache = self._thread = None
            self._publish_cmd = self._publish_diag = None
            self.state = "unconfigured"

    def shutdown(self) -> None:
        """From any state: hold, then clean up."""
        if self.state == "active":
            self.deactivate()
        if self.state == "inactive":
            self.cleanup()

    def _shutdown_parts(self) -> None:
        n = self.node
        n.worker.stop()
        if n.subscriber is not None:
            n.subscriber.stop()
        n.recorder.close()
        if n.client is not None:
            if not n.client.drain(n.config.drain_timeout_s):
                log.warning("%s: %d records stay spooled for the next run", self.name,
                            n.spool.pending())
            n.client.stop()
        self.robot.close()
        n.write_status()

    # -- the control thread ------------------------------------------------------------------
    def _run(self) -> None:
        with realtime(self.params.rt_priority) as (why, self.control_sched):
            if why is not None:
                log.warning("%s: control thread runs as a normal thread: %s", self.name, why)
            self._loop()

    def _loop(self) -> None:
        clock, period = self.node.clock, self.node.loop.period
        deadline = clock.now()
        while not self._stop.is_set():
            clock.sleep_until(deadline)
            late = clock.now() - deadline
            self.lateness.add(abs(late))
            self.deadline_misses += int(late > period / 2)
            try:
                self._tick()
            except Exception:  # never leave the thread: hold and report
                log.exception("%s: tick failed", self.name)
                self.robot.request_hold("tick failed")
            deadline += period
            behind = clock.now() - deadline
            if behind > 2 * period:
                skipped = int(behind // period)
                self.deadline_misses += skipped
                deadline += skipped * period

    def _tick(self) -> None:
        now = self.transport.now()
        reason = "inactive" if self.state != "active" else self.cache.hold_reason(now)
        if reason is None:
            if self.holding is not None:
                log.info("%s: resuming after hold (%s)", self.name, self.holding)
                self.holding = None
                self._diagnose(force=True)
            self.robot.set_observation(self.cache.observation())
            self.robot.set_operator(self.teleop.command(now) if self.teleop is not None else None)
            self.node.loop.step()
        elif self.holding is None or reason.split(":")[0] != self.holding.split(":")[0]:
            first = self.holding is None
            self.holding = reason
            self.hold_counts[reason.split(":")[0]] += int(first)
            self.robot.request_hold(reason)
            if self.robot.live:
                self.node.loop.step()   # sends the hold and ends the episode
            log.warning("%s: hold: %s", self.name, reason)
            self._diagnose(force=True)
        else:
            self.holding = reason
        if self.holding is not None:
            self._held.set()
        self._diagnose()

    def _send(self, positions: np.ndarray) -> None:
        """The robot's command publisher: a one-point trajectory reaching ``positions`` in
        ``time_from_start`` (stamp 0: start now), or a per-tick position command. The
        controller replaces its running trajectory with each message, so every message carries
        the already merged, envelope-checked command."""
        m, p = self.transport.msg, self.params
        values = [float(x) for x in positions]
        if p.command_mode == "position":
            msg = m.Float64MultiArray(layout=m.MultiArrayLayout(dim=[], data_offset=0),
                                      data=values)
        else:
            sec, nsec = to_stamp(p.time_from_start_s or self.node.loop.period)
            point = m.JointTrajectoryPoint(positions=values, velocities=[], accelerations=[],
                                           effort=[], time_from_start=m.Duration(sec=sec,
                                                                                 nanosec=nsec))
            msg = m.JointTrajectory(header=m.Header(stamp=m.Time(sec=0, nanosec=0), frame_id=""),
                                    joint_names=list(self.robot.description.joints),
                                    points=[point])
        self._publish_cmd(msg)
        self.commands_sent += 1

    # -- diagnostics -------------------------------------------------------------------------
    def diagnostics(self) -> tuple[int, str, dict]:
        n = self.node
        status = n.status()
        loop = n.loop
        if loop.stopped_by_errors or status["inference"]["errors"]:
            level, message = ERROR, f"errors: robot {loop.robot_errors}, inference " \
                                    f"{status['inference']['errors']}"
        elif self.state != "active":
            level, message = OK, f"{self.state}: holding position"
        elif self.holding:
            level, message = WARN, f"hold: {self.holding}"
        elif loop.operator_ticks and self.robot is not None and self.robot.operator_driving:
            level, message = OK, "operator driving (teleop)"
        else:
            level, message = OK, "commanding"
        inf = status["inference"]
        values = {"state": self.state, "hold_reason": self.holding or "",
                  "holds": dict(self.hold_counts), "policy_version": status["policy_version"],
                  "ticks": loop.ticks, "commands_sent": self.commands_sent,
                  "stall_ticks": loop.stall_ticks, "verifier_hold_ticks": loop.verifier_hold_ticks,
                  "operator_ticks": loop.operator_ticks, "interventions": status["interventions"],
                  "teleop_refused": self.teleop.refused if self.teleop is not None else 0,
                  "deadline_misses": self.deadline_misses,
                  "control_sched": "%s %d" % self.control_sched,
                  "jitter_p99_ms": round(1e3 * self.lateness.quantile(0.99), 3),
                  "inference_p95_ms": inf["latency_p95_ms"], "delay_ticks": inf["delay_ticks"],
                  "chunks": inf["chunks"], "actions_clamped": status["verifier"].get(
                      "actions_clamped", 0), "received": dict(self.cache.received),
                  "records_spooled": status["records_spooled"],
                  "spool_pending": status["spool_pending"]}
        return level, message, values

    def _diagnose(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_diag:
            return
        self._next_diag = now + self.params.diagnostics_period_s
        level, message, values = self.diagnostics()
        m = self.transport.msg
        sec, nsec = to_stamp(self.transport.now())
        status = m.DiagnosticStatus(level=self.transport.level(level), name=f"tether: {self.name}",
                                    message=message, hardware_id=self.params.robot_id,
                                    values=[m.KeyValue(key=k, value=str(v))
                                            for k, v in values.items()])
        self._publish_diag(m.DiagnosticArray(header=m.Header(stamp=m.Time(sec=sec, nanosec=nsec),
                                                             frame_id=""), status=[status]))
        if not force:
            self.node.write_status()
