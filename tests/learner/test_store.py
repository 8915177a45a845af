"""The durable experience store: commit before ack, dedup, whole-batch validation."""
import math
import subprocess
import sys

import numpy as np
import pytest

from learner.store import ExperienceStore
from tests.learner.helpers import simple_record
from tether.wire import tether_pb2 as pb


def batch(records, robot="r1", seq=1):
    return pb.ExperienceBatch(robot_id=robot, batch_seq=seq, records=records)


def test_append_is_readable_by_a_fresh_store_and_resends_are_dropped(tmp_path):
    path = tmp_path / "exp.sqlite"
    store = ExperienceStore(path)
    recs = [simple_record(seq=i, reward=float(i), done=i == 2, success=i == 2) for i in range(3)]
    assert store.append(batch(recs)) == (3, 0)
    assert store.append(batch(recs[1:] + [simple_record(seq=3, episode="e2")])) == (1, 2)
    assert store.duplicates_dropped == 2
    # a second store on the same file (another process would see the same): committed = visible
    other = ExperienceStore(path)
    rows = other.read(0, 100)
    assert [r.seq for _, r in rows] == [0, 1, 2, 3]
    assert [rowid for rowid, _ in rows] == sorted(rowid for rowid, _ in rows)
    assert rows[2][1] == recs[2]
    assert other.read(rows[1][0], 1)[0][1].seq == 2
    assert other.stats() == {"r1": {"records": 4, "episodes": 2, "successes": 1}}
    store.close()
    other.close()


def test_acknowledged_data_survives_a_killed_process(tmp_path):
    path = tmp_path / "exp.sqlite"
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


@pytest.mark.parametrize("corrupt,words", [
    (_bad_tensor, "bytes"), (_nan_reward, "reward"), (_wrong_shape, "actions"),
    (_offsets_mismatch, "offsets"), (_empty_episode, "episode_id"), (_other_robot, "robot_id"),
    (_nan_state, "state")])
def test_invalid_batch_is_refused_whole(tmp_path, corrupt, words):
    store = ExperienceStore(tmp_path / "exp.sqlite")
    recs = [simple_record(seq=i) for i in range(3)]
    corrupt(recs[1])
    with pytest.raises(ValueError, match=words) as e:
        store.append(batch(recs))
    assert "record 1" in str(e.value)
    assert store.count() == 0
