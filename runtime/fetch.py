"""Fetching one announced version to disk: the transfer half of the weight subscriber
(runtime/weights.py).

``staging_dir/v<version>.partial/<file>`` is written file by file, manifest first; each file is
resumed from the bytes already on disk after a broken stream and hashed as it is written. The
manifest's ed25519 signature is checked against ``trust`` (runtime/signature.py) and the manifest
compared with the announcement before any other byte is fetched. A complete, verified folder is
renamed to ``staging_dir/v<version>/``; a staged folder is reused when its files hash to what is
announced. Anything that does not match raises ``Refused``.

``FetchArtifact`` is called with raw responses (``fetch_rpc``) and each ``ArtifactChunk`` read in
place by ``parse_chunk``: its bytes go to the file and the hash as a view of what gRPC received.
The generated deserializer copies a chunk twice while holding the GIL (the parse, then reading
``.data``), which the robot's control thread waits out; hashing and writing a view release it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import re
import shutil
import threading
from typing import Callable

import grpc

from runtime.artifact import (MANIFEST, MAX_ARTIFACT_FILE_BYTES, ArtifactError, Manifest,
                              fsync_dir, sha256_file)
from runtime.signature import SignatureError, Trust, check_manifest_bytes, verify_trusted
from runtime.stream import Backoff
from tether.wire import tether_pb2 as pb

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# the learner no longer has (or never will serve) this version: retrying cannot help
_PERMANENT = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT,
              grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNIMPLEMENTED}
MAX_SHORT_STREAMS = 3  # streams that end early without an error before a file counts as truncated


class Refused(Exception):
    """This version must not be installed (tampered, malformed, or refused by on_artifact)."""


class Abandoned(Exception):
    """A newer version was announced (or we are stopping): drop this fetch for now."""


FETCH_METHOD = "/tether.v1.Learner/FetchArtifact"


def fetch_rpc(channel: grpc.Channel):
    """The learner's FetchArtifact answering serialized ``ArtifactChunk`` bytes (``parse_chunk``)."""
    return channel.unary_stream(FETCH_METHOD, request_serializer=pb.FetchRequest.SerializeToString,
                                response_deserializer=None)


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def parse_chunk(raw: bytes) -> tuple[int, memoryview, bool]:
    """(offset, data, last) of a serialized ``ArtifactChunk`` (fields 1 int64, 2 bytes, 3 bool;
    proto3 rules: any order, absent = default, the last occurrence wins, unknown fields skipped),
    ``data`` a view into ``raw``. Raises ValueError on malformed bytes."""
    buf = memoryview(raw)
    offset, data, last = 0, buf[0:0], False
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            if field == 1:
                offset = value - (1 << 64) if value >= 1 << 63 else value
            elif field == 3:
                last = bool(value)
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError(f"field {field} claims {n} bytes, {len(buf) - i} left")
            if field == 2:
                data = buf[i:i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"field {field} has unsupported wire type {wire}")
        if field in (1, 3) and wire != 0 or field == 2 and wire != 2 or i > len(buf):
            raise ValueError(f"field {field} has wire type {wire} or runs past the message")
    return offset, data, last


def plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name \
        and "\0" not in name and not name.startswith(".")


class ArtifactFetcher:
    """``superseded(version)`` says when to abandon (a newer announcement, a rollback, a stop);
    ``event(message, level)`` reports progress."""

    def __init__(self, staging_dir: pathlib.Path, trust: Trust, *, rpc_timeout_s: float,
                 backoff_cap_s: float, stop: threading.Event,
                 superseded: Callable[[int], bool], event: Callable[[str, int], None]):
        self.staging_dir = pathlib.Path(staging_dir)
        self.trust = trust
        self.rpc_timeout_s = rpc_timeout_s
        self.backoff_cap_s = backoff_cap_s
        self._stop = stop
        self.superseded = superseded
        self._event = event
        self.resumed_bytes = 0   # bytes not fetched again thanks to resuming

    # the fetcher's life, as runtime/fetch_process.py's FetchProcess has one: nothing to start
    # or stop here, the subscriber's thread does the work
    def start(self) -> None:
        pass

    def close(self, timeout: float = 5.0) -> None:
        pass

    def describe(self) -> str:
        """For the robot's status: where fetches run."""
        return "thread"

    def check_announcement(self, ann: pb.VersionAnnouncement) -> None:
        names = [f.name for f in ann.files]
        if not names or names[0] != MANIFEST:
            raise Refused(f"announcement lists {names[:3]}, must start with {MANIFEST}")
        if len(set(names)) != len(names):
            raise Refused(f"announcement lists a file twice: {names}")
        for f in ann.files:
            if not plain_name(f.name):
                raise Refused(f"announced file name {f.name!r} is not a plain file name")
            if not _SHA256.match(f.sha256) or not 0 <= f.size <= MAX_ARTIFACT_FILE_BYTES:
                raise Refused(f"announced file {f.name!r} has sha256 {f.sha256!r} and size "
                              f"{f.size} (limit {MAX_ARTIFACT_FILE_BYTES})")
        if ann.files[0].sha256 != ann.manifest_sha256:
            raise Refused("announcement's manifest_sha256 differs from its manifest.json entry")

    def fetch(self, rpc, ann: pb.VersionAnnouncement) -> tuple[pathlib.Path, Manifest]:
        """Fetch (or reuse the staged copy of) an announced version into
        ``staging_dir/v<version>/`` with ``rpc`` (``fetch_rpc(channel)``); returns it with its
        verified manifest. Raises Refused or Abandoned."""
        self.check_announcement(ann)
        final = self.staging_dir / f"v{ann.version}"
        if final.is_dir():
            try:  # staged earlier (a rollback, a restart): reuse it if it is what is announced
                if all(sha256_file(final / f.name) == f.sha256 for f in ann.files):
                    return final, verify_trusted(final, self.trust)
            except (OSError, ArtifactError):
                pass
            shutil.rmtree(final)
        partial = self.staging_dir / f"v{ann.version}.partial"
        partial.mkdir(exist_ok=True)
        self._event(f"fetching version {ann.version} ({sum(f.size for f in ann.files)} bytes)")
        manifest = None
        for f in ann.files:
            self._fetch_file(rpc, ann.version, f, partial / f.name)
            if f.name == MANIFEST:
                manifest = check_manifest(ann, partial, self.trust)
        # verified: the manifest is signed by a trusted key and lists exactly the announced files,
        # and each file hashed to its announced sha256 as it was written (not hashed again here)
        fsync_dir(partial)
        os.replace(partial, final)
        fsync_dir(self.staging_dir)
        return final, manifest

    def _fetch_file(self, rpc, version: int, f: pb.FileInfo, path: pathlib.Path) -> None:
        """Fetch one file, resuming from what is on disk; returns once it matches f.sha256."""
        backoff = Backoff(cap_s=self.backoff_cap_s)
        fresh_retry_left = 1  # a resumed file that does not hash may hold bytes torn by a crash
        short_streams = 0     # streams that ended early without an error
        while True:
            if self.superseded(version):
                raise Abandoned()
            have = path.stat().st_size if path.exists() else 0
            if have > f.size:
                path.unlink()
                have = 0
            digest = None
            if have < f.size:
                if have:
                    self.resumed_bytes += have
                try:
                    digest = self._stream_into(rpc, version, f, path, have)
                except grpc.RpcError as e:
                    if self._stop.is_set():
                        raise Abandoned() from None
                    if code_of(e) in _PERMANENT:
                        raise Refused(f"learner cannot serve {f.name} of version {version}: "
                                      f"{code_of(e)}: {details_of(e)}") from None
                    delay = backoff.next_delay()
                    self._event(f"fetch of {f.name} v{version} broke at byte "
                                f"{path.stat().st_size if path.exists() else 0} of {f.size} "
                                f"({code_of(e)}); resuming in {delay:.2f} s", logging.WARNING)
                    self._stop.wait(delay)
                    continue
                except ValueError:
                    raise Abandoned() from None  # the channel was closed by stop()
            got = path.stat().st_size if path.exists() else 0
            if got < f.size:  # the stream ended early without an error: resume, a few times
                short_streams += 1
                if short_streams >= MAX_SHORT_STREAMS:
                    raise Refused(f"{f.name} of version {version}: the learner's stream ends at "
                                  f"byte {got} of {f.size} ({short_streams} times); the "
                                  f"artifact is truncated")
                self._stop.wait(backoff.next_delay())
                continue
            digest = digest or sha256_file(path)
            if digest == f.sha256:
                return
            if have and fresh_retry_left:
                fresh_retry_left -= 1
                path.unlink()
                continue
            raise Refused(f"{f.name} of version {version} has sha256 {digest[:12]}…, announced "
                          f"{f.sha256[:12]}…: corrupt or tampered")

    def _stream_into(self, rpc, version: int, f: pb.FileInfo, path: pathlib.Path,
                     offset: int) -> str | None:
        """Append the file's bytes from ``offset``; returns its sha256 once it is complete (hashed
        as it is written: the bytes are not read back), None if the stream ended early."""
        digest = hashlib.sha256()
        if offset:
            with open(path, "rb") as done:
                for block in iter(lambda: done.read(1 << 20), b""):
                    digest.update(block)
        call = rpc(pb.FetchRequest(version=version, name=f.name, offset=offset),
                   timeout=self.rpc_timeout_s)
        pos = offset
        with open(path, "ab") as out:
            try:
                for raw in call:
                    try:
                        at, data, last = parse_chunk(raw)
                    except ValueError as e:
                        raise Refused(f"learner sent a malformed chunk of {f.name}: {e}") from None
                    if at != pos or pos + len(data) > f.size:
                        raise Refused(f"learner sent bytes [{at}, {at + len(data)}) of {f.name} "
                                      f"when {pos} of {f.size} were expected")
                    out.write(data)
                    digest.update(data)
                    pos += len(data)
                    if last:
                        break
                    if self.superseded(version):
                        raise Abandoned()
            except (Refused, Abandoned):
                call.cancel()
                raise
            finally:
                out.flush()
                os.fsync(out.fileno())
        return digest.hexdigest() if pos == f.size else None


def check_manifest(ann: pb.VersionAnnouncement, folder: pathlib.Path, trust: Trust) -> Manifest:
    """Is ``folder``'s manifest signed by a trusted key, and does it agree with the announcement
    (version, and every other file's name, sha256 and size)? Raises Refused."""
    data = (folder / MANIFEST).read_bytes()
    try:
        check_manifest_bytes(data, trust, f"manifest of version {ann.version}")
    except SignatureError as e:
        raise Refused(str(e)) from None
    try:
        manifest = Manifest.from_json(data)
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


def code_of(e: grpc.RpcError):
    try:
        return e.code()
    except Exception:
        return None


def details_of(e: grpc.RpcError) -> str:
    try:
        return e.details() or str(e)
    except Exception:
        return str(e)
