"""The learner's gRPC service: experience ingest (data plane) and weight distribution (control
plane). See tether/wire/tether.proto for the contract of each call."""
from __future__ import annotations

import concurrent.futures
import logging
import sqlite3

import grpc

from learner.registry import Registry
from learner.store import ExperienceStore
from runtime.artifact import MANIFEST, load_manifest
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

log = logging.getLogger("tether.learner.service")

CHUNK_BYTES = 256 * 1024
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# Every subscribed robot holds one thread for its stream, plus pushes and fetches in flight:
# 16 robots x (1 stream + 1 push + 1 fetch) with headroom.
DEFAULT_WORKERS = 64
SUBSCRIBE_POLL_S = 0.5  # how quickly a stream notices a cancelled client or a stopping server


class LearnerService(pb_grpc.LearnerServicer):
    def __init__(self, store: ExperienceStore, registry: Registry, trainer=None):
        self.store, self.registry, self.trainer = store, registry, trainer

    def PushExperience(self, request: pb.ExperienceBatch, context) -> pb.Ack:
        try:
            stored, duplicates = self.store.append(request)
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"batch {request.batch_seq} from {request.robot_id!r} refused, nothing "
                          f"stored: {e}")
        except (sqlite3.Error, OSError) as e:
            log.error("storing batch %d from %r failed: %s", request.batch_seq, request.robot_id, e)
            context.abort(grpc.StatusCode.UNAVAILABLE,
                          f"the learner could not store the batch ({e}); nothing was acknowledged, "
                          f"keep it spooled and resend")
        return pb.Ack(robot_id=request.robot_id, batch_seq=request.batch_seq,
                      stored=stored, duplicates=duplicates)

    def _announcement(self, v: int, min_version: int = 0) -> pb.VersionAnnouncement:
        files = self.registry.files(v)
        return pb.VersionAnnouncement(
            version=v, manifest_sha256=files[0][1], min_version=min_version, stage="stable",
            files=[pb.FileInfo(name=n, sha256=h, size=s) for n, h, s in files])

    def Subscribe(self, request: pb.SubscribeRequest, context):
        seen = (0, 0)
        while context.is_active() and not self.registry.closed:
            state = self.registry.wait_for_change(seen, timeout=SUBSCRIBE_POLL_S)
            if state != seen and state[0] > 0:  # latest-wins: versions published meanwhile skipped
                yield self._announcement(*state)
                seen = state

    def FetchArtifact(self, request: pb.FetchRequest, context):
        try:
            directory = self.registry.artifact_dir(request.version)
            names = set(load_manifest(directory).files) | {MANIFEST}
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} is not published; "
                          f"latest is {self.registry.latest()}")
        # only names the manifest lists: no path can leave the version directory
        if request.name not in names:
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} has no file "
                          f"{request.name!r}; files: {sorted(names)}")
        path = directory / request.name
        size = path.stat().st_size
        if not 0 <= request.offset <= size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside "
                          f"{request.name} of {size} bytes")
        with open(path, "rb") as f:
            f.seek(request.offset)
            offset = request.offset
            while True:
                data = f.read(CHUNK_BYTES)
                last = offset + len(data) >= size
                yield pb.ArtifactChunk(offset=offset, data=data, last=last)
                offset += len(data)
                if last or not data:
                    return

    def GetStats(self, request, context) -> pb.LearnerStats:
        per_robot = self.store.stats()
        t = self.trainer
        return pb.LearnerStats(
            records_stored=sum(s["records"] for s in per_robot.values()),
            duplicates_dropped=self.store.duplicates_dropped,
            latest_version=self.registry.latest(),
            versions_published=t.versions_published if t is not None else self.registry.published,
            train_steps=t.train_steps if t is not None else 0,
            robots=[pb.RobotStats(robot_id=r, **s) for r, s in per_robot.items()])


def serve(addr: str, store: ExperienceStore, registry: Registry, trainer=None, *,
          max_workers: int = DEFAULT_WORKERS) -> tuple[grpc.Server, int]:
    """Start the service on ``addr`` ("host:port", port 0 = any); returns (server, bound port).

    To stop: ``registry.close()`` (ends subscriber streams), then ``server.stop(grace)``.
    """
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    service = LearnerService(store, registry, trainer)
    pb_grpc.add_LearnerServicer_to_server(service, server)
    port = server.add_insecure_port(addr)
    if port == 0:
        raise OSError(f"could not bind the learner to {addr!r}; is the port in use?")
    server.start()
    return server, port
