"""The gRPC service on real loopback: durable acks, dedup, refusals, subscription, fetch."""
import dataclasses
import hashlib
import threading

import grpc
import pytest

from learner.model import ReferenceVLA, VLAConfig
from learner.registry import Registry
from learner.service import CHUNK_BYTES, serve
from learner.store import ExperienceStore
from runtime.artifact import MANIFEST, POLICY_DATA, sha256_file
from tests.learner.helpers import simple_record
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc


@pytest.fixture
def learner(tmp_path, pretrained):
    artifact, ckpt, model = pretrained
    store = ExperienceStore(tmp_path / "exp.sqlite")
    registry = Registry(tmp_path / "reg")
    registry.import_initial(artifact, ckpt)
    server, port = serve("127.0.0.1:0", store, registry)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield pb_grpc.LearnerStub(channel), store, registry, model, tmp_path
    channel.close()
    registry.close()
    server.stop(grace=1).wait()
    store.close()


def test_push_acks_after_commit_and_dedups_resends(learner):
    stub, store, _, _, tmp_path = learner
    recs = [simple_record(seq=i, done=i == 3, success=True) for i in range(4)]
    b = pb.ExperienceBatch(robot_id="r1", batch_seq=7, records=recs)
    ack = stub.PushExperience(b, timeout=10)
    assert (ack.robot_id, ack.batch_seq, ack.stored, ack.duplicates) == ("r1", 7, 4, 0)
    assert ExperienceStore(tmp_path / "exp.sqlite").count() == 4  # committed before the ack
    ack = stub.PushExperience(b, timeout=10)  # the robot missed the ack and resends
    assert (ack.stored, ack.duplicates) == (0, 4)
    stats = stub.GetStats(pb.StatsRequest(), timeout=10)
    assert (stats.records_stored, stats.duplicates_dropped, stats.latest_version) == (4, 4, 1)
    assert [(r.robot_id, r.records, r.episodes, r.successes) for r in stats.robots] == [("r1", 4, 1, 1)]


@pytest.mark.parametrize("field", ["robot", "tensor", "nan", "shape"])
def test_invalid_push_is_invalid_argument_and_stores_nothing(learner, field):
    stub, store, *_ = learner
    recs = [simple_record(seq=i) for i in range(3)]
    bad = recs[2]
    if field == "robot":
        bad.robot_id = "intruder"
    elif field == "tensor":
        bad.observation.images["front"].data = b"\x00" * 10
    elif field == "nan":
        bad.reward = float("nan")
    else:
        bad.actions.shape[:] = [1, 8]
    with pytest.raises(grpc.RpcError) as e:
        stub.PushExperience(pb.ExperienceBatch(robot_id="r1", records=recs), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "record 2" in e.value.details()
    assert store.count() == 0


def test_subscribe_gets_latest_then_each_publish(learner):
    stub, _, registry, model, _ = learner
    stream = stub.Subscribe(pb.SubscribeRequest(robot_id="r1", current_version=0), timeout=30)
    first = next(stream)
    assert first.version == 1 and first.files[0].name == MANIFEST
    assert first.manifest_sha256 == sha256_file(registry.artifact_dir(1) / MANIFEST)
    threading.Thread(target=registry.publish, args=(model,)).start()
    second = next(stream)
    assert second.version == 2
    assert [(f.name, f.sha256, f.size) for f in second.files] == registry.files(2)
    stream.cancel()


def _fetch(stub, version, name, offset=0):
    chunks = list(stub.FetchArtifact(pb.FetchRequest(version=version, name=name, offset=offset),
                                     timeout=30))
    assert chunks[-1].last and not any(c.last for c in chunks[:-1])
    return chunks


def test_fetch_resumes_from_an_offset_with_identical_bytes(learner):
    stub, _, registry, *_ = learner
    # a large token table (as VLAs have): its weights file takes several chunks
    big = ReferenceVLA(dataclasses.replace(VLAConfig(), vocab=16_384)).eval()
    v = registry.publish(big).version
    path = registry.artifact_dir(v) / POLICY_DATA
    whole = path.read_bytes()
    assert len(whole) > CHUNK_BYTES  # several chunks
    chunks = _fetch(stub, v, POLICY_DATA)
    assert all(len(c.data) <= CHUNK_BYTES for c in chunks)
    # the transfer broke after the first chunk: resume from there
    got = chunks[0].data
    resumed = _fetch(stub, v, POLICY_DATA, offset=len(got))
    assert resumed[0].offset == len(got)
    got += b"".join(c.data for c in resumed)
    assert hashlib.sha256(got).hexdigest() == sha256_file(path)
    assert _fetch(stub, v, MANIFEST)[0].data == (registry.artifact_dir(v) / MANIFEST).read_bytes()


def test_a_fleet_fetching_one_version_reads_each_chunk_from_disk_once(learner):
    """The service serves FetchArtifact from its chunk cache: eight robots fetching the same
    version at once cost one read and one serialization per chunk, and all get the file."""
    stub, _, registry, *_ = learner
    big = ReferenceVLA(dataclasses.replace(VLAConfig(), vocab=16_384)).eval()
    v = registry.publish(big).version
    whole = (registry.artifact_dir(v) / POLICY_DATA).read_bytes()
    n_chunks = -(-len(whole) // CHUNK_BYTES)
    before = stub.GetStats(pb.StatsRequest())
    got, start = [None] * 8, threading.Barrier(8)

    def robot(i):
        start.wait()
        got[i] = b"".join(c.data for c in _fetch(stub, v, POLICY_DATA))

    threads = [threading.Thread(target=robot, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == [whole] * 8
    after = stub.GetStats(pb.StatsRequest())
    assert after.fetch_chunks_read - before.fetch_chunks_read == n_chunks
    assert after.fetch_chunks_cached - before.fetch_chunks_cached == 7 * n_chunks


@pytest.mark.parametrize("version,name,code", [
    (1, "../../exp.sqlite", grpc.StatusCode.NOT_FOUND),
    (1, "/etc/passwd", grpc.StatusCode.NOT_FOUND),
    (1, "model.pt", grpc.StatusCode.NOT_FOUND),
    (9, "policy.onnx", grpc.StatusCode.NOT_FOUND),
])
def test_fetch_refuses_unknown_names_and_versions(learner, version, name, code):
    stub, *_ = learner
    with pytest.raises(grpc.RpcError) as e:
        list(stub.FetchArtifact(pb.FetchRequest(version=version, name=name), timeout=10))
    assert e.value.code() == code


def test_fetch_refuses_offsets_past_the_end(learner):
    stub, *_ = learner
    with pytest.raises(grpc.RpcError) as e:
        list(stub.FetchArtifact(pb.FetchRequest(version=1, name="policy.onnx", offset=1 << 40), timeout=10))
    assert e.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_storage_failure_is_unavailable_and_not_acked(learner):
    stub, store, *_ = learner
    store.close()  # the database is gone from under the service
    with pytest.raises(grpc.RpcError) as e:
        stub.PushExperience(pb.ExperienceBatch(robot_id="r1", records=[simple_record()]), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_version_removed_by_retention_is_not_found_and_the_kept_ones_fetch(learner):
    stub, _, registry, model, _ = learner
    registry.keep_versions = 2
    for _ in range(3):
        registry.publish(model)
    assert registry.versions() == [1, 3, 4]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.FetchArtifact(pb.FetchRequest(version=2, name=MANIFEST), timeout=10))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "not in the registry" in e.value.details()
    for v in (1, 3, 4):
        assert _fetch(stub, v, MANIFEST)[0].data == (registry.artifact_dir(v) / MANIFEST).read_bytes()
