import numpy as np
import pytest

from robots.base import Observation
from runtime.chunks import ActionQueue
from runtime.types import Chunk

OBS = Observation(images={}, state=np.zeros(4, np.float32), instruction="", timestamp=0.0)


def chunk(value: float, start: int, h: int = 8, prefix_len: int = 0, epoch: int = 0,
          chunk_id: int = 1) -> Chunk:
    actions = np.full((h, 2), value, np.float32) + np.arange(h, dtype=np.float32)[:, None] / 100
    return Chunk(chunk_id=chunk_id, epoch=epoch, policy_version=1, weight_sha256="x",
                 observation=OBS, start_tick=start, actions=actions, mean=actions,
                 log_std=np.zeros_like(actions), prefix=np.zeros_like(actions),
                 prefix_len=prefix_len)


def drain(q: ActionQueue, first: int, n: int):
    return [q.pop(t) for t in range(first, first + n)]


def test_pop_walks_a_chunk_row_by_row_then_underruns():
    q = ActionQueue(2)
    c = chunk(1.0, start=0, h=4)
    assert q.insert(c)
    assert q.remaining(0) == 4
    got = drain(q, 0, 5)
    assert [g[1] for g in got[:4]] == [0, 1, 2, 3]
    np.testing.assert_allclose(got[2][2], [1.02, 1.02])
    assert got[4] is None and q.underruns == 1


def test_stale_slots_before_the_tick_are_discarded():
    q = ActionQueue(2)
    q.insert(chunk(1.0, start=0, h=8))
    chunk_, offset, _ = q.pop(5)  # ticks 0..4 were missed
    assert offset == 5 and q.remaining(6) == 2 and len(q) == 2


def test_latest_replaces_from_the_next_tick():
    q = ActionQueue(2)
    q.insert(chunk(1.0, start=0, h=8, chunk_id=1))
    drain(q, 0, 3)  # ticks 0..2 executed; the new chunk was requested at tick 1
    new = chunk(2.0, start=1, h=8, chunk_id=2)
    assert q.insert(new, strategy="latest")
    c, off, a = q.pop(3)
    assert c is new and off == 2  # row 2 of a chunk starting at tick 1 is tick 3
    assert q.remaining(4) == 5  # ticks 4..8; the old chunk's tail is gone


def test_prefix_keeps_committed_actions_then_takes_over():
    q = ActionQueue(2)
    old = chunk(1.0, start=0, h=8, chunk_id=1)
    q.insert(old)
    drain(q, 0, 2)
    np.testing.assert_allclose(q.committed(2, 3), old.actions[2:5])
    new = chunk(2.0, start=2, h=8, prefix_len=3, chunk_id=2)
    assert q.insert(new, from_tick=2, strategy="prefix")
    got = drain(q, 2, 8)
    assert [g[0].chunk_id for g in got] == [1, 1, 1, 2, 2, 2, 2, 2]
    assert [g[1] for g in got] == [2, 3, 4, 3, 4, 5, 6, 7]
    assert q.pop(10) is None


def test_prefix_fills_committed_ticks_the_old_chunk_no_longer_covers():
    q = ActionQueue(2)
    new = chunk(2.0, start=0, h=4, prefix_len=2, chunk_id=2)
    q.insert(new, strategy="prefix")
    assert [g[1] for g in drain(q, 0, 4)] == [0, 1, 2, 3]


def test_committed_stops_at_a_gap_and_has_the_action_width():
    q = ActionQueue(2)
    assert q.committed(0, 3).shape == (0, 2)
    q.insert(chunk(1.0, start=0, h=2))
    assert q.committed(0, 5).shape == (2, 2)


def test_reset_drops_everything_and_refuses_old_epochs():
    q = ActionQueue(2)
    q.insert(chunk(1.0, start=0, epoch=0))
    in_flight = chunk(3.0, start=1, epoch=0, chunk_id=2)
    q.reset(1)
    assert len(q) == 0 and q.pop(0) is None
    assert not q.insert(in_flight) and q.refused_stale == 1
    assert q.pop(1) is None
    assert q.insert(chunk(4.0, start=2, epoch=1, chunk_id=3))
    with pytest.raises(ValueError, match="go back"):
        q.reset(0)


def test_unknown_strategy_suggests_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'prefix'"):
        ActionQueue(2).insert(chunk(1.0, start=0), strategy="prefx")
