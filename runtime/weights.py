"""The weight subscriber: the robot's end of the control plane (DESIGN.md, Contracts: Weights).

One thread holds a ``Subscribe`` stream (reconnecting with backoff) and remembers only the newest
announcement; another fetches it. Latest-wins: when a newer version is announced during a fetch,
the fetch is abandoned at the next chunk and the newest is fetched instead (its ``.partial``
folder stays, so coming back to it resumes).

A fetch writes ``staging_dir/v<version>.partial/<file>``, resuming each file from the bytes
already on disk after a broken stream; checks every file's sha256 and size against the
announcement and the manifest (``verify_trusted``); renames the folder to
``staging_dir/v<version>/`` and hands it to ``on_artifact(path, manifest)`` (the node's
warm-up, parity check and swap). Anything that does not match, or an ``on_artifact`` that
raises, refuses that version: logged, counted, its folder removed, the current version kept,
and the version not fetched again. Only the newest ``keep`` staged versions stay on disk.

Signatures (runtime/signature.py): the manifest is fetched first and its ed25519 signature
checked against ``trust`` before any other byte is fetched; unsigned (unless
``trust.allow_unsigned``), unknown-key, re-signed or tampered artifacts are refused like any
other mismatch.

Rollback (canary rollout on the learner): an announcement with ``rollback`` set may name a
version lower than the current one. The robot goes back to it -- from memory when
``on_rollback(version, {file: sha256})`` says the node still holds it loaded (the previous
policy), else from its staged folder or by fetching it -- and never takes the version it left
again.
"""
from __future__ import annotations

import collections
import logging
import os
import pathlib
import re
import shutil
import sys
import threading
import time
from typing import Callable

import grpc

from runtime.artifact import Manifest
from runtime.fetch import Abandoned, ArtifactFetcher, Refused, code_of, details_of, fetch_rpc
from runtime.fetch_process import IDLE, ChannelSpec, FetchProcess
from runtime.signature import Trust
from runtime.stream import Backoff, insecure_channel
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_STAGED = re.compile(r"^v(\d+)$")
_PARTIAL = re.compile(r"^v(\d+)\.partial$")
# Fetching, hashing and loading a new version is background work: on Linux its thread runs
# this much nicer than the control loop, which keeps its CPU when the machine is busy.
BACKGROUND_NICE = 10


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> bool:
    """Renice the calling thread only (Linux: a thread id is a PRIO_PROCESS target)."""
    if not sys.platform.startswith("linux") or nice <= 0:
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
        return True
    except OSError:
        return False


class WeightSubscriber:
    """Background subscriber that stages, verifies and hands over new policy versions."""

    def __init__(self, addr: str, robot_id: str, staging_dir: str | os.PathLike,
                 on_artifact: Callable[[pathlib.Path, Manifest], object],
                 current_version: int = 0, *, keep: int = 3, rpc_timeout_s: float = 60.0,
                 backoff_cap_s: float = 2.0,
                 channel_factory: Callable[[str], grpc.Channel] = insecure_channel,
                 trust: Trust = Trust(),
                 on_rollback: Callable[[int, dict[str, str]], bool] | None = None,
                 nice: int = BACKGROUND_NICE, fetch_process: ChannelSpec | None = None,
                 fetch_priority: int | str = IDLE):
        if keep < 1:
            raise ValueError(f"WeightSubscriber keep must be >= 1, got {keep}")
        self.addr = addr
        self.robot_id = robot_id
        self.staging_dir = pathlib.Path(staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.on_artifact = on_artifact
        self.on_rollback = on_rollback
        self.nice = nice
        self.trust = trust  # default: no keys, unsigned refused -- every artifact is refused
        self.keep = keep
        self.rpc_timeout_s = rpc_timeout_s
        self._backoff_cap_s = backoff_cap_s
        self._channel_factory = channel_factory
        self._channel: grpc.Channel | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._wanted: pb.VersionAnnouncement | None = None
        self._refused_versions: set[int] = set()
        self._rolled_back: set[int] = set()  # versions the learner took back: never again
        self._threads: list[threading.Thread] = []
        self._subscribe_call = None
        self.current_version = int(current_version)
        # the learner's staleness gate (VersionAnnouncement.min_version): the node does not start
        # an episode while current_version < min_version (0 = no gate)
        self.min_version = 0
        self.stage = ""           # why the learner announced this robot's version: stable|canary
        self.rollbacks = 0
        self.announced_at: dict[int, float] = {}  # time.monotonic() a version was first announced
        self.installed_at: dict[int, float] = {}  # ... and handed over (staged in the node)
        self.timings: dict[int, dict] = {}  # fetch (and verify) / on_artifact seconds per version
        self.fetched = 0
        self.refused = 0
        self.reconnects = 0
        self.last_event = ""
        self.events: collections.deque[str] = collections.deque(maxlen=64)
        if fetch_process is not None:  # in a child process: runtime/fetch_process.py
            self.fetcher = FetchProcess(fetch_process, self.staging_dir, trust,
                                        rpc_timeout_s=rpc_timeout_s, backoff_cap_s=backoff_cap_s,
                                        superseded=self._superseded, event=self._event,
                                        priority=fetch_priority)
        else:
            self.fetcher = ArtifactFetcher(self.staging_dir, trust, rpc_timeout_s=rpc_timeout_s,
                                           backoff_cap_s=backoff_cap_s, stop=self._stop,
                                           superseded=self._superseded, event=self._event)

    @property
    def resumed_bytes(self) -> int:
        """Bytes not fetched again thanks to resuming."""
        return self.fetcher.resumed_bytes

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "WeightSubscriber":
        if self._threads:
            raise RuntimeError("WeightSubscriber already started")
        self._channel = self._channel_factory(self.addr)
        stub = pb_grpc.LearnerStub(self._channel)
        self.fetcher.start()  # a fetch process starts now, not at the first announcement
        for name, target in (("listen", self._listen), ("fetch", self._fetch_loop)):
            t = threading.Thread(target=target, args=(stub,), name=f"tether-weights-{name}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._channel is not None:
            self._channel.close()  # cancels the Subscribe stream and any fetch in flight
        self.fetcher.close(timeout)
        for t in self._threads:
            t.join(timeout)

    def wait_for_version(self, version: int, timeout: float) -> bool:
        """Block until ``current_version >= version``; for tests and tools."""
        with self._cond:
            return self._cond.wait_for(lambda: self.current_version >= version, timeout)

    def _event(self, message: str, level: int = logging.INFO) -> None:
        self.last_event = message
        self.events.append(message)
        log.log(level, "weights: %s", message)

    # -- subscription ------------------------------------------------------------------------
    def _listen(self, stub) -> None:
        backoff = Backoff(cap_s=self._backoff_cap_s)
        while not self._stop.is_set():
            try:
                call = stub.Subscribe(pb.SubscribeRequest(robot_id=self.robot_id,
                                                          current_version=self.current_version))
                self._subscribe_call = call
                for ann in call:
                    backoff.reset()
                    self._offer(ann)
                reason = "the learner closed the stream"
            except grpc.RpcError as e:
                reason = f"{code_of(e)}: {details_of(e)}"
            except ValueError as e:  # the channel was closed by stop()
                reason = str(e)
            if self._stop.is_set():
                return
            self.reconnects += 1
            delay = backoff.next_delay()
            self._event(f"subscription to {self.addr} broke ({reason}); reconnecting in "
                        f"{delay:.2f} s", logging.WARNING if backoff.failures == 1 else logging.DEBUG)
            self._stop.wait(delay)

    def _offer(self, ann: pb.VersionAnnouncement) -> None:
        with self._cond:
            self.min_version = int(ann.min_version)
            self.stage = ann.stage
            self.announced_at.setdefault(int(ann.version), time.monotonic())
            wanted = self._wanted.version if self._wanted else 0
            newest = max(self.current_version, wanted)
            if ann.rollback and ann.version < newest:
                # whatever runs or is being fetched above it was rolled back: drop it for good
                self._rolled_back |= {v for v in (self.current_version, wanted) if v > ann.version}
                self._wanted = ann
                self._cond.notify_all()
            elif (ann.version > newest and ann.version not in self._refused_versions
                  and ann.version not in self._rolled_back):
                self._wanted = ann
                self._cond.notify_all()

    def _superseded(self, version: int) -> bool:
        with self._cond:
            return self._stop.is_set() or version in self._rolled_back or (
                self._wanted is not None and self._wanted.version != version)

    # -- fetching ----------------------------------------------------------------------------
    def _fetch_loop(self, stub) -> None:
        lower_thread_priority(self.nice)
        rpc = fetch_rpc(self._channel)
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._stop.is_set() or self._wanted is not None, 0.5)
                ann = self._wanted
            if ann is None or self._stop.is_set():
                continue
            try:
                if ann.rollback and ann.version == self.current_version:
                    pass  # rolled back before the canary version was installed: nothing to do
                elif ann.rollback and self._rollback_in_memory(ann):
                    self._installed(ann, "the previous policy still loaded")
                else:
                    t0 = time.monotonic()
                    path, manifest = self.fetcher.fetch(rpc, ann)
                    t1 = time.monotonic()
                    self._install(ann, path, manifest)
                    self.timings[int(ann.version)] = {"fetch_s": round(t1 - t0, 4),
                                                      "load_s": round(time.monotonic() - t1, 4)}
            except Abandoned:
                continue
            except Refused as e:
                self._refuse(ann.version, str(e))
            except Exception as e:  # a bug must not kill the subscriber; keep the current version
                self._refuse(ann.version, f"unexpected {type(e).__name__}: {e}")
            with self._cond:
                if self._wanted is ann:
                    self._wanted = None

    def _refuse(self, version: int, why: str) -> None:
        with self._cond:
            self._refused_versions.add(version)
        shutil.rmtree(self.staging_dir / f"v{version}.partial", ignore_errors=True)
        self._event(f"refused version {version}: {why}; keeping version {self.current_version}",
                    logging.ERROR)
        self.refused += 1  # last: whoever sees the count also sees the event and a clean staging dir

    def _rollback_in_memory(self, ann: pb.VersionAnnouncement) -> bool:
        if self.on_rollback is None:
            return False
        try:
            return bool(self.on_rollback(ann.version, {f.name: f.sha256 for f in ann.files}))
        except Exception as e:  # fall back to fetching / the staged folder
            self._event(f"rollback to {ann.version} from memory failed ({e}); fetching it",
                        logging.WARNING)
            return False

    # -- installing --------------------------------------------------------------------------
    def _install(self, ann: pb.VersionAnnouncement, path: pathlib.Path,
                 manifest: Manifest) -> None:
        try:
            self.on_artifact(path, manifest)
        except Exception as e:
            shutil.rmtree(path, ignore_errors=True)
            raise Refused(f"on_artifact refused it: {type(e).__name__}: {e}") from None
        self._installed(ann, str(path))
        self._prune()

    def _installed(self, ann: pb.VersionAnnouncement, source: str) -> None:
        version = int(ann.version)
        with self._cond:
            back = version < self.current_version
            # a rollback goes down; otherwise never (a slow install must not undo a newer one)
            self.current_version = version if ann.rollback else max(self.current_version, version)
            self.installed_at[version] = time.monotonic()
            self.fetched += 1
            self.rollbacks += int(back)
            self._cond.notify_all()
        what = "rolled back to" if back else "installed"
        self._event(f"{what} version {version} from {source}",
                    logging.WARNING if back else logging.INFO)

    def status(self) -> dict:
        """The subscriber's part of the node's status.json."""
        with self._cond:
            v = self.current_version
            return {"version": v, "stage": self.stage, "min_version": self.min_version,
                    "fetched": self.fetched, "refused": self.refused, "rollbacks": self.rollbacks,
                    "rolled_back": sorted(self._rolled_back), "reconnects": self.reconnects,
                    "announced_at": self.announced_at.get(v),
                    "installed_at": self.installed_at.get(v), "timings": self.timings.get(v),
                    "trust": self.trust.describe(), "last_event": self.last_event,
                    "fetch_in": self.fetcher.describe()}

    def _prune(self) -> None:
        staged, partial = [], []
        for entry in self.staging_dir.iterdir():
            if m := _STAGED.match(entry.name):
                staged.append((int(m.group(1)), entry))
            elif m := _PARTIAL.match(entry.name):
                partial.append((int(m.group(1)), entry))
        for _, entry in sorted(staged)[:-self.keep]:
            shutil.rmtree(entry, ignore_errors=True)
        for v, entry in partial:
            if v <= self.current_version or v in self._rolled_back:
                shutil.rmtree(entry, ignore_errors=True)
