"""The durable experience store: commit before ack, dedup across restarts, whole-batch
validation, recovery from torn tails and orphan segments, sealing, concurrent appenders."""
import math
import os
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from learner import segments
from learner.store import ExperienceStore, StoreUnavailable
from learner.validate import validate_batch
from tests.learner.helpers import simple_record
from tether.wire import tether_pb2 as pb


def batch(records, robot="r1", seq=1):
    return pb.ExperienceBatch(robot_id=robot, batch_seq=seq, records=records)


def test_append_is_readable_by_a_fresh_store_and_resends_are_dropped(tmp_path):
    path = tmp_path / "store"
    store = ExperienceStore(path)
    recs = [simple_record(seq=i, reward=float(i), done=i == 2, success=i == 2) for i in range(3)]
    assert store.append(batch(recs)) == (3, 0)
    assert store.append(batch(recs[1:] + [simple_record(seq=3, episode="e2")])) == (1, 2)
    assert store.duplicates_dropped == 2
    # a second store on the same directory (another process would see the same): committed =
    # visible, and it is a read-only view while the first one writes
    other = ExperienceStore(path)
    assert not other.writable
    with pytest.raises(StoreUnavailable, match="read-only"):
        other.append(batch([simple_record(seq=9)]))
    rows = other.read(0, 100)
    assert [r.seq for _, r in rows] == [0, 1, 2, 3]
    assert [rowid for rowid, _ in rows] == sorted(rowid for rowid, _ in rows)
    assert rows[2][1] == recs[2]
    assert other.read(rows[1][0], 1)[0][1].seq == 2
    assert other.stats() == {"r1": {"records": 4, "episodes": 2, "successes": 1}}
    store.close()
    other.close()


def test_acknowledged_data_survives_a_killed_process(tmp_path):
    path = tmp_path / "store"
    code = (
        "import os, sys; sys.path.insert(0, '.')\n"
        "from learner.store import ExperienceStore\n"
        "from tests.learner.helpers import simple_record\n"
        "from tether.wire import tether_pb2 as pb\n"
        f"s = ExperienceStore({str(path)!r})\n"
        "print(s.append(pb.ExperienceBatch(robot_id='r1', records=[simple_record(seq=i) for i in range(5)])), flush=True)\n"
        "os._exit(9)  # no close, no cleanup: like a kill right after the ack\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 9 and "(5, 0)" in out.stdout, out.stderr
    assert ExperienceStore(path).count() == 5


def _bad_tensor(r):
    r.actions.data = r.actions.data[:-3]


def _nan_reward(r):
    r.reward = math.nan


def _wrong_shape(r):
    r.actions.shape[:] = [2 * 4]  # 1-D: not [n, A]


def _offsets_mismatch(r):
    del r.offsets[-1]


def _empty_episode(r):
    r.episode_id = ""


def _other_robot(r):
    r.robot_id = "r2"


def _nan_state(r):
    r.observation.state.data = np.full(4, np.nan, np.float32).tobytes()


def _policy_rows_short(r):
    r.policy_actions.CopyFrom(r.actions)
    r.policy_actions.shape[0] -= 1
    r.policy_actions.data = r.policy_actions.data[:-16]


def _nan_policy_rows(r):
    r.policy_actions.CopyFrom(r.actions)
    r.policy_actions.data = np.full(8, np.nan, np.float32).tobytes()


def _operator_with_policy_rows(r):
    r.policy_actions.CopyFrom(r.actions)
    r.human_intervention = True


@pytest.mark.parametrize("corrupt,words", [
    (_bad_tensor, "bytes"), (_nan_reward, "reward"), (_wrong_shape, "actions"),
    (_offsets_mismatch, "offsets"), (_empty_episode, "episode_id"), (_other_robot, "robot_id"),
    (_nan_state, "state"), (_policy_rows_short, "policy_actions .*the shape of actions"),
    (_nan_policy_rows, "policy_actions holds NaN"), (_operator_with_policy_rows, "operator")])
def test_invalid_batch_is_refused_whole(tmp_path, corrupt, words):
    store = ExperienceStore(tmp_path / "store")
    recs = [simple_record(seq=i) for i in range(3)]
    corrupt(recs[1])
    with pytest.raises(ValueError, match=words) as e:
        store.append(batch(recs))
    assert "record 1" in str(e.value)
    assert store.count() == 0


def test_the_policys_rows_are_stored_next_to_the_executed_ones(tmp_path):
    store = ExperienceStore(tmp_path / "store")
    recs = [simple_record(seq=i) for i in range(2)]
    rows = np.clip(np.frombuffer(recs[0].actions.data, np.float32) * 3, -5, 5)
    recs[0].policy_actions.CopyFrom(recs[0].actions)
    recs[0].policy_actions.data = rows.astype(np.float32).tobytes()
    store.append(batch(recs))
    back = [r for _, r in store.read(0, 10)]
    assert back == recs and back[0].HasField("policy_actions")
    assert not back[1].HasField("policy_actions")


def _records(n, episode="e1", robot="r1", first=0, done_at=None):
    return [simple_record(robot=robot, episode=episode, seq=first + i,
                          done=i == done_at, success=i == done_at) for i in range(n)]


def _keys(store):
    return [(r.robot_id, r.episode_id, r.seq) for _, r in store.read(0, 10**6)]


def test_dedup_holds_across_reopen_and_the_catalog_indexes_episodes(tmp_path):
    store = ExperienceStore(tmp_path / "store")
    assert store.append(batch(_records(4))) == (4, 0)
    store.close()
    store = ExperienceStore(tmp_path / "store")
    # a resend after a learner restart: the first 4 are dropped, the 2 new ones stored
    assert store.append(batch(_records(6, done_at=5))) == (2, 4)
    assert store.duplicates_dropped == 4
    assert [k[2] for k in _keys(store)] == list(range(6))
    [ep] = store.episodes()
    assert (ep["robot_id"], ep["episode_id"], ep["first_seq"], ep["last_seq"]) == ("r1", "e1", 0, 5)
    assert (ep["n_records"], ep["success"], ep["terminated"]) == (6, 1, 1)
    assert store.episodes(successful_only=True, complete_only=True) == [ep]
    assert store.episodes(robot="r2") == [] and store.episodes(min_version=2) == []
    store.close()


def test_uncommitted_segment_bytes_are_cut_and_orphans_removed_on_open(tmp_path):
    store = ExperienceStore(tmp_path / "store")
    store.append(batch(_records(3)))
    store.close()
    segs = tmp_path / "store" / "segments"
    [active] = list(segs.glob("*.arrows"))
    committed = active.stat().st_size
    with open(active, "ab") as f:  # a frame written and fsynced, then killed before the commit
        rows = validate_batch(batch(_records(2, first=10)))
        f.write(segments.encode_frame(segments.build_table(rows, 4)))
    (segs / "seg-00000009.arrows").write_bytes(b"a new segment, never in the catalog")
    (segs / ".seg-00000001.parquet.tmp").write_bytes(b"a seal torn by a crash")
    (segs / "seg-00000001.parquet").write_bytes(b"a seal whose catalog switch never committed")
    store = ExperienceStore(tmp_path / "store")
    assert sorted(p.name for p in segs.iterdir()) == [active.name]
    assert active.stat().st_size == committed
    assert [k[2] for k in _keys(store)] == [0, 1, 2]  # seqs 10, 11 were never acknowledged
    assert store.append(batch(_records(2, first=10))) == (2, 0)  # ... so they are not duplicates
    assert [k[2] for k in _keys(store)] == [0, 1, 2, 10, 11]
    store.close()


def test_a_torn_tail_never_corrupts_what_was_committed(tmp_path):
    store = ExperienceStore(tmp_path / "store")
    store.append(batch(_records(5)))
    store.close()
    [active] = list((tmp_path / "store" / "segments").glob("*.arrows"))
    with open(active, "ab") as f:
        f.write(os.urandom(777))  # half a frame
    store = ExperienceStore(tmp_path / "store")
    assert [k[2] for k in _keys(store)] == list(range(5))
    store.append(batch(_records(2, first=5)))
    store.close()
    assert [k[2] for k in _keys(ExperienceStore(tmp_path / "store"))] == list(range(7))


def test_concurrent_appenders_with_resends_store_each_record_once(tmp_path):
    store = ExperienceStore(tmp_path / "store", segment_bytes=64 * 1024)
    errors = []

    def robot(name):
        try:
            for b in range(10):
                recs = _records(8, robot=name, episode=f"e{b // 4}", first=8 * b)
                assert store.append(batch(recs, robot=name, seq=b)) == (8, 0)
                if b % 3 == 0:  # a lost ack: the same batch again
                    assert store.append(batch(recs, robot=name, seq=b)) == (0, 8)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=robot, args=(f"r{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    keys = _keys(store)
    assert len(keys) == len(set(keys)) == 8 * 80 == store.count()
    assert store.duplicates_dropped == 8 * 4 * 8
    for i in range(8):  # each robot's records in the order it sent them
        assert [k[2] for k in keys if k[0] == f"r{i}"] == list(range(80))
    assert store.stats()["r3"] == {"records": 80, "episodes": 3, "successes": 0}
    store.close()


def test_full_segments_are_sealed_into_parquet_and_read_the_same(tmp_path):
    store = ExperienceStore(tmp_path / "store", segment_bytes=32 * 1024)
    for b in range(12):
        store.append(batch(_records(4, first=4 * b)))
    before = store.read(0, 1000)
    assert store.wait_sealed(30)
    segs = tmp_path / "store" / "segments"
    sealed = sorted(segs.glob("*.parquet"))
    assert len(sealed) >= 2 and len(list(segs.glob("*.arrows"))) == 1
    table = pq.read_table(sealed[0])
    assert table.schema.equals(segments.SCHEMA)
    assert table.column("seq").to_pylist() == sorted(table.column("seq").to_pylist())
    assert store.read(0, 1000) == before
    # reading from any position crosses Parquet row groups and IPC frames alike
    assert store.read(before[17][0], 5) == before[18:23]
    assert [t.num_rows for t in store.scan(["seq"], rows_per_table=10)][:2] == [10, 10]
    store.close()
    reopened = ExperienceStore(tmp_path / "store")
    assert reopened.read(0, 1000) == before
    reopened.close()


def test_segments_written_before_a_column_existed_read_it_as_null_and_seal(tmp_path):
    """A store written by an older Tether (no ``interventions`` column) keeps working: its
    frames read the new column as null, new frames carry it, and sealing a segment that mixes
    both writes one Parquet schema."""
    store = ExperienceStore(tmp_path / "store", segment_bytes=1 << 30)
    store.append(batch(_records(3)))
    store.close()
    [active] = list((tmp_path / "store" / "segments").glob("*.arrows"))
    # rewrite the committed frame as the older version wrote it (the catalog says where each
    # frame is, so fix its length there)
    old_table = segments.decode_frame(active.read_bytes()).drop_columns(["interventions"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, old_table.schema) as w:
        w.write_table(old_table)
    old_frame = sink.getvalue().to_pybytes()
    active.write_bytes(old_frame)
    db = sqlite3.connect(tmp_path / "store" / "catalog.sqlite")
    db.execute("UPDATE frames SET length=?", (len(old_frame),))
    db.execute("UPDATE segments SET bytes=?", (len(old_frame),))
    db.commit()
    db.close()
    store = ExperienceStore(tmp_path / "store", segment_bytes=1 << 30)
    newer = _records(2, first=3)
    for r in newer:
        r.verifier.actions_clamped = 2
    store.append(batch(newer, seq=2))
    [t] = list(store.scan(["seq", "interventions"]))
    assert t.column("seq").to_pylist() == [0, 1, 2, 3, 4]
    assert t.column("interventions").to_pylist() == [None, None, None, 2, 2]
    assert [r.seq for _, r in store.read(0, 10)] == [0, 1, 2, 3, 4]
    store.close()
    sid = int(active.name.split("-")[1].split(".")[0])
    frames = [(0, len(old_frame)), (len(old_frame), active.stat().st_size - len(old_frame))]
    path, _ = segments.seal_to_parquet(tmp_path / "store" / "segments", sid, frames)
    assert pq.read_table(path).schema.equals(segments.SCHEMA)
    assert pq.read_table(path).column("interventions").to_pylist() == [None, None, None, 2, 2]
    # and a Parquet segment written before the column existed reads it as null
    pq.write_table(pq.read_table(path).drop_columns(["interventions"]), path)
    assert segments.read_row_group(path, 0, ["seq", "interventions"]).to_pydict() == {
        "seq": [0, 1, 2, 3, 4], "interventions": [None] * 5}
