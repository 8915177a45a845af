"""Merge strategies, the d <= s <= H - d rule, sync execution, stale observations, the
inference error budget, and the benchmark's jerk metric."""
import dataclasses
import math

import numpy as np
import pytest

from runtime.chunks import ActionQueue, MergeOptions
from runtime.clock import VirtualClock
from runtime.control import ControlLoop
from runtime.inference import InferenceWorker
from sim.bench_async import boundary_jerk
from verifier.envelope import Envelope
from tests.doubles import FakePolicy, PointMassRobot
from tests.runtime.test_chunks import OBS, chunk, drain


def test_ensemble_is_acts_exponential_weighting():
    q = ActionQueue(2, MergeOptions(ensemble_m=0.5))
    old, new = chunk(1.0, start=0, h=4, chunk_id=1), chunk(3.0, start=2, h=4, chunk_id=2)
    q.insert(old, strategy="ensemble")
    drain(q, 0, 2)
    q.insert(new, strategy="ensemble")
    c, off, a = q.pop(2)
    w0, w1 = 1.0, math.exp(-0.5)  # oldest prediction weighs most
    np.testing.assert_allclose(a, (w0 * old.actions[2] + w1 * new.actions[0]) / (w0 + w1), 1e-6)
    assert c is new and off == 0  # provenance: the newest contributing chunk
    np.testing.assert_allclose(q.pop(4)[2], new.actions[2])  # only the new chunk covers it


def test_average_blends_with_the_new_weight():
    q = ActionQueue(2, MergeOptions(new_weight=0.7))
    old, new = chunk(1.0, start=0, h=4), chunk(3.0, start=1, h=4, chunk_id=2)
    q.insert(old, strategy="average")
    q.insert(new, strategy="average")
    np.testing.assert_allclose(q.pop(1)[2], 0.3 * old.actions[1] + 0.7 * new.actions[0], 1e-6)


@pytest.mark.parametrize("bad", [dict(ensemble_m=-1), dict(new_weight=0), dict(new_weight=1.5)])
def test_merge_options_are_validated(bad):
    with pytest.raises(ValueError):
        MergeOptions(**bad)


def _worker(latency, s=None, h=16, sync=False, rate=10.0, **kw):
    clock = VirtualClock()
    policy = FakePolicy(horizon=h, action_dim=4, value=0.1)
    queue = ActionQueue(4)
    worker = InferenceWorker(policy, queue, clock, rate_hz=rate, threaded=False,
                             simulated_latency_s=latency, actions_per_chunk=s, sync=sync, **kw)
    return worker, queue, clock, policy


@pytest.mark.parametrize("latency,s,expect_s", [(0.3, 2, 3), (0.3, 15, 13), (0.3, 8, 8),
                                                  (0.0, 16, 16), (0.9, None, 8)])
def test_execution_horizon_keeps_d_le_s_le_h_minus_d(latency, s, expect_s):
    worker, *_ = _worker(latency, s)
    d = worker.delay_ticks()
    assert d <= worker.execution_horizon() <= 16 - d
    assert worker.execution_horizon() == expect_s
    assert worker.threshold() == 16 - expect_s


def run_loop(worker, queue, clock, ticks):
    robot = PointMassRobot(clock=clock, max_steps=10_000)
    env = Envelope(robot.describe())
    records = []
    loop = ControlLoop(robot, queue, env, clock, worker.rate_hz, records.append, worker=worker,
                       to_command=worker.to_command, from_command=worker.from_command)
    loop.run(max_ticks=ticks)
    return loop, records


def test_async_never_stalls_after_the_first_chunk_and_requests_every_s_ticks():
    worker, queue, clock, policy = _worker(0.3, s=8)
    loop, records = run_loop(worker, queue, clock, 80)
    first = next(i for i, r in enumerate(records) if r.chunk is not None)
    assert all(r.chunk is not None for r in records[first:])
    assert set(policy.prefix_lens[1:]) == {3}  # d = 3 committed actions each time


def test_sync_holds_for_every_inference():
    worker, queue, clock, policy = _worker(0.3, s=8, sync=True)
    loop, records = run_loop(worker, queue, clock, 66)
    # each cycle: 3 hold ticks while inferring, then 8 actions from the chunk's first row
    pattern = [r.chunk is None for r in records[:22]]
    assert pattern == ([True] * 2 + [False] * 8 + [True] * 3 + [False] * 8 + [True])
    assert [r.offset for r in records[2:10]] == list(range(8))
    assert set(policy.prefix_lens) == {0}


def test_stale_observation_is_not_inferred_from():
    worker, queue, clock, _ = _worker(0.0, max_obs_age_s=0.5)
    clock.advance(2.0)
    assert not worker.maybe_request(0, OBS)  # OBS was taken at t = 0
    assert worker.stale_observations == 1 and worker.chunks == 0
    assert worker.maybe_request(0, dataclasses.replace(OBS, timestamp=1.9))


def test_prefix_strategy_needs_a_prefix_policy():
    clock = VirtualClock()
    policy = FakePolicy(horizon=8, action_dim=4)
    policy.accepts_prefix = False
    with pytest.raises(ValueError, match="accepts an action prefix"):
        InferenceWorker(policy, ActionQueue(4), clock, rate_hz=10, strategy="prefix")


def test_inference_errors_past_the_budget_stop_the_loop_holding():
    worker, queue, clock, policy = _worker(0.0, error_budget=2)

    def broken(*a, **k):
        raise RuntimeError("engine lost")
    policy.infer = broken
    loop, records = run_loop(worker, queue, clock, 50)
    assert loop.stopped_by_errors and loop.ticks < 10
    assert all(r.chunk is None for r in records)
    np.testing.assert_array_equal(loop.robot.sent[-1], np.zeros(4))


def test_boundary_jerk_is_zero_for_smooth_motion_and_positive_at_a_jump():
    cmds = np.ones((12, 4))
    ids = [1] * 4 + [2] * 4 + [3] * 4
    # the first boundary (tick 4) is the episode's first chunk change... left out: tick 8 only
    np.testing.assert_allclose(boundary_jerk(cmds, ids, 0.1, 0.01), [0.0, 0.0], atol=1e-20)
    cmds[8:] = 2.0
    jerk = boundary_jerk(cmds, ids, 0.1, 0.01)
    assert len(jerk) == 2 and min(jerk) > 0


def test_latency_window_quantiles_match_numpy_as_samples_come_and_go():
    from runtime.status import LatencyWindow

    rng = np.random.default_rng(0)
    w = LatencyWindow(size=50)
    assert w.quantile(0.95, default=0.123) == 0.123
    seen = []
    for x in np.r_[rng.exponential(0.01, 300), np.full(20, 0.005)]:  # ties included
        w.add(x)
        seen.append(float(x))
        for q in (0.0, 0.5, 0.95, 1.0):
            assert w.quantile(q) == pytest.approx(float(np.quantile(seen[-50:], q)), abs=1e-15)
    w.add(float("nan"))  # ignored rather than poisoning every later quantile
    assert len(w) == 50 and np.isfinite(w.quantile(0.99)) and w.count == 320
    with pytest.raises(ValueError):
        w.quantile(1.5)
