"""Canary rollout: a new version goes to a few robots first, and is promoted to the whole fleet
or rolled back on what those robots measure with it (DESIGN.md, Weights).

Stages: every subscribed robot runs the *stable* version; when the registry holds a newer
version (not rolled back), it becomes the *canary*: ``ceil(fraction x subscribed robots)`` of
them (never all of a fleet of two or more; a different subset per version) are told to run it.
Versions published while a canary is out wait; the next canary is the newest of them. Once the
canary version has run ``episodes`` complete episodes (an episode counts for the version that
produced most of its chunks), it is compared with the stable version:

    success   rolled back when even the optimistic (Wilson upper bound, z = confidence_z)
              canary success rate is below the stable rate - max_success_drop
    safety    rolled back when its interventions per chunk (envelope clamps,
              VerifierInfo.actions_clamped, plus verifier rejections) exceed the stable
              version's by more than max_safety_increase

and otherwise promoted (stable for everyone); a stable version with nothing measured yet gives
no grounds for a rollback. A canary that does not get its episodes within
``timeout_s`` is rolled back. A rolled back version is never announced again; the robots that
ran it are told the stable version with ``rollback`` set. ``fraction = 0`` turns canaries off:
every robot gets the newest version at once.

Everything is measured from the experience store (``observe`` takes records; ``start`` runs a
thread that reads the store). Decisions persist in ``<registry>/rollout.json``.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import threading
import time
import typing

from runtime.artifact import write_atomic

log = logging.getLogger("tether.learner.canary")

STATE_FILE = "rollout.json"
MAX_OPEN_EPISODES = 10_000


_OPERATOR = -1  # the open-episode counter's key for an operator's chunks (versions are >= 1)


class Outcome(typing.NamedTuple):
    """What the rollout measures of one stored chunk (the store's typed columns)."""
    robot_id: str
    episode_id: str
    policy_version: int
    interventions: int | None   # None: stored before the store had the column
    terminated: bool
    truncated: bool
    success: bool
    human_intervention: bool = False  # an operator's chunk: not the version's doing

    @classmethod
    def of(cls, r) -> "Outcome":
        """From a pb.ChunkRecord."""
        return cls(r.robot_id, r.episode_id, int(r.policy_version),
                   int(r.verifier.actions_clamped) + int(r.verifier.rejected),
                   bool(r.terminated), bool(r.truncated), bool(r.success),
                   bool(r.human_intervention))


@dataclasses.dataclass(frozen=True)
class CanaryConfig:
    fraction: float = 0.25           # of the subscribed robots; 0 = no canaries
    episodes: int = 2                # canary episodes on the new version before deciding
    max_success_drop: float = 0.25   # tolerated success-rate drop vs the stable version
    confidence_z: float = 1.0        # Wilson bound: roll back only on evidence, not on noise
    max_safety_increase: float = 0.5  # tolerated extra interventions per chunk
    timeout_s: float = 300.0         # no verdict in time: roll back
    baseline_episodes: int = 32      # recent stable-version episodes the canary is held to
    poll_s: float = 0.5              # store reads and decisions

    def __post_init__(self):
        checks = {"fraction": 0 <= self.fraction <= 1, "episodes": self.episodes >= 1,
                  "max_success_drop": 0 <= self.max_success_drop <= 1,
                  "confidence_z": self.confidence_z >= 0,
                  "max_safety_increase": self.max_safety_increase >= 0,
                  "timeout_s": self.timeout_s > 0, "baseline_episodes": self.baseline_episodes >= 1,
                  "poll_s": self.poll_s > 0}
        bad = [f"{k}={getattr(self, k)!r}" for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"CanaryConfig: invalid {', '.join(bad)} (--canary-fraction in "
                             f"[0, 1], --canary-episodes >= 1)")


@dataclasses.dataclass(frozen=True)
class Assignment:
    """What one robot is told: run ``version`` (why: ``stage``), gate episodes at min_version."""
    version: int
    stage: str
    min_version: int


def wilson_upper(successes: int, n: int, z: float) -> float:
    if n == 0:
        return 1.0
    p = successes / n
    d = 1 + z * z / n
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return min(1.0, (p + z * z / (2 * n) + spread) / d)


class VersionStats:
    """What the fleet measured with one version."""

    def __init__(self, window: int):
        self.chunks = 0
        self.interventions = 0
        self.episodes = 0
        self.successes = 0
        self.recent: collections.deque[bool] = collections.deque(maxlen=window)

    def safety(self) -> float:
        return self.interventions / self.chunks if self.chunks else 0.0

    def recent_success(self) -> float | None:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def summary(self) -> dict:
        return {"episodes": self.episodes, "successes": self.successes, "chunks": self.chunks,
                "success_rate": round(self.successes / self.episodes, 4) if self.episodes else None,
                "interventions_per_chunk": round(self.safety(), 4)}


@dataclasses.dataclass
class Canary:
    version: int
    robots: frozenset[str]
    started: float


class RolloutController:
    """Which version each robot runs. Thread-safe; ``assignment`` is cheap (gRPC streams call it
    on every change), decisions are made by ``evaluate`` (the ``start`` thread)."""

    def __init__(self, registry, store=None, config: CanaryConfig = CanaryConfig(), *,
                 clock=time.monotonic, on_rollback=None):
        """``on_rollback(stable)``: called (on the deciding thread, outside the lock) after a
        rollback, so the trainer can go back to the stable version's weights."""
        self.registry, self.store, self.config = registry, store, config
        self.on_rollback = on_rollback
        self._clock = clock
        self._lock = threading.RLock()
        self._subscribed: collections.Counter[str] = collections.Counter()
        self._stats: dict[int, VersionStats] = {}
        self._open: collections.OrderedDict = collections.OrderedDict()  # (robot, ep) -> [...]
        self._cursor = 0
        self.canary: Canary | None = None
        self.rolled_back: set[int] = set()
        self.decisions: list[dict] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.stable = self._load_state()
        self._pin()

    # -- state on disk -----------------------------------------------------------------------
    @property
    def state_path(self):
        return self.registry.root / STATE_FILE

    def _load_state(self) -> int:
        latest = self.registry.latest()
        try:
            d = json.loads(self.state_path.read_text())
            self.rolled_back = {int(v) for v in d.get("rolled_back", [])}
            self.decisions = list(d.get("decisions", []))[-50:]
            stable = int(d.get("stable", 0))
        except FileNotFoundError:
            stable = 0
        except (OSError, ValueError, TypeError) as e:
            log.error("rollout: %s unreadable (%s); starting from the latest version",
                      self.state_path, e)
            stable = 0
        if not 0 < stable <= latest:
            stable = self._newest_allowed(latest)
        return stable

    def _save_state(self) -> None:
        d = {"stable": self.stable, "rolled_back": sorted(self.rolled_back),
             "decisions": self.decisions[-50:]}
        try:
            write_atomic(self.state_path, json.dumps(d, indent=1).encode())
        except OSError as e:
            log.error("rollout: could not write %s: %s", self.state_path, e)

    def _newest_allowed(self, latest: int) -> int:
        v = latest
        while v > 1 and v in self.rolled_back:
            v -= 1
        return v

    # -- robots ------------------------------------------------------------------------------
    def join(self, robot_id: str) -> None:
        """A robot's stream opened (its first ``assignment`` may start a waiting canary)."""
        with self._lock:
            self._subscribed[robot_id] += 1

    def leave(self, robot_id: str) -> None:
        with self._lock:
            self._subscribed[robot_id] -= 1
            if self._subscribed[robot_id] <= 0:
                del self._subscribed[robot_id]

    def assignment(self, robot_id: str) -> Assignment:
        with self._lock:
            started = self._refresh()
            if self.canary is not None and robot_id in self.canary.robots:
                version, stage = self.canary.version, "canary"
            else:
                version, stage = self.stable, "stable"
        if started:
            self._changed()
        # the staleness gate never holds a robot for a version it is not being given: capped at
        # its assignment while a newer version exists that it is not offered (a canary elsewhere,
        # a rollback). A gate above every published version passes: at staleness 0 the trainer
        # closes it before publishing, and robots wait for the version being trained
        gate = self.registry.min_version
        if version < self.registry.latest():
            gate = min(gate, version)
        return Assignment(version, stage, gate)

    def _changed(self) -> None:
        notify = getattr(self.registry, "notify_subscribers", None)
        if notify is not None:
            notify()

    # -- stages ------------------------------------------------------------------------------
    def _pin(self) -> None:
        """Keep the stable and canary versions in the registry however old they get (its
        retention; a registry without one has no ``pin``). Call with the lock held."""
        pin = getattr(self.registry, "pin", None)
        if pin is not None:
            pin("rollout", {self.stable, self.canary.version if self.canary else 0})

    def _refresh(self) -> bool:
        """Follow the registry: a newer version becomes the canary (or stable without canaries).
        Returns whether a canary started. Call with the lock held."""
        started = self._follow()
        self._pin()
        return started

    def _follow(self) -> bool:
        latest = self.registry.latest()
        if self.config.fraction == 0:
            self.stable = max(self.stable, self._newest_allowed(latest))
            return False
        if self.canary is not None or latest <= self.stable or latest in self.rolled_back:
            return False
        robots = sorted(self._subscribed)
        if not robots:
            return False  # nobody to try it on yet; it starts when robots subscribe
        k = max(1, math.ceil(self.config.fraction * len(robots)))
        if len(robots) > 1:
            k = min(k, len(robots) - 1)  # someone stays on stable: the baseline keeps running
        # a different subset per version, the same one for every call
        order = sorted(robots, key=lambda r: hashlib.sha256(f"{latest}:{r}".encode()).digest())
        self.canary = Canary(latest, frozenset(order[:k]), self._clock())
        log.info("rollout: canary v%d on %s (%d of %d robots); stable stays v%d", latest,
                 sorted(self.canary.robots), k, len(robots), self.stable)
        return True

    def evaluate(self, now: float | None = None) -> str | None:
        """Decide the canary if it has its episodes (or timed out): "promoted", "rolled back"
        or None."""
        c = self.config
        with self._lock:
            canary = self.canary
            if canary is None:
                return None
            now = self._clock() if now is None else now
            new = self._stats.get(canary.version) or VersionStats(c.baseline_episodes)
            base = self._stats.get(self.stable) or VersionStats(c.baseline_episodes)
            reason = None
            if new.episodes >= c.episodes:
                base_success = base.recent_success()
                upper = wilson_upper(new.successes, new.episodes, c.confidence_z)
                if base_success is not None and upper < base_success - c.max_success_drop:
                    reason = (f"success {new.successes}/{new.episodes} (upper bound {upper:.2f}) "
                              f"vs stable {base_success:.2f} - {c.max_success_drop}")
                elif base.chunks and new.safety() > base.safety() + c.max_safety_increase:
                    reason = (f"{new.safety():.2f} interventions per chunk vs stable "
                              f"{base.safety():.2f} + {c.max_safety_increase}")
                verdict = "rolled back" if reason else "promoted"
            elif now - canary.started > c.timeout_s:
                reason = (f"only {new.episodes} of {c.episodes} canary episodes in "
                          f"{c.timeout_s:g} s")
                verdict = "rolled back"
            else:
                return None
            entry = {"version": canary.version, "decision": verdict, "stable_before": self.stable,
                     "robots": sorted(canary.robots), "canary": new.summary(),
                     "stable_metrics": base.summary(), "reason": reason or "",
                     "seconds": round(now - canary.started, 2), "time": time.time()}
            if reason:
                # versions published while this canary was out were trained on from its weights:
                # they inherit its fault, so they are never announced either
                latest = self.registry.latest()
                heirs = [v for v in range(canary.version + 1, latest + 1) if v not in self.rolled_back]
                entry["descendants_rolled_back"] = heirs
                self.rolled_back.update([canary.version, *heirs])
            else:
                self.stable = canary.version
            self.canary = None
            self.decisions.append(entry)
            self._save_state()
            log.log(logging.WARNING if reason else logging.INFO, "rollout: v%d %s%s",
                    entry["version"], verdict,
                    f": {reason}" if reason else f" after {new.episodes} canary episodes")
            self._refresh()  # the next canary, if a newer version waits
            stable = self.stable
        self._changed()
        if reason and self.on_rollback is not None:
            self.on_rollback(stable)
        return verdict

    # -- measurements ------------------------------------------------------------------------
    def observe(self, records) -> None:
        """Feed chunk records (pb.ChunkRecord or ``Outcome``), in store order."""
        window = self.config.baseline_episodes
        with self._lock:
            for r in records:
                if not isinstance(r, Outcome):
                    r = Outcome.of(r)
                v = int(r.policy_version)
                s = self._stats.get(v)
                if s is None:
                    s = self._stats[v] = VersionStats(window)
                key = (r.robot_id, r.episode_id)
                counts = self._open.get(key)
                if counts is None:
                    counts = self._open[key] = collections.Counter()
                    while len(self._open) > MAX_OPEN_EPISODES:
                        self._open.popitem(last=False)
                if r.human_intervention:
                    # an operator drove: neither its chunks nor the episode's outcome are the
                    # version's (its success would be the operator's)
                    counts[_OPERATOR] += 1
                else:
                    s.chunks += 1
                    s.interventions += r.interventions or 0
                    counts[v] += 1
                if r.terminated or r.truncated:
                    del self._open[key]
                    if counts.pop(_OPERATOR, 0) or not counts:
                        continue
                    owner = max(counts, key=lambda x: (counts[x], x))
                    o = self._stats.setdefault(owner, VersionStats(window))
                    o.episodes += 1
                    o.successes += int(bool(r.success))
                    o.recent.append(bool(r.success))

    def poll_store(self, limit: int = 4096) -> int:
        """Observe up to ``limit`` newly stored chunks; returns how many. Reads the store's typed
        columns only: parsing every record back (images included) cost the learner as much CPU
        as a sixth of ingest."""
        tables = self.store.scan(list(Outcome._fields), self._cursor, limit)
        table = next(iter(tables), None)
        if table is None or table.num_rows == 0:
            return 0
        cols = [table.column(n).to_pylist() for n in Outcome._fields]
        self._cursor = table.column("rowid")[-1].as_py()
        self.observe(Outcome(*row) for row in zip(*cols))
        return table.num_rows

    def start(self) -> "RolloutController":
        if self.config.fraction == 0 or self.store is None:
            return self  # nothing to measure or decide
        self._thread = threading.Thread(target=self._run, name="rollout", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                while self.poll_store() and not self._stop.is_set():
                    pass
                self.evaluate()
            except Exception as e:  # keep deciding on what is known; say so in the status
                self.error = e
                log.exception("rollout: measuring failed")
            self._stop.wait(self.config.poll_s)

    # -- status ------------------------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            canary = None
            if self.canary is not None:
                s = self._stats.get(self.canary.version)
                canary = {"version": self.canary.version, "robots": sorted(self.canary.robots),
                          "seconds": round(self._clock() - self.canary.started, 1),
                          **(s.summary() if s else {"episodes": 0})}
            return {"stage": "canary" if canary else "stable", "stable": self.stable,
                    "canary": canary, "rolled_back": sorted(self.rolled_back),
                    "robots": sorted(self._subscribed),
                    "versions": {str(v): s.summary() for v, s in sorted(self._stats.items())},
                    "decisions": self.decisions[-10:], "config": dataclasses.asdict(self.config),
                    "error": repr(self.error) if self.error else None}
