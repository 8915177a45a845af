"""A controllable stand-in for the learner's gRPC service, for the robot-side client tests.

It is a real ``pb_grpc.LearnerServicer`` on a real gRPC server (127.0.0.1, port 0); what it fakes
is only the learner's behaviour, so a test can inject what a real learner rarely does on cue:
refuse calls, answer INVALID_ARGUMENT, break a stream mid-file, serve tampered bytes.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent import futures

import grpc

from runtime.artifact import MANIFEST, load_manifest, sha256_file
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc


class LearnerDouble(pb_grpc.LearnerServicer):
    def __init__(self, chunk_bytes: int = 64 * 1024):
        self._cond = threading.Condition()
        # data plane
        self.fail_first = 0               # PushExperience calls answered UNAVAILABLE
        self.invalid_batches: set[int] = set()  # batch_seqs answered INVALID_ARGUMENT
        self.push_calls = 0
        self.batches: list[pb.ExperienceBatch] = []  # accepted batches, in arrival order
        self.seqs: set[tuple[str, int]] = set()
        # control plane
        self.chunk_bytes = chunk_bytes
        self.chunk_delay_s = 0.0
        self.artifacts: dict[int, str] = {}    # version -> artifact directory
        self.latest = 0
        self.rollback = False                  # the latest announcement is a rollback
        self.break_at: dict[tuple[int, str], int] = {}  # (version, name) -> abort at byte (once)
        self.tamper: dict[tuple[int, str], bytes] = {}  # (version, name) -> bytes served instead
        self.fetches: list[tuple[int, str, int]] = []  # (version, name, offset) requested
        self._generation = 0  # bumping it breaks every open Subscribe stream

    # -- data plane --------------------------------------------------------------------------
    def PushExperience(self, request, context):
        with self._cond:
            self.push_calls += 1
            if self.fail_first > 0:
                self.fail_first -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "learner double: injected outage")
            if request.batch_seq in self.invalid_batches:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "learner double: poison batch")
            stored = dup = 0
            for r in request.records:
                key = (r.robot_id, r.seq)
                if key in self.seqs:
                    dup += 1
                else:
                    self.seqs.add(key)
                    stored += 1
            self.batches.append(request)
            return pb.Ack(robot_id=request.robot_id, batch_seq=request.batch_seq, stored=stored,
                          duplicates=dup)

    # -- control plane -----------------------------------------------------------------------
    def publish(self, version: int, directory) -> None:
        with self._cond:
            self.artifacts[version] = str(directory)
            self.latest = max(self.latest, version)
            self.rollback = False
            self._cond.notify_all()

    def roll_back_to(self, version: int) -> None:
        """Announce an older, already published version with ``rollback`` set."""
        with self._cond:
            self.latest, self.rollback = version, True
            self._cond.notify_all()

    def break_subscriptions(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def announcement(self, version: int) -> pb.VersionAnnouncement:
        d = self.artifacts[version]
        files = [pb.FileInfo(name=MANIFEST, sha256=sha256_file(f"{d}/{MANIFEST}"),
                             size=os.path.getsize(f"{d}/{MANIFEST}"))]
        for name, info in sorted(load_manifest(d).files.items()):
            files.append(pb.FileInfo(name=name, sha256=info["sha256"], size=int(info["size"])))
        return pb.VersionAnnouncement(version=version, manifest_sha256=files[0].sha256,
                                      files=files)

    def Subscribe(self, request, context):
        sent = request.current_version
        with self._cond:
            generation = self._generation
        while context.is_active():
            with self._cond:
                self._cond.wait_for(lambda: self.latest != sent or self._generation != generation,
                                    0.1)
                if self._generation != generation:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "learner double: stream broken")
                latest, rollback = self.latest, self.rollback
            if latest != sent and latest > 0:
                sent = latest
                ann = self.announcement(latest)
                ann.rollback = rollback
                yield ann

    def FetchArtifact(self, request, context):
        with self._cond:
            self.fetches.append((request.version, request.name, request.offset))
            directory = self.artifacts.get(request.version)
            break_at = self.break_at.pop((request.version, request.name), None)
            data = self.tamper.get((request.version, request.name))
        if directory is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no version {request.version}")
        if data is None:
            with open(f"{directory}/{request.name}", "rb") as f:
                data = f.read()
        pos = request.offset
        while pos < len(data):
            if break_at is not None and pos >= break_at:
                context.abort(grpc.StatusCode.UNAVAILABLE, "learner double: stream broken")
            end = min(len(data), pos + self.chunk_bytes)
            if break_at is not None and pos < break_at < end:
                end = break_at
            if self.chunk_delay_s:
                time.sleep(self.chunk_delay_s)
            yield pb.ArtifactChunk(offset=pos, data=data[pos:end], last=end >= len(data))
            pos = end
        if request.offset >= len(data):
            yield pb.ArtifactChunk(offset=pos, data=b"", last=True)


def serve(servicer: LearnerDouble) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_LearnerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
