"""The weight subscriber: the robot's end of the control plane (DESIGN.md, Contracts: Weights).

One thread holds a ``Subscribe`` stream (reconnecting with backoff) and remembers only the newest
announcement; another fetches it. Latest-wins: when a newer version is announced during a fetch,
the fetch is abandoned at the next chunk and the newest is fetched instead (its ``.partial``
folder stays, so coming back to it resumes).

A fetch writes ``staging_dir/v<version>.partial/<file>``, resuming each file from the bytes
already on disk after a broken stream; checks every file's sha256 and size against the
announcement and the manifest (``verify_artifact``); renames the folder to
``staging_dir/v<version>/`` and hands it to ``on_artifact(path, manifest)`` (the node's
warm-up, parity check and swap). Anything that does not match, or an ``on_artifact`` that
raises, refuses that version: logged, counted, its folder removed, the current version kept,
and the version not fetched again. Only the newest ``keep`` staged versions stay on disk.
"""
from __future__ import annotations

import collections
import logging
import os
import pathlib
import re
import shutil
import threading
from typing import Callable

import grpc

from runtime.artifact import (MANIFEST, MAX_ARTIFACT_FILE_BYTES, ArtifactError, Manifest,
                              fsync_dir, sha256_file, verify_artifact)
from runtime.stream import Backoff, insecure_channel
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_STAGED = re.compile(r"^v(\d+)$")
_PARTIAL = re.compile(r"^v(\d+)\.partial$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# the learner no longer has (or never will serve) this version: retrying cannot help
_PERMANENT = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED}


class Refused(Exception):
    """This version must not be installed (tampered, malformed, or refused by on_artifact)."""


class _Abandoned(Exception):
    """A newer version was announced (or we are stopping): drop this fetch for now."""


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name and not name.startswith(".")


class WeightSubscriber:
    """Background subscriber that stages, verifies and hands over new policy versions."""

    def __init__(self, addr: str, robot_id: str, staging_dir: str | os.PathLike,
                 on_artifact: Callable[[pathlib.Path, Manifest], object],
                 current_version: int = 0, *, keep: int = 3, rpc_timeout_s: float = 60.0,
                 backoff_cap_s: float = 2.0,
                 channel_factory: Callable[[str], grpc.Channel] = insecure_channel):
        if keep < 1:
            raise ValueError(f"WeightSubscriber keep must be >= 1, got {keep}")
        self.addr = addr
        self.robot_id = robot_id
        self.staging_dir = pathlib.Path(staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self.on_artifact = on_artifact
        self.keep = keep
        self.rpc_timeout_s = rpc_timeout_s
        self._backoff_cap_s = backoff_cap_s
        self._channel_factory = channel_factory
        self._channel: grpc.Channel | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._wanted: pb.VersionAnnouncement | None = None
        self._refused_versions: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._subscribe_call = None
        self.current_version = int(current_version)
        # the learner's staleness gate (VersionAnnouncement.min_version): the node does not start
        # an episode while current_version < min_version (0 = no gate)
        self.min_version = 0
        self.fetched = 0
        self.refused = 0
        self.reconnects = 0
        self.resumed_bytes = 0   # bytes not fetched again thanks to resuming
        self.last_event = ""
        self.events: collections.deque[str] = collections.deque(maxlen=64)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "WeightSubscriber":
        if self._threads:
            raise RuntimeError("WeightSubscriber already started")
        self._channel = self._channel_factory(self.addr)
        stub = pb_grpc.LearnerStub(self._channel)
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
                reason = f"{_code(e)}: {_details(e)}"
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
            newest = max(self.current_version, self._wanted.version if self._wanted else 0)
            if ann.version > newest and ann.version not in self._refused_versions:
                self._wanted = ann
                self._cond.notify_all()

    def _superseded(self, version: int) -> bool:
        with self._cond:
            return self._stop.is_set() or (self._wanted is not None and
                                           self._wanted.version != version)

    # -- fetching ----------------------------------------------------------------------------
    def _fetch_loop(self, stub) -> None:
        while not self._stop.is_set():
            with self._cond:
                self._cond.wait_for(lambda: self._stop.is_set() or self._wanted is not None, 0.5)
                ann = self._wanted
            if ann is None or self._stop.is_set():
                continue
            try:
                path, manifest = self._fetch(stub, ann)
                self._install(ann.version, path, manifest)
            except _Abandoned:
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

    def _check_announcement(self, ann: pb.VersionAnnouncement) -> None:
        names = [f.name for f in ann.files]
        if not names or names[0] != MANIFEST:
            raise Refused(f"announcement lists {names[:3]}, must start with {MANIFEST}")
        if len(set(names)) != len(names):
            raise Refused(f"announcement lists a file twice: {names}")
        for f in ann.files:
            if not _plain_name(f.name):
                raise Refused(f"announced file name {f.name!r} is not a plain file name")
            if not _SHA256.match(f.sha256) or not 0 <= f.size <= MAX_ARTIFACT_FILE_BYTES:
                raise Refused(f"announced file {f.name!r} has sha256 {f.sha256!r} and size "
                              f"{f.size} (limit {MAX_ARTIFACT_FILE_BYTES})")
        if ann.files[0].sha256 != ann.manifest_sha256:
            raise Refused("announcement's manifest_sha256 differs from its manifest.json entry")

    def _fetch(self, stub, ann: pb.VersionAnnouncement) -> tuple[pathlib.Path, Manifest]:
        self._check_announcement(ann)
        final = self.staging_dir / f"v{ann.version}"
        if final.is_dir():
            try:  # staged before a restart: reuse it if it is exactly what is announced
                if all(sha256_file(final / f.name) == f.sha256 for f in ann.files):
                    return final, verify_artifact(final)
            except (OSError, ArtifactError):
                pass
            shutil.rmtree(final)
        partial = self.staging_dir / f"v{ann.version}.partial"
        partial.mkdir(exist_ok=True)
        self._event(f"fetching version {ann.version} ({sum(f.size for f in ann.files)} bytes)")
        for f in ann.files:
            self._fetch_file(stub, ann.version, f, partial / f.name)
            if f.name == MANIFEST:
                self._check_manifest(ann, partial)
        try:
            manifest = verify_artifact(partial)
        except ArtifactError as e:
            raise Refused(str(e)) from None
        fsync_dir(partial)
        os.replace(partial, final)
        fsync_dir(self.staging_dir)
        return final, manifest

    def _check_manifest(self, ann: pb.VersionAnnouncement, partial: pathlib.Path) -> Manifest:
        """Before fetching the big files: does the manifest agree with the announcement?"""
        try:
            manifest = Manifest.from_json((partial / MANIFEST).read_bytes())
        except (ArtifactError, TypeError) as e:
            raise Refused(f"manifest of version {ann.version} is invalid: {e}") from None
        if manifest.version != ann.version:
            raise Refused(f"manifest says version {manifest.version}, announced {ann.version}")
        announced = {f.name: (f.sha256, f.size) for f in ann.files[1:]}
        listed = {n: (i.get("sha256"), int(i.get("size", -1))) for n, i in manifest.files.items()}
        if announced != listed:
            raise Refused(f"announced files {sorted(announced)} do not match the manifest's "
                          f"{sorted(listed)} (names, sha256 and sizes must agree)")
        return manifest

    def _fetch_file(self, stub, version: int, f: pb.FileInfo, path: pathlib.Path) -> None:
        """Fetch one file, resuming from what is on disk; returns once it matches f.sha256."""
        backoff = Backoff(cap_s=self._backoff_cap_s)
        fresh_retry_left = 1  # a resumed file that does not hash may hold bytes torn by a crash
        while True:
            if self._superseded(version):
                raise _Abandoned()
            have = path.stat().st_size if path.exists() else 0
            if have > f.size:
                path.unlink()
                have = 0
            if have < f.size:
                if have:
                    self.resumed_bytes += have
                try:
                    self._stream_into(stub, version, f, path, have)
                except grpc.RpcError as e:
                    if self._stop.is_set():
                        raise _Abandoned() from None
                    if _code(e) in _PERMANENT:
                        raise Refused(f"learner cannot serve {f.name} of version {version}: "
                                      f"{_code(e)}: {_details(e)}") from None
                    delay = backoff.next_delay()
                    self._event(f"fetch of {f.name} v{version} broke at byte "
                                f"{path.stat().st_size if path.exists() else 0} of {f.size} "
                                f"({_code(e)}); resuming in {delay:.2f} s", logging.WARNING)
                    self._stop.wait(delay)
                    continue
                except ValueError:
                    raise _Abandoned() from None  # the channel was closed by stop()
            if path.stat().st_size < f.size:
                continue  # the stream ended early without an error: resume
            digest = sha256_file(path)
            if digest == f.sha256:
                return
            if have and fresh_retry_left:
                fresh_retry_left -= 1
                path.unlink()
                continue
            raise Refused(f"{f.name} of version {version} has sha256 {digest[:12]}…, announced "
                          f"{f.sha256[:12]}…: corrupt or tampered")

    def _stream_into(self, stub, version: int, f: pb.FileInfo, path: pathlib.Path,
                     offset: int) -> None:
        call = stub.FetchArtifact(pb.FetchRequest(version=version, name=f.name, offset=offset),
                                  timeout=self.rpc_timeout_s)
        pos = offset
        with open(path, "ab") as out:
            try:
                for chunk in call:
                    if chunk.offset != pos or pos + len(chunk.data) > f.size:
                        raise Refused(f"learner sent bytes [{chunk.offset}, "
                                      f"{chunk.offset + len(chunk.data)}) of {f.name} when "
                                      f"{pos} of {f.size} were expected")
                    out.write(chunk.data)
                    pos += len(chunk.data)
                    if chunk.last:
                        break
                    if self._superseded(version):
                        raise _Abandoned()
            except (Refused, _Abandoned):
                call.cancel()
                raise
            finally:
                out.flush()
                os.fsync(out.fileno())

    # -- installing --------------------------------------------------------------------------
    def _install(self, version: int, path: pathlib.Path, manifest: Manifest) -> None:
        try:
            self.on_artifact(path, manifest)
        except Exception as e:
            shutil.rmtree(path, ignore_errors=True)
            raise Refused(f"on_artifact refused it: {type(e).__name__}: {e}") from None
        with self._cond:
            self.current_version = max(self.current_version, version)
            self.fetched += 1
            self._cond.notify_all()
        self._event(f"installed version {version} from {path}")
        self._prune()

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
            if v <= self.current_version:
                shutil.rmtree(entry, ignore_errors=True)


def _code(e: grpc.RpcError):
    try:
        return e.code()
    except Exception:
        return None


def _details(e: grpc.RpcError) -> str:
    try:
        return e.details() or str(e)
    except Exception:
        return str(e)
