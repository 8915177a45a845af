"""The disk spool: durable across re-opens, exact acks, quarantine, a hard size limit."""
import logging
import threading

import pytest

from runtime.spool import CORRUPT, SEQ_LEASE, Spool, SpoolFull
from tether.wire import tether_pb2 as pb


def _records(spool, n, episode="e"):
    return [pb.ChunkRecord(robot_id=spool.robot_id, episode_id=episode,
                           seq=spool.next_record_seq(), reward=float(i)) for i in range(n)]


def test_survives_reopen_with_records_seqs_and_counters(tmp_path):
    s = Spool(tmp_path, "r1")
    b1 = s.append(_records(s, 3))
    b2 = s.append(_records(s, 2))
    assert (b1, b2) == (1, 2)
    s.ack(b1)
    last_seq = s.next_record_seq()

    s2 = Spool(tmp_path, "r1")
    assert s2.pending() == 2 and s2.pending_batches() == 1
    assert (s2.records_spooled, s2.records_acked) == (5, 3)
    [(seq, batch)] = s2.peek(10)
    assert seq == b2 and batch.batch_seq == b2 and batch.robot_id == "r1"
    assert [r.reward for r in batch.records] == [0.0, 1.0]
    assert s2.next_record_seq() > last_seq          # never reused after a restart
    assert s2.append(_records(s2, 1)) == b2 + 1     # batch seqs continue too


def test_seqs_strictly_increase_past_a_lease_without_appends(tmp_path):
    s = Spool(tmp_path, "r1")
    seqs = [s.next_record_seq() for _ in range(SEQ_LEASE + 5)]
    assert seqs == sorted(set(seqs))
    assert Spool(tmp_path, "r1").next_record_seq() > seqs[-1]


def test_ack_deletes_only_that_batch(tmp_path):
    s = Spool(tmp_path, "r1")
    seqs = [s.append(_records(s, 1, episode=f"e{i}")) for i in range(3)]
    s.ack(seqs[1])
    s.ack(seqs[1])  # a repeated ack is harmless
    left = s.peek(10)
    assert [b for b, _ in left] == [seqs[0], seqs[2]]
    assert [batch.records[0].episode_id for _, batch in left] == ["e0", "e2"]
    assert len(list(tmp_path.glob("b*.pb"))) == 2
    assert s.pending() == 2 and s.records_acked == 1


def test_corrupt_file_is_quarantined_not_lost(tmp_path, caplog):
    s = Spool(tmp_path, "r1")
    good = s.append(_records(s, 1))
    bad = s.append(_records(s, 2))
    [path] = [p for p in tmp_path.glob("b*.pb") if f"{bad:012d}" in p.name]
    path.write_bytes(b"\xff\xff\xff not a protobuf")
    s = Spool(tmp_path, "r1")
    with caplog.at_level(logging.ERROR):
        assert [b for b, _ in s.peek(10)] == [good]
    assert (tmp_path / CORRUPT / path.name).read_bytes().startswith(b"\xff\xff")
    assert not path.exists()
    assert "does not parse" in caplog.text and s.pending() == 1
    assert s.records_quarantined == 2


def test_full_spool_refuses_new_batches_and_keeps_old_ones(tmp_path):
    s = Spool(tmp_path, "r1", max_bytes=400)
    first = s.append([pb.ChunkRecord(robot_id="r1", seq=s.next_record_seq(), task="x" * 200)])
    with pytest.raises(SpoolFull, match="max_bytes=400"):
        s.append([pb.ChunkRecord(robot_id="r1", seq=s.next_record_seq(), task="y" * 300)])
    assert [b for b, _ in s.peek(10)] == [first]
    s.ack(first)
    s.append([pb.ChunkRecord(robot_id="r1", seq=s.next_record_seq(), task="y" * 300)])


def test_crash_between_batch_write_and_state_write_is_counted(tmp_path):
    s = Spool(tmp_path, "r1")
    s.append(_records(s, 2))
    state = (tmp_path / "state.json").read_bytes()
    s.append(_records(s, 3))
    (tmp_path / "state.json").write_bytes(state)  # as if the state write never happened
    (tmp_path / ".b000000000009-n1.pb.tmp-1").write_bytes(b"torn")
    s2 = Spool(tmp_path, "r1")
    assert s2.records_spooled == 5 and s2.pending() == 5
    assert s2.append(_records(s2, 1)) == 3
    assert not list(tmp_path.glob(".*tmp*"))


def test_concurrent_append_and_ack(tmp_path):
    s = Spool(tmp_path, "r1")
    acked = []

    def consumer():
        while len(acked) < 20:
            if s.wait(1.0):
                for b, _ in s.peek(1):
                    s.ack(b)
                    acked.append(b)

    t = threading.Thread(target=consumer)
    t.start()
    for _ in range(20):
        s.append(_records(s, 1))
    t.join(10)
    assert acked == list(range(1, 21)) and s.pending() == 0


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="robot_id"):
        Spool(tmp_path, "")
    with pytest.raises(ValueError, match="max_bytes"):
        Spool(tmp_path, "r", max_bytes=0)
    with pytest.raises(ValueError, match="at least one record"):
        Spool(tmp_path, "r").append([])
