"""The learner's gRPC service: experience ingest (data plane) and weight distribution (control
plane). See tether/wire/tether.proto for the contract of each call."""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading

import grpc

from learner.auth import FleetAuth, ServerTls
from learner.canary import CanaryConfig, RolloutController
from learner.fetch_cache import FetchCache
from learner.registry import Registry
from learner.store import ExperienceStore
from learner.wire_guard import WireGuard, unwrap
from runtime.artifact import MANIFEST, load_manifest
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

log = logging.getLogger("tether.learner.service")

# 1 MiB: a 20 MB artifact reached 8 robots ~20 % sooner than with 256 KiB (sim.bench_rollout);
# a robot resumes from the bytes on its disk, so a broken stream costs at most one chunk
CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 32 * 1024 * 1024
# serialized chunks kept for the next robot fetching the same version (learner/fetch_cache.py):
# two versions of a 100 MB policy (a canary's and the one before it)
FETCH_CACHE_BYTES = 256 * 1024 * 1024
# Every robot holds one thread for its Subscribe stream and one for its experience stream,
# plus fetches and pushes in flight: 64 robots x (2 streams + 1 call) with headroom.
DEFAULT_WORKERS = 256
SUBSCRIBE_POLL_S = 0.5  # how quickly a stream notices a cancelled client or a stopping server
# Batches of one experience stream read but not yet acknowledged; past it the learner stops
# reading that stream (backpressure). The store's writer bounds all streams together.
DEFAULT_STREAM_WINDOW = 16
BATCH_SEQ_TRAILER = "tether-batch-seq"  # trailing metadata: the batch a stream was refused at


class LearnerService(pb_grpc.LearnerServicer):
    def __init__(self, store: ExperienceStore, registry: Registry, trainer=None,
                 rollout: RolloutController | None = None):
        self.store, self.registry, self.trainer = store, registry, trainer
        self.stream_window = DEFAULT_STREAM_WINDOW
        self.fetch_cache = FetchCache(FETCH_CACHE_BYTES, CHUNK_BYTES)
        # which version each robot runs; without one, everyone gets the newest (no canaries)
        self.rollout = rollout or RolloutController(registry, store, CanaryConfig(fraction=0.0))

    def PushExperience(self, request: pb.ExperienceBatch, context) -> pb.Ack:
        request, raw = unwrap(request)
        try:
            stored, duplicates = self.store.append(request, raw)
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

    def StreamExperience(self, request_iterator, context):
        """One Ack per batch, in order, each after its batch is durable. A reader thread hands
        batches to the store's writer and stops reading when ``stream_window`` of them are in
        flight (gRPC flow control then holds the robot back). A malformed batch ends the stream
        with INVALID_ARGUMENT naming it (also in the ``tether-batch-seq`` trailer) after the
        acks of the batches before it; nothing after it was read."""
        inflight: queue.Queue = queue.Queue(maxsize=self.stream_window)
        reader = threading.Thread(target=self._read_stream, name="grpc-stream-reader",
                                  args=(request_iterator, inflight, context), daemon=True)
        reader.start()
        while True:
            try:
                item = inflight.get(timeout=SUBSCRIBE_POLL_S)
            except queue.Empty:
                if context.is_active():
                    continue
                return  # the robot went away: its reader cannot hand over the end (put needs
                #         an active context); without this the thread would wait forever
            if item is None:
                return
            batch_seq, robot_id, pending, error = item
            if isinstance(error, ValueError):
                context.set_trailing_metadata(((BATCH_SEQ_TRAILER, str(batch_seq)),))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"batch {batch_seq} from {robot_id!r} refused, nothing stored: "
                              f"{error}")
            try:
                if error is not None:
                    raise error
                stored, duplicates = pending.wait()
            except (sqlite3.Error, OSError) as e:
                log.error("storing batch %d from %r failed: %s", batch_seq, robot_id, e)
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              f"the learner could not store batch {batch_seq} ({e}); it and every "
                              f"later batch are unacknowledged: keep them spooled and resend")
            yield pb.Ack(robot_id=robot_id, batch_seq=batch_seq, stored=stored,
                         duplicates=duplicates)

    def _read_stream(self, requests, inflight: queue.Queue, context) -> None:
        def put(item) -> bool:
            while context.is_active():
                try:
                    inflight.put(item, timeout=SUBSCRIBE_POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for batch in requests:
                batch, raw = unwrap(batch)
                try:
                    item = (batch.batch_seq, batch.robot_id, self.store.submit(batch, raw), None)
                except (ValueError, sqlite3.Error, OSError) as e:
                    put((batch.batch_seq, batch.robot_id, None, e))
                    return  # stop reading: the handler ends the stream at this batch
                if not put(item):
                    return
        except Exception as e:  # noqa: BLE001 (a cancelled or broken stream ends the iterator)
            log.debug("experience stream from %s ended: %r", context.peer(), e)
        finally:
            put(None)

    def _announcement(self, v: int, min_version: int = 0, stage: str = "stable",
                      rollback: bool = False) -> pb.VersionAnnouncement:
        files = self.registry.files(v)
        return pb.VersionAnnouncement(
            version=v, manifest_sha256=files[0][1], min_version=min_version, stage=stage,
            rollback=rollback, files=[pb.FileInfo(name=n, sha256=h, size=s) for n, h, s in files])

    def Subscribe(self, request: pb.SubscribeRequest, context):
        """Announce this robot's assignment (learner/canary.py) now and whenever it changes.
        Latest-wins: versions published meanwhile are skipped. A version below one this robot
        ran or was told (a canary rolled back) goes out with ``rollback`` set."""
        robot = request.robot_id or context.peer()
        highest = int(request.current_version)
        sent, generation = None, -1
        self.rollout.join(robot)
        try:
            while context.is_active() and not self.registry.closed:
                now = self.registry.wait_for_generation(generation, timeout=SUBSCRIBE_POLL_S)
                if now == generation:
                    continue
                generation = now
                a = self.rollout.assignment(robot)
                if a.version > 0 and a != sent:
                    yield self._announcement(a.version, a.min_version, a.stage,
                                             rollback=a.version < highest)
                    highest, sent = max(highest, a.version), a
        finally:
            self.rollout.leave(robot)

    def FetchArtifact(self, request: pb.FetchRequest, context):
        """Answers serialized ``ArtifactChunk`` bytes (registered without a serializer, ``serve``)."""
        try:
            directory = self.registry.artifact_dir(request.version)
            files = load_manifest(directory).files
            names = set(files) | {MANIFEST}
        except (KeyError, FileNotFoundError):  # never published, or removed by retention
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} is not in the "
                          f"registry; latest is {self.registry.latest()}")
        # only names the manifest lists: no path can leave the version directory
        if request.name not in names:
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} has no file "
                          f"{request.name!r}; files: {sorted(names)}")
        path = directory / request.name
        try:
            size = path.stat().st_size
        except FileNotFoundError:  # removed by retention since the manifest was read
            context.abort(grpc.StatusCode.NOT_FOUND, f"version {request.version} was removed")
        if not 0 <= request.offset <= size:
            context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} outside "
                          f"{request.name} of {size} bytes")
        # the manifest is small and carries no sha256 of itself: not cached
        key = None if request.name == MANIFEST else (
            request.version, request.name, files[request.name]["sha256"])
        yield from self.fetch_cache.chunks(path, key, size, request.offset)

    def GetStats(self, request, context) -> pb.LearnerStats:
        per_robot = self.store.stats()
        t = self.trainer
        return pb.LearnerStats(
            records_stored=sum(s["records"] for s in per_robot.values()),
            duplicates_dropped=self.store.duplicates_dropped,
            latest_version=self.registry.latest(),
            versions_published=t.versions_published if t is not None else self.registry.published,
            train_steps=t.train_steps if t is not None else 0,
            fetch_chunks_cached=self.fetch_cache.hits, fetch_chunks_read=self.fetch_cache.misses,
            robots=[pb.RobotStats(robot_id=r, **s) for r, s in per_robot.items()])


class _Handlers:
    """Takes the generated code's method handlers instead of a server's."""

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.service, self.handlers = service, dict(handlers)


def _add_service(service: LearnerService, server: grpc.Server) -> None:
    """The generated registration, with FetchArtifact answering bytes it serialized itself."""
    got = _Handlers()
    pb_grpc.add_LearnerServicer_to_server(service, got)
    fetch = got.handlers["FetchArtifact"]
    got.handlers["FetchArtifact"] = grpc.unary_stream_rpc_method_handler(
        fetch.unary_stream, request_deserializer=fetch.request_deserializer,
        response_serializer=None)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(got.service, got.handlers),))
    server.add_registered_method_handlers(got.service, got.handlers)


def serve(addr: str, store: ExperienceStore, registry: Registry, trainer=None, *,
          max_workers: int = DEFAULT_WORKERS,
          rollout: RolloutController | None = None,
          stream_window: int = DEFAULT_STREAM_WINDOW,
          tls: ServerTls | None = None) -> tuple[grpc.Server, int]:
    """Start the service on ``addr`` ("host:port", port 0 = any); returns (server, bound port).

    ``tls``: mutual TLS, every call checked by learner/auth.py (who may call what, a robot
    writes only its own experience). None: plaintext, for tests and local development only.

    To stop: ``registry.close()`` (ends subscriber streams), then ``server.stop(grace)``.
    """
    credentials = tls.credentials() if tls is not None else None  # bad files fail before binding
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        # WireGuard first (outermost): unparsable bytes get INVALID_ARGUMENT, not INTERNAL,
        # before the auth rules or the service touch them (learner/wire_guard.py)
        interceptors=(WireGuard(),) + (() if tls is None else (FleetAuth(),)),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                 ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    if stream_window < 1:
        raise ValueError(f"stream_window must be >= 1, got {stream_window}")
    service = LearnerService(store, registry, trainer, rollout)
    service.stream_window = stream_window
    _add_service(service, server)
    if credentials is None:
        log.warning("plaintext: local development only (learner on %s without TLS: anyone who "
                    "reaches it can write experience and read weights)", addr)
        port = server.add_insecure_port(addr)
    else:
        port = server.add_secure_port(addr, credentials)
    if port == 0:
        raise OSError(f"could not bind the learner to {addr!r}; is the port in use?")
    server.start()
    return server, port
