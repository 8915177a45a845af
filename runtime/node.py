"""The robot node: wires robot, policy, action queue, inference worker, verifier, control loop,
recorder and spool, and (given a learner address) the experience client and weight subscriber.

``tether robot --robot-id ID --task TASK --artifact DIR [--learner ADDR --tls-cert C --tls-key K
--tls-ca CA | --insecure] ...`` (mutual TLS: runtime/tls.py, ``tether certs``). The node writes
``status.json`` atomically about once a second and a final one (``done: true``) after a clean
stop: control stopped, spool drained (bounded wait), threads joined. SIGTERM/SIGINT stop it
cleanly; exit code 0.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import pathlib
import signal
import sys
import threading
import time
import zlib

from robots.registry import make_robot
from runtime.artifact import POLICY, policy_digest
from runtime.chunks import STRATEGIES, ActionQueue
from runtime.clock import ScaledClock, WallClock
from runtime.control import ControlLoop
from runtime.inference import InferenceWorker
from runtime.observation_check import ObservationCheck
from runtime.policy import PolicyRunner
from runtime.priority import MAX_PRIORITY, realtime, worker_rt_priority
from runtime.recorder import Recorder
from runtime.signature import SignatureError, Trust, verify_trusted
from runtime.spool import Spool
from runtime.status import write_status
from runtime.types import TickRecord
from verifier.envelope import Envelope
from verifier.scheduler import SchedulerConfig, VerifierScheduler
from verifier.scorer import OnnxScorer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class NodeConfig:
    robot_id: str
    task: str
    artifact: str
    learner: str | None = None
    spool: str | None = None          # default: ./tether-robot/<robot_id>/spool
    status: str | None = None         # default: next to the spool
    staging: str | None = None        # fetched weights; default: next to the spool
    seconds: float | None = None      # None: until stopped
    seed: int = 0
    rate_hz: float | None = None      # default: the manifest's control rate
    camera: str = "fast"
    robot_kind: str = "metaworld"
    backend: str = "ort"
    temperature: float = 1.0
    on_violation: str = "clamp"
    verifier: SchedulerConfig = SchedulerConfig()  # used when the artifact ships verifier.onnx
    margin_ticks: int = 1
    batch_records: int = 8
    status_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    swap_window_s: float = 1.0
    metrics_port: int | None = None   # Prometheus /metrics on 127.0.0.1 (0: any free port)
    strategy: str | None = None        # merge strategy; None: prefix if the policy accepts one
    actions_per_chunk: int | None = None   # s; None: H - d - margin (held to d <= s <= H - d)
    max_obs_age_s: float | None = None     # stale-observation guard; None: off
    rt_priority: int | None = None         # control loop under SCHED_FIFO (runtime/priority.py)
    # a version whose warm-up inference (median) is slower than this is refused; None: the
    # delay the action queue can cover, (H // 2) ticks at the control rate
    latency_budget_s: float | None = None
    # signed weights (runtime/signature.py): public keys of the learner(s) this robot accepts
    # artifacts from; the initial artifact is held to the same rule as fetched ones
    trusted_keys: tuple[str, ...] = ()
    allow_unsigned: bool = False           # local development only: accept unsigned artifacts
    # mutual TLS to the learner (runtime/tls.py; the files of `tether certs robot ID`). With a
    # learner and none of them the node talks plaintext, with a warning; `tether robot` insists
    # on --insecure for that
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None     # name checked in the learner's certificate
    insecure: bool = False                 # plaintext to the learner: local development only
    # simulated robots only: a simulated operator watches this fraction of episodes and takes
    # over when the robot stalls (sim/supervisor.py); its ticks are recorded as interventions
    supervision: float = 0.0
    # simulated robots only: the robot's clock runs this many times as fast as the wall
    # (runtime.clock.ScaledClock); ``seconds``, the control rate and every latency are in its time
    sim_speed: float = 1.0
    # where a new version is fetched (runtime/fetch_process.py): "process", a child of its own
    # at ``fetch_priority`` ("idle": SCHED_IDLE, or a nice increment 1..19), so the control loop
    # keeps its cores and its GIL during a fetch; "thread": a nice thread of this process
    fetch: str = "process"
    fetch_priority: str = "idle"

    def __post_init__(self):
        if self.strategy is not None:
            if self.strategy not in STRATEGIES:
                raise ValueError(f"NodeConfig strategy {self.strategy!r} unknown (--strategy); "
                                 f"choose one of {sorted(STRATEGIES)}")
        if self.actions_per_chunk is not None and self.actions_per_chunk < 1:
            raise ValueError(f"NodeConfig actions_per_chunk must be >= 1, got {self.actions_per_chunk}")
        if self.latency_budget_s is not None and self.latency_budget_s <= 0:
            raise ValueError(f"NodeConfig latency_budget_s must be > 0 (None: derived from the "
                             f"horizon and rate), got {self.latency_budget_s}")
        if self.rt_priority is not None and not 1 <= self.rt_priority <= MAX_PRIORITY:
            raise ValueError(f"NodeConfig rt_priority must be in 1..{MAX_PRIORITY} (--rt-priority), "
                             f"got {self.rt_priority}")
        if not 0.0 <= self.supervision <= 1.0:
            raise ValueError(f"NodeConfig supervision must be in [0, 1] (--supervision), got "
                             f"{self.supervision}")
        if self.supervision and self.robot_kind != "metaworld":
            raise ValueError(f"NodeConfig supervision (--supervision) is a simulated operator "
                             f"for simulated robots; robot kind {self.robot_kind!r} has real ones")
        if not 0 < self.sim_speed < float("inf"):
            raise ValueError(f"NodeConfig sim_speed must be > 0 (--sim-speed), got {self.sim_speed}")
        if self.sim_speed != 1.0 and self.robot_kind != "metaworld":
            raise ValueError(f"NodeConfig sim_speed (--sim-speed) runs a simulated robot's clock "
                             f"faster than the wall; robot kind {self.robot_kind!r} is real")
        if self.max_obs_age_s is not None and self.max_obs_age_s <= 0:
            raise ValueError(f"NodeConfig max_obs_age_s must be > 0, got {self.max_obs_age_s}")
        if not self.robot_id or not self.task:
            raise ValueError("NodeConfig needs a robot_id and a task (--robot-id, --task)")
        if self.seconds is not None and self.seconds <= 0:
            raise ValueError(f"NodeConfig seconds must be > 0, got {self.seconds}")
        if self.rate_hz is not None and self.rate_hz <= 0:
            raise ValueError(f"NodeConfig rate_hz must be > 0 (--rate), got {self.rate_hz}")
        if isinstance(self.trusted_keys, (str, bytes)):
            raise ValueError(f"NodeConfig trusted_keys must be a tuple of key files, got the "
                             f"string {self.trusted_keys!r}")
        if self.status_interval_s <= 0 or self.drain_timeout_s < 0:
            raise ValueError("NodeConfig status_interval_s must be > 0, drain_timeout_s >= 0")
        from runtime.fetch_process import fetch_setting_error
        if why := fetch_setting_error(self.fetch, self.fetch_priority):
            raise ValueError(f"NodeConfig {why} (--fetch, --fetch-priority)")
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(tls) and not all(tls):
            raise ValueError("NodeConfig needs tls_cert, tls_key and tls_ca together (--tls-cert "
                             "--tls-key --tls-ca, made by `tether certs robot ID`)")
        if any(tls) and self.insecure:
            raise ValueError("NodeConfig insecure (--insecure) contradicts tls_* (--tls-*); "
                             "choose one")

    @property
    def spool_dir(self) -> pathlib.Path:
        return pathlib.Path(self.spool or pathlib.Path("tether-robot") / self.robot_id / "spool")

    @property
    def status_path(self) -> pathlib.Path:
        return pathlib.Path(self.status) if self.status else self.spool_dir.parent / "status.json"

    @property
    def staging_dir(self) -> pathlib.Path:
        return pathlib.Path(self.staging) if self.staging else self.spool_dir.parent / "weights"


class RobotNode:
    def __init__(self, config: NodeConfig, robot=None, clock=None):
        c = self.config = config
        self.clock = clock or (ScaledClock(c.sim_speed) if c.sim_speed != 1.0 else WallClock())
        self.trust = Trust.load(c.trusted_keys, c.allow_unsigned)
        if c.allow_unsigned:
            log.warning("node: --allow-unsigned: unsigned policy artifacts are accepted (local "
                        "development only; robots in the field need --trusted-key)")
        initial = verify_trusted(c.artifact, self.trust)  # the initial artifact too
        extra = {"supervision": c.supervision} if c.supervision else {}
        self.robot = robot or make_robot(c.robot_kind, task=c.task, seed=c.seed, camera=c.camera,
                                         clock=self.clock, **extra)
        self.description = self.robot.describe()
        self.policy = self._load_policy(pathlib.Path(c.artifact), initial)
        rate = c.rate_hz or self.policy.manifest.control_rate_hz or self.description.control_rate_hz
        self.queue = ActionQueue(self.policy.action_dim)
        self.envelope = Envelope(self.description, c.on_violation)
        self.gate = VerifierScheduler(None, c.verifier, self.envelope)
        warm_p95 = self._clock_seconds(self.policy.latency["total"].quantile(0.95))
        self.worker = InferenceWorker(self.policy, self.queue, self.clock, rate_hz=rate,
                                      gate=self.gate, margin_ticks=c.margin_ticks,
                                      initial_latency_s=warm_p95,
                                      strategy=c.strategy, actions_per_chunk=c.actions_per_chunk,
                                      max_obs_age_s=c.max_obs_age_s)
        self.spool = Spool(c.spool_dir, c.robot_id)
        self.recorder = Recorder(self.spool, c.robot_id, c.task, c.batch_records,
                                 envelope=self.envelope)
        self.loop = ControlLoop(self.robot, self.queue, self.envelope, self.clock, rate,
                                self._on_tick, worker=self.worker,
                                to_command=self.worker.to_command,
                                from_command=self.worker.from_command,
                                on_episode_start=self._on_episode_start,
                                on_episode_end=self._on_episode_end,
                                episode_gate=self._episode_gate,
                                observation_check=self._check_observation,
                                on_hold=self._on_hold)
        self.client = self.subscriber = None
        if c.learner:
            from runtime.stream import ExperienceClient
            from runtime.weights import WeightSubscriber
            channels = self._channel_factory()
            self.client = ExperienceClient(c.learner, self.spool, c.robot_id,
                                           channel_factory=channels)
            self.subscriber = WeightSubscriber(c.learner, c.robot_id, c.staging_dir,
                                               self._on_artifact, self.policy.version,
                                               trust=self.trust, on_rollback=self._on_rollback,
                                               channel_factory=channels, **fetch_options(c))
        # the policy's own episodes. An episode an operator watched (``robot.supervised``, a
        # simulated operator) or drove (any operator tick) is supervised: its outcome is not the
        # policy's alone, and leaving out only the taken-over ones would drop the failures an
        # operator caught and inflate the rate
        self.successes = 0
        self.episodes = 0
        self.supervised_episodes = 0
        self._assisted = False
        self.success_by_version: dict[int, list[int]] = {}
        self.swap_stall_ticks = 0
        self.events: collections.deque[str] = collections.deque(maxlen=32)
        self._episode_chunks: dict[int, set[int]] = collections.defaultdict(set)
        self._obs_check: tuple[object, ObservationCheck] | None = None  # (policy, its check)
        self._done = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # episode tallies: control thread writes, status reads

    def _channel_factory(self):
        """Channels to the learner: mutual TLS when configured (runtime/tls.py), else plaintext."""
        c = self.config
        if c.tls_cert:
            from runtime.tls import TlsConfig
            return TlsConfig(c.tls_cert, c.tls_key, c.tls_ca, c.tls_server_name).channel_factory()
        from runtime.stream import insecure_channel
        log.warning("node: plaintext: local development only (learner %s without TLS; robots in "
                    "the field need --tls-cert --tls-key --tls-ca)", c.learner)
        return insecure_channel

    def _clock_seconds(self, wall_s: float) -> float:
        """A wall-clock duration (a warm-up latency) in the node's clock time."""
        return wall_s * getattr(self.clock, "speed", 1.0)

    # -- policies ----------------------------------------------------------------------------
    def _load_policy(self, path: pathlib.Path, verified=None) -> PolicyRunner:
        """``verified``: the manifest, signature and file hashes already checked."""
        c = self.config
        # a noise stream of its own per version folder: reseeding every swap with the same seed
        # would replay this robot's exploration noise version after version (correlated RL data)
        seed = (c.seed * 1_000_003 + zlib.crc32(path.name.encode())) % 2**32
        runner = PolicyRunner(path, backend=c.backend, seed=seed, temperature=c.temperature,
                              verified=verified, base=getattr(self, "policy", None))
        if runner.action_dim != self.description.action_dim:
            raise ValueError(f"{path}: policy actions have {runner.action_dim} dims, robot "
                             f"{self.description.name!r} takes {self.description.action_dim}")
        runner.warmup(3)
        runner.check()
        self._check_latency(runner)
        # the scorer ships with (and swaps with) the policy version whose features it reads
        runner.scorer = OnnxScorer.from_artifact(path, runner.manifest)
        return runner

    def _check_latency(self, runner: PolicyRunner) -> None:
        """Refuse a policy too slow for the control rate: its chunks would arrive after the
        queue ran dry, and the robot would spend its time holding (a deliberately or
        accidentally heavy graph). Median of the warm-up runs: one slow first run is normal."""
        c = self.config
        rate = c.rate_hz or runner.manifest.control_rate_hz or self.description.control_rate_hz
        budget = c.latency_budget_s or max(1, runner.horizon // 2) / rate
        took = self._clock_seconds(runner.latency["total"].quantile(0.5))
        if took > budget:
            raise RuntimeError(f"policy v{runner.version} is too slow: warm-up inference takes "
                               f"{1e3 * took:.1f} ms (median), over the latency budget of "
                               f"{1e3 * budget:.1f} ms (NodeConfig.latency_budget_s; default "
                               f"H//2 = {runner.horizon // 2} ticks at {rate:g} Hz)")

    def _on_artifact(self, path: pathlib.Path, manifest) -> None:
        """Called on the subscriber's thread: load, warm up, check, stage. Raising refuses the
        version (the subscriber logs it) and the robot keeps running its current one."""
        try:
            runner = self._load_policy(path, manifest)  # the subscriber verified it
            self.worker.stage(runner)
        except Exception as e:
            self._event(f"refused v{manifest.version}: {type(e).__name__}: {e}")
            raise
        self._event(f"staged v{runner.version} from {path}")

    def _on_rollback(self, version: int, files: dict[str, str]) -> bool:
        """A canary rolled back: swap the previous policy back in if it is that version (same
        policy files; verified when it was installed). False: the subscriber fetches it."""
        prev = self.worker.previous
        if (prev is None or prev.version != version
                or POLICY not in files
                or policy_digest(files) != getattr(prev, "weight_sha256", None)):
            return False
        self.worker.stage(prev)
        self._event(f"rolling back to v{version} (still loaded)")
        return True

    def _check_observation(self, obs):
        """The control loop's per-tick check, for the cameras and state of the running policy."""
        policy = self.worker.policy
        if self._obs_check is None or self._obs_check[0] is not policy:
            self._obs_check = (policy, ObservationCheck.for_manifest(
                policy.manifest, self.config.max_obs_age_s, self.clock.now))
        return self._obs_check[1](obs)

    def _on_hold(self, reason: str | None) -> None:
        self._event(f"holding: {reason}" if reason else "observations good again: commanding")

    def _event(self, message: str) -> None:
        self.events.append(message)
        log.info("node: %s", message)

    # -- loop callbacks (control thread) -----------------------------------------------------
    def _episode_gate(self) -> str | None:
        """The learner's staleness gate: no new episode on a version below its min_version. A
        staged version counts: it is swapped in at the episode's first inference."""
        sub = self.subscriber
        if sub is None or sub.min_version <= sub.current_version:
            return None
        return (f"the learner wants version >= {sub.min_version} (staleness gate); "
                f"have v{sub.current_version}")

    def _on_episode_start(self, epoch: int) -> None:
        self._episode_chunks.clear()
        self._assisted = False
        self.recorder.start_episode()

    def _on_tick(self, t: TickRecord) -> None:
        if t.chunk is None:
            # an underrun at an episode's start is the reset's (the queue was emptied), not
            # the swap's; only mid-episode underruns near a swap count against it (a verifier
            # or observation hold is a decision, counted by the control loop)
            swapped = self.worker.last_swap_time
            if (t.held == "underrun" and self._episode_chunks and swapped is not None
                    and self.clock.now() - swapped <= self.config.swap_window_s):
                self.swap_stall_ticks += 1
        else:
            self._episode_chunks[t.chunk.policy_version].add(t.chunk.chunk_id)
        self._assisted = self._assisted or t.operator
        self.recorder.on_tick(t)

    def _on_episode_end(self, epoch: int, success: bool) -> None:
        self.recorder.end_episode()
        chunks = self._episode_chunks
        version = (max(chunks, key=lambda v: (len(chunks[v]), v)) if chunks
                   else self.worker.policy.version)
        with self._lock:
            if self._assisted or getattr(self.robot, "supervised", False):
                self.supervised_episodes += 1
                return
            acc = self.success_by_version.setdefault(version, [0, 0])
            acc[0] += int(success)
            acc[1] += 1
            self.successes += int(success)
            self.episodes += 1

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict:
        c, w = self.config, self.worker
        lat = w.policy.latency["total"]
        with self._lock:
            episodes, successes, supervised = self.episodes, self.successes, self.supervised_episodes
            by_version = {str(v): list(a) for v, a in sorted(self.success_by_version.items())}
        return {
            "robot_id": c.robot_id, "task": c.task, "policy_version": w.policy.version,
            "versions_run": w.versions(), "episodes": episodes, "successes": successes,
            "success_by_version": by_version,
            "supervised_episodes": supervised, "interventions": self.recorder.interventions,
            "records_spooled": self.spool.records_spooled, "records_acked": self.spool.records_acked,
            "records_dropped": self.recorder.records_dropped,  # spool full or disk error
            "spool_pending": self.spool.pending(), "control": self.loop.stats(),
            "swap_stall_ticks": self.swap_stall_ticks, "swaps": w.swaps,
            "gate_wait_ticks": self.loop.gate_wait_ticks,
            "min_version": self.subscriber.min_version if self.subscriber else 0,
            "verifier": {**self.gate.stats(), "by_reason": self.envelope.stats()},
            "inference": {"latency_p50_ms": round(1e3 * lat.quantile(0.5), 3),
                          "latency_p95_ms": round(1e3 * lat.quantile(0.95), 3),
                          "request_p95_ms": round(1e3 * w.latency.quantile(0.95), 3),
                          "delay_ticks": w.delay_ticks(), "chunks": w.chunks,
                          "stages": w.policy.latency_stats(),
                          "errors": w.errors, "backend": w.policy.backend.info()},
            "queue_depth": len(self.queue), "events": list(self.events), "done": self._done,
            "control_sched": list(getattr(self, "control_sched", ("not started", 0))),
            "inference_sched": list(w.sched or ("not started", 0)),
            "swapped_at": w.last_swap_time,  # the node's clock (monotonic on a real robot)
            "weights": self.subscriber.status() if self.subscriber is not None else None,
        }

    def write_status(self) -> None:
        try:
            write_status(self.config.status_path, self.status())
        except OSError as e:
            log.error("node: could not write %s: %s", self.config.status_path, e)

    def _status_loop(self) -> None:
        while not self._stop.wait(self.config.status_interval_s):
            self.write_status()

    # -- lifecycle ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask a running node to stop (safe from signal handlers and other threads)."""
        self._stop.set()
        self.loop.stop()

    def run(self, seconds: float | None = None) -> dict:
        seconds = self.config.seconds if seconds is None else seconds
        status_thread = threading.Thread(target=self._status_loop, name="tether-status",
                                         daemon=True)
        # inference under SCHED_FIFO too, below the loop: it must keep the queue fed under load
        self.worker.start(rt_priority=worker_rt_priority(self.config.rt_priority))
        self.metrics = None
        if self.config.metrics_port is not None:
            from runtime.metrics import MetricsServer
            self.metrics = MetricsServer(self.status, self.config.metrics_port).start()
            self._event(f"metrics on http://127.0.0.1:{self.metrics.port}/metrics")
        if self.client is not None:
            self.client.start()
            self.subscriber.start()
        status_thread.start()
        rt = self.config.rt_priority
        try:
            # this thread runs the loop; shutting down (draining, closing) is not real-time work
            with realtime(rt) as (why, self.control_sched):
                if why is not None:
                    log.warning("node: control loop runs as a normal thread: %s", why)
                if rt:
                    self._event(f"control loop at SCHED_FIFO priority {rt}" if why is None
                                else f"control loop runs as a normal thread: {why}")
                self.loop.run(seconds)
        finally:
            self._shutdown(status_thread)
        return self.status()

    def _shutdown(self, status_thread: threading.Thread) -> None:
        self.worker.stop()
        if getattr(self, "metrics", None) is not None:
            self.metrics.stop()
        if self.subscriber is not None:
            self.subscriber.stop()
        self.recorder.close()
        if self.client is not None:
            drained = self.client.drain(self.config.drain_timeout_s)
            if not drained:
                self._event(f"spool not drained within {self.config.drain_timeout_s:g} s; "
                            f"{self.spool.pending()} records stay spooled for the next run")
            self.client.stop()
        self._stop.set()
        status_thread.join(5.0)
        try:
            self.robot.close()
        except Exception as e:
            log.error("node: robot close failed: %s", e)
        self._done = True
        self.write_status()


def fetch_options(c: NodeConfig, spec=None) -> dict:
    """WeightSubscriber's fetch arguments for this config: the child process's channel (``spec``,
    a ChannelSpec; default: the config's learner address and TLS files) and priority."""
    if c.fetch == "thread" or os.name != "posix":  # the parent waits on the child's pipe (select)
        return {}
    from runtime.fetch_process import IDLE, ChannelSpec
    spec = spec or ChannelSpec(c.learner, c.tls_cert or "", c.tls_key or "", c.tls_ca or "",
                               c.tls_server_name or "")
    prio = IDLE if c.fetch_priority == "idle" else int(c.fetch_priority)
    return {"fetch_process": spec, "fetch_priority": prio}


def parse_args(argv: list[str] | None) -> NodeConfig:
    p = argparse.ArgumentParser(prog="tether robot", description="Run one robot's inference node.")
    p.add_argument("--robot-id", required=True)
    p.add_argument("--task", required=True, help="task name, e.g. a Meta-World task (reach-v3)")
    p.add_argument("--artifact", required=True, help="policy artifact directory")
    p.add_argument("--learner", default=None, help="learner address host:port (none: offline)")
    p.add_argument("--spool", default=None, help="spool directory")
    p.add_argument("--status", default=None, help="status JSON file")
    p.add_argument("--seconds", type=float, default=None,
                   help="run time on the robot's clock (default: until stopped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=None, help="control rate in Hz")
    p.add_argument("--camera", default="fast", help="simulated camera: fast | mujoco")
    p.add_argument("--robot", default="metaworld", help="robot kind (robots/registry.py)")
    p.add_argument("--backend", default="ort", help="policy backend (runtime/backends)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus /metrics on this port (0: any free port)")
    p.add_argument("--strategy", default=None,
                   help="chunk merge: prefix | latest | ensemble | average (default: prefix when "
                        "the policy accepts an action prefix, else latest)")
    p.add_argument("--actions-per-chunk", type=int, default=None,
                   help="actions executed per chunk s (held to d <= s <= H - d)")
    p.add_argument("--rt-priority", type=int, default=None,
                   help="run the control loop under SCHED_FIFO at this priority (1..99; Linux, "
                        "needs root, CAP_SYS_NICE or ulimit -r); default: a normal thread")
    p.add_argument("--max-obs-age", type=float, default=None,
                   help="seconds after which an observation is too old to infer from")
    p.add_argument("--latency-budget", type=float, default=None,
                   help="refuse a policy version whose warm-up inference (median) takes longer "
                        "(seconds; default: H//2 ticks at the control rate)")
    p.add_argument("--trusted-key", action="append", default=[], metavar="PUB",
                   help="learner public key (PEM) whose signed artifacts this robot accepts; "
                        "repeatable (e.g. during a key rotation)")
    p.add_argument("--allow-unsigned", action="store_true",
                   help="accept unsigned artifacts (local development only)")
    p.add_argument("--status-interval", type=float, default=NodeConfig.status_interval_s,
                   help="seconds between status.json writes")
    p.add_argument("--tls-cert", help="this robot's certificate (PEM; `tether certs robot ID`)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--tls-ca", help="the fleet CA certificate (PEM) that signed the learner's")
    p.add_argument("--tls-server-name", help="name to check in the learner's certificate when "
                   "it differs from the host in --learner")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext to the learner, no authentication (local development only)")
    p.add_argument("--fetch", choices=("process", "thread"), default=NodeConfig.fetch,
                   help="fetch new versions in a child process of their own (default) or in a "
                        "thread of this one")
    p.add_argument("--fetch-priority", default=NodeConfig.fetch_priority,
                   help="the fetch process's CPU priority: idle (SCHED_IDLE: only cores nothing "
                        "else wants; default) or a nice increment 1..19")
    p.add_argument("--supervision", type=float, default=0.0,
                   help="simulated robots: fraction of episodes a simulated operator watches, "
                        "taking over when the robot stalls (recorded as human interventions)")
    p.add_argument("--sim-speed", type=float, default=1.0,
                   help="simulated robots: run the robot's clock this many times as fast as the "
                        "wall (more experience per minute where the cores allow it)")
    a = p.parse_args(argv)
    if a.learner and not (a.tls_cert or a.tls_key or a.tls_ca or a.insecure):
        p.error("--learner needs mutual TLS: --tls-cert DIR/cert.pem --tls-key DIR/key.pem "
                "--tls-ca DIR/ca.pem (from `tether certs robot ID`), or --insecure for local "
                "development")
    tls = {"--tls-cert": a.tls_cert, "--tls-key": a.tls_key, "--tls-ca": a.tls_ca}
    if any(tls.values()) and not all(tls.values()):
        p.error(f"mutual TLS needs all of --tls-cert --tls-key --tls-ca; missing "
                f"{' '.join(k for k, v in tls.items() if not v)}")
    return NodeConfig(robot_id=a.robot_id, task=a.task, artifact=a.artifact, learner=a.learner,
                      spool=a.spool, status=a.status, seconds=a.seconds, seed=a.seed,
                      rate_hz=a.rate, camera=a.camera, robot_kind=a.robot, backend=a.backend,
                      metrics_port=a.metrics_port, strategy=a.strategy,
                      actions_per_chunk=a.actions_per_chunk, max_obs_age_s=a.max_obs_age,
                      latency_budget_s=a.latency_budget, rt_priority=a.rt_priority,
                      trusted_keys=tuple(a.trusted_key), allow_unsigned=a.allow_unsigned,
                      status_interval_s=a.status_interval, tls_cert=a.tls_cert,
                      tls_key=a.tls_key, tls_ca=a.tls_ca, tls_server_name=a.tls_server_name,
                      insecure=a.insecure, supervision=a.supervision, fetch=a.fetch,
                      fetch_priority=a.fetch_priority, sim_speed=a.sim_speed)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = parse_args(argv)
    from runtime.tls import TlsError
    try:
        node = RobotNode(config)
    except SignatureError as e:
        print(f"tether robot: refusing the initial artifact: {e}", file=sys.stderr)
        return 2
    except TlsError as e:
        print(f"tether robot: TLS: {e}", file=sys.stderr)
        return 2
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda *_: node.stop())
    try:
        t0 = time.monotonic()
        status = node.run()
        log.info("node: stopped after %.1f s: %d ticks, %d episodes, versions %s",
                 time.monotonic() - t0, status["control"]["ticks"], status["episodes"],
                 status["versions_run"])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 1 if node.loop.stopped_by_errors else 0


if __name__ == "__main__":
    sys.exit(main())
