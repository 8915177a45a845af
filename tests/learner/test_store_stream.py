"""StreamExperience on the real service and store: a robot's spool drained over one stream,
a poison batch quarantined with the rest delivered, resends deduplicated."""
import math

import pytest

from learner.ingest_pool import ValidatorPool
from learner.registry import Registry
from learner.service import serve
from learner.store import ExperienceStore
from runtime.spool import CORRUPT, Spool
from runtime.stream import ExperienceClient
from tests.learner.helpers import simple_record


@pytest.fixture(params=[0, 2], ids=["in-process", "validator-children"])
def learner(request, tmp_path):
    # the same stream checked in the learner's threads and in ingest validator children
    pool = ValidatorPool(request.param) if request.param else None
    store = ExperienceStore(tmp_path / "experience", validators=pool)
    registry = Registry(tmp_path / "registry")
    server, port = serve("127.0.0.1:0", store, registry, stream_window=2)
    yield store, f"127.0.0.1:{port}"
    registry.close()
    server.stop(grace=1).wait()
    store.close()


def test_stream_delivers_quarantines_poison_and_dedups(learner, tmp_path):
    store, addr = learner
    spool = Spool(tmp_path / "spool", "r1")
    for b in range(6):
        records = [simple_record("r1", f"e{b // 2}", spool.next_record_seq()) for _ in range(3)]
        if b == 3:
            records[1].reward = math.nan  # the learner must refuse this batch, and only it
        spool.append(records)
    client = ExperienceClient(addr, spool, "r1", window=4).start()
    try:
        assert client.drain(20.0)
    finally:
        client.stop()
    assert client.transport == "stream" and client.batches_quarantined == 1
    assert "batch 4" in client.last_error and "reward" in client.last_error
    assert [p.name.split("-")[0] for p in (tmp_path / "spool" / CORRUPT).iterdir()] == \
        ["b000000000004"]
    seqs = [r.seq for _, r in store.read(0, 100)]  # spool seqs start at 1
    assert seqs == [s for s in range(1, 19) if s not in (10, 11, 12)]
    # the robot restarts with the same (acked) records spooled again: all dropped as resends
    again = Spool(tmp_path / "spool2", "r1")
    again.append([r for _, r in store.read(0, 3)])
    client = ExperienceClient(addr, again, "r1").start()
    try:
        assert client.drain(20.0)
    finally:
        client.stop()
    assert (client.records_stored, client.records_duplicate) == (0, 3)
    assert store.count() == 15 and store.duplicates_dropped == 3
