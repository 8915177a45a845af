"""Ingest validation in child processes (learner/ingest_pool.py): the same rows and the same
refusals as validating in the learner, and a child that dies, hangs or lies costs a resend of
the batch it held, never a wrong row in the store."""
import math
import os
import signal
import time

import numpy as np
import pytest

from learner import segments as seg
from learner.ingest_pool import ValidatorPool, ValidatorUnavailable
from learner.store import ExperienceStore
from learner.validate import validate_batch
from tests.learner.helpers import simple_record
from tether.wire import tether_pb2 as pb


def _batch(robot="r1", n=5, episode="e1", first_seq=0) -> pb.ExperienceBatch:
    return pb.ExperienceBatch(robot_id=robot, batch_seq=1, records=[
        simple_record(robot, episode, first_seq + i, done=i == n - 1) for i in range(n)])


def _validate(pool, batch):
    return pool.validate(batch.SerializeToString(), batch.robot_id, len(batch.records))


@pytest.fixture(scope="module")
def pool():
    p = ValidatorPool(2, answer_timeout_s=3.0)
    yield p
    p.close()


def _wait_dead(worker, timeout=10.0):
    deadline = time.monotonic() + timeout
    while worker.dead is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.dead is not None


def test_children_return_the_rows_the_learner_would_build(pool):
    batch = _batch(n=7)
    local = seg.build_table(validate_batch(batch), 0)
    for _ in range(4):  # both children, pipelined
        assert _validate(pool, batch).equals(local)


def test_children_refuse_what_the_learner_refuses_with_the_same_reason(pool):
    batch = _batch()
    batch.records[2].reward = math.nan
    with pytest.raises(ValueError) as local:
        validate_batch(batch)
    with pytest.raises(ValueError) as remote:
        _validate(pool, batch)
    assert str(remote.value) == str(local.value) and "record 2" in str(remote.value)
    with pytest.raises(ValueError, match="Error parsing message|DecodeError|parse"):
        pool.validate(b"\xff\xff\xff not a batch", "r1", 1)
    assert _validate(pool, _batch()).num_rows == 5  # the child goes on after a refusal


def test_answers_that_do_not_fit_the_batch_are_not_trusted(pool):
    batch = _batch(n=3)
    with pytest.raises(ValidatorUnavailable, match="3 rows"):
        pool.validate(batch.SerializeToString(), "r1", 4)  # the sender said 4 records
    with pytest.raises(ValidatorUnavailable, match="replaced"):
        pool.validate(batch.SerializeToString(), "someone-else", 3)
    assert _validate(pool, batch).num_rows == 3


@pytest.fixture
def fresh_pool():
    p = ValidatorPool(2, answer_timeout_s=3.0)
    yield p
    p.close()


def test_a_child_that_dies_is_replaced_and_the_next_batch_is_stored(fresh_pool):
    pool = fresh_pool
    victim = pool._all[(pool._next + 1) % pool.workers]  # the child the next batch goes to
    before = pool.restarts
    os.kill(victim.proc.pid, signal.SIGKILL)
    _wait_dead(victim)
    assert _validate(pool, _batch()).num_rows == 5
    assert pool.restarts == before + 1 and victim not in pool._all
    assert pool.status() == {"workers": 2, "restarts": before + 1, "running": 2, "in_flight": 0}


def test_a_child_that_hangs_times_out_and_is_replaced(fresh_pool):
    pool = fresh_pool
    victim = pool._all[(pool._next + 1) % pool.workers]
    os.kill(victim.proc.pid, signal.SIGSTOP)
    # 200 records of ~7 KB: more than the (1 MiB) pipe holds: the sender blocks on the stopped child
    with pytest.raises(ValidatorUnavailable, match="no answer in 3 s"):
        _validate(pool, _batch(n=200))
    _wait_dead(victim)
    for _ in range(pool.workers):
        assert _validate(pool, _batch()).num_rows == 5


def test_store_with_children_stores_each_record_once(tmp_path):
    store = ExperienceStore(tmp_path / "experience", validators=ValidatorPool(2))
    try:
        first, second = _batch(n=6), _batch(n=6, first_seq=3)  # 3 records overlap
        assert store.append(first, first.SerializeToString()) == (6, 0)
        assert store.append(second, second.SerializeToString()) == (3, 3)
        got = store.read(0, 100)
        assert [r.seq for _, r in got] == list(range(9))
        assert [rowid for rowid, _ in got] == list(range(1, 10))
        assert got[4][1] == second.records[1]  # the record as sent, images included
        table = next(iter(store.scan(["seq", "state"])))
        assert np.allclose(table.column("state")[8].values.to_numpy(),
                           np.frombuffer(second.records[5].observation.state.data, np.float32))
        # the in-process path and the children agree on the episode the catalog keeps
        assert store.episodes()[0]["n_records"] == 9
    finally:
        store.close()
