import dataclasses

import numpy as np
import pytest

from runtime.chunks import ActionQueue
from runtime.clock import ScaledClock, VirtualClock, WallClock
from runtime.control import ControlLoop
from runtime.inference import InferenceWorker
from verifier.envelope import Envelope
from verifier.gate import ChunkGate
from tests.doubles import FakePolicy, PointMassRobot

RATE = 10.0


def build(policy=None, robot=None, latency=0.35, clock=None, threaded=False, rate=RATE):
    clock = clock or VirtualClock()
    robot = robot or PointMassRobot(clock=clock)
    policy = policy or FakePolicy(horizon=8, action_dim=4, value=3.0)
    queue = ActionQueue(4)
    env = Envelope(robot.describe())
    gate = ChunkGate(env)
    worker = InferenceWorker(policy, queue, clock, rate_hz=rate, gate=gate, threaded=threaded,
                             simulated_latency_s=None if threaded else latency)
    ticks = []
    loop = ControlLoop(robot, queue, env, clock, rate, ticks.append, worker=worker,
                       to_command=worker.to_command, from_command=worker.from_command)
    return loop, worker, robot, ticks, gate


def assert_all_sent_inside_envelope(robot):
    desc = robot.describe()
    lo, hi = desc.bounds()
    sent = np.stack(robot.sent)
    assert np.all(np.isfinite(sent))
    assert np.all(sent >= lo - 1e-6) and np.all(sent <= hi + 1e-6)
    deltas = np.abs(np.diff(np.vstack([np.zeros((1, 4)), sent]), axis=0))
    assert np.all(deltas <= np.asarray(desc.max_delta) + 1e-6)


def test_slow_policy_on_a_virtual_clock_underruns_only_while_the_first_chunk_is_inferred():
    loop, worker, robot, ticks, _ = build()
    loop.run(max_ticks=60)
    assert loop.ticks == 60 and len(ticks) == 60
    assert worker.delay_ticks() == 4  # ceil(0.35 s * 10 Hz), and 4 <= 8 - 4
    # the first request goes out at the reset, a period before tick 0, and lands (0.35 s) by
    # tick 3: ticks 0..2 hold, then never again
    assert loop.stall_ticks == 3
    assert [t.chunk is None for t in ticks[:4]] == [True] * 3 + [False]
    np.testing.assert_array_equal(np.stack(robot.sent[:3]), np.zeros((3, 4)))
    # every later request continues the 4 committed actions
    assert worker.policy.prefix_lens[0] == 0 and set(worker.policy.prefix_lens[1:]) == {4}
    assert loop.deadline_misses == 0 and loop.stats()["jitter_max_ms"] == 0.0
    assert_all_sent_inside_envelope(robot)
    assert loop.envelope.actions_clamped > 0  # the policy asked for 3.0; the robot never saw it
    assert all(t.clamped for t in ticks[3:5])


def test_a_swap_between_chunks_costs_no_tick():
    loop, worker, robot, ticks, _ = build(latency=0.25)
    loop.run(max_ticks=20)
    stalls_before = loop.stall_ticks
    v2 = FakePolicy(horizon=8, action_dim=4, version=2, value=0.2)
    worker.stage(v2)
    loop.run(max_ticks=30)
    assert loop.stall_ticks == stalls_before
    assert worker.swaps == 1 and worker.policy is v2 and worker.previous.version == 1
    assert worker.versions_run == {1, 2}
    versions = [t.chunk.policy_version for t in ticks[20:]]
    first_v2 = versions.index(2)
    assert set(versions[:first_v2]) == {1} and set(versions[first_v2:]) == {2}
    assert worker.rollback() and loop.run(max_ticks=10) is None
    assert worker.policy.version == 1 and worker.swaps == 2
    assert_all_sent_inside_envelope(robot)


@pytest.mark.parametrize("sync", [False, True])
def test_a_staged_version_is_inferred_with_at_the_next_tick(sync):
    """It does not wait for the running chunk to run low (12 of 16 actions per chunk here): the
    next tick requests, and its chunk takes over after the d committed actions. A robot that
    waits for every chunk (sync) keeps its chunk: an early request would stop it mid-chunk."""
    loop, worker, robot, ticks, _ = build(policy=FakePolicy(horizon=16, action_dim=4, value=0.2),
                                          latency=0.25)
    worker.sync = sync
    loop.run(max_ticks=19)  # v1's second chunk was requested at tick 12 (tick 22 when sync)
    worker.stage(FakePolicy(horizon=16, action_dim=4, version=2, value=0.1))
    stalls = loop.stall_ticks
    loop.run(max_ticks=26)
    ran = [(t.chunk.policy_version, t.chunk.chunk_id) if t.chunk else None for t in ticks[19:]]
    d = worker.delay_ticks()
    assert d == 3 and worker.execution_horizon() == (16 if sync else 12)
    if sync:  # all 16 of v1's second chunk ran, then the robot waited for v2's
        assert ran.count((1, 2)) == 16 and ran.index((2, 3)) > 16, ran
    else:  # requested at tick 19, v2 runs from tick 22 on; v1's chunk had 8 actions left
        assert ran[:d] == [(1, 2)] * d and ran[d] == (2, 3), ran
        assert loop.stall_ticks == stalls
    assert_all_sent_inside_envelope(robot)


def test_episode_end_resets_robot_queue_and_epoch():
    clock = VirtualClock()
    robot = PointMassRobot(clock=clock, max_steps=10)
    loop, worker, robot, ticks, _ = build(robot=robot, clock=clock, latency=0.25)
    loop.run(max_ticks=35)
    assert loop.episodes == 3 and robot.resets == 4 and loop.epoch == 4
    # no tick of an episode ran a chunk inferred in an earlier one
    epoch_of_tick = 1
    for t in ticks:
        if t.chunk is not None:
            assert t.chunk.epoch == epoch_of_tick
        if t.truncated:
            epoch_of_tick += 1
    assert worker.chunks_dropped >= 1  # the in-flight request at the reset was dropped


def test_gate_rejection_leads_to_the_remainder_or_a_hold_never_nan():
    policy = FakePolicy(horizon=8, action_dim=4, value=0.1, nan_on_calls=(2, 3))
    loop, worker, robot, ticks, gate = build(policy=policy, latency=0.15)
    loop.run(max_ticks=30)
    assert gate.chunks_rejected == 2 and worker.chunks_rejected == 2
    first = next(i for i, t in enumerate(ticks) if t.chunk is not None)
    # the rejected chunks left the queue to run dry later on: held
    assert any(t.chunk is None for t in ticks[first:])
    assert_all_sent_inside_envelope(robot)


def test_robot_errors_hold_and_a_spent_budget_stops_cleanly():
    robot = PointMassRobot(fail_send=(5, 9))
    loop, *_ = build(robot=robot)
    loop.run(max_ticks=20)
    assert loop.robot_errors == 2 and not loop.stopped_by_errors and loop.ticks == 20
    robot = PointMassRobot(fail_observe=tuple(range(3, 100)))
    loop, *_ = build(robot=robot)
    loop.error_budget = 3
    loop.run(max_ticks=50)
    assert loop.stopped_by_errors and loop.ticks < 10
    assert_all_sent_inside_envelope(robot)


def test_threaded_worker_on_the_wall_clock_keeps_up():
    policy = FakePolicy(horizon=8, action_dim=4, value=0.3, sleep_s=0.02)
    loop, worker, robot, ticks, _ = build(policy=policy, clock=WallClock(), threaded=True,
                                          rate=50.0)
    worker.start()
    try:
        loop.run(seconds=1.0)
    finally:
        worker.stop()
    assert 35 <= loop.ticks <= 51  # deadlines skipped under load lower it
    assert worker.chunks >= 5 and worker.delay_ticks() >= 1
    assert loop.stall_ticks <= 15  # the first chunk's latency; the rest is ahead of time
    assert_all_sent_inside_envelope(robot)


def test_on_a_scaled_clock_the_loop_runs_faster_than_the_wall_and_plans_for_latency_in_its_time():
    """A simulated robot at 4x: the 50 Hz loop ticks 200 times a wall second, and an inference
    of 20 ms (wall) spans 80 ms of the robot's time, which the worker's delay covers in ticks."""
    import time
    policy = FakePolicy(horizon=8, action_dim=4, value=0.3, sleep_s=0.02)
    loop, worker, robot, ticks, _ = build(policy=policy, clock=ScaledClock(4.0), threaded=True,
                                          rate=50.0)
    worker.start()
    w0 = time.monotonic()
    try:
        loop.run(seconds=2.0)  # of the robot's clock
    finally:
        worker.stop()
    wall = time.monotonic() - w0
    assert wall < 1.2, wall  # 0.5 s at 4x; a real-time loop would take 2 s
    assert 60 <= loop.ticks <= 101
    assert worker.delay_ticks() >= 3  # 80 ms at 50 Hz is 4 ticks
    assert_all_sent_inside_envelope(robot)


def test_config_errors_are_clear():
    loop, worker, robot, *_ = build()
    with pytest.raises(ValueError, match="rate_hz"):
        ControlLoop(robot, worker.queue, loop.envelope, VirtualClock(), 0)
    with pytest.raises(ValueError, match="chunks"):
        worker.stage(FakePolicy(horizon=4, action_dim=4))


def test_a_reset_during_an_inference_does_not_delay_the_new_episodes_first_chunk():
    import time as _time
    from robots.base import Observation
    policy = FakePolicy(horizon=8, action_dim=4, value=0.3, sleep_s=0.15)
    queue = ActionQueue(4)
    worker = InferenceWorker(policy, queue, WallClock(), rate_hz=50.0, threaded=True).start()
    obs = Observation(images={}, state=np.zeros(4, np.float32), instruction="", timestamp=_time.time())
    try:
        assert worker.maybe_request(0, obs)          # episode 1's chunk is being inferred ...
        _time.sleep(0.05)
        queue.reset(1)
        worker.reset(1)                              # ... when the episode ends
        t0 = _time.monotonic()
        assert worker.maybe_request(10, obs)         # the new episode asks at once, not later
        assert not worker.maybe_request(11, obs)     # and only once
        while queue.remaining(12) == 0 and _time.monotonic() - t0 < 2.0:
            _time.sleep(0.005)
        # the stale chunk (0.1 s left) then the new one (0.15 s): no later request was needed
        assert queue.remaining(12) > 0 and policy.calls == 2
        assert worker.chunks_dropped == 1
    finally:
        worker.stop()


class _Teleoperated(PointMassRobot):
    """An operator holds the robot on sends ``takeover`` (a fixed command instead of the one
    given), as a teleoperation rig reports it."""

    def __init__(self, takeover, command, **kw):
        super().__init__(**kw)
        self.takeover, self.command = set(takeover), np.asarray(command, np.float32)

    def send_action(self, action):
        if self.sends + 1 in self.takeover:
            res = super().send_action(self.command)
            return dataclasses.replace(res, sent=self.command.copy(), operator=True)
        return super().send_action(action)


def test_operator_ticks_record_the_operators_command_and_what_was_observed():
    clock = VirtualClock()
    robot = _Teleoperated(takeover=range(10, 14), command=[0.5, -0.5, 0.0, 1.0], clock=clock)
    loop, worker, robot, ticks, _ = build(robot=robot, clock=clock)
    loop.run(max_ticks=20)
    ops = [t for t in ticks if t.operator]
    assert [t.tick for t in ops] == [9, 10, 11, 12] and loop.operator_ticks == 4
    for t in ops:
        assert np.allclose(worker.to_command(t.action), robot.command, atol=1e-6)
        assert t.observation is not None and not t.clamped
    assert all(t.observation is None for t in ticks if not t.operator)
    assert loop.stats()["operator_ticks"] == 4
    # the envelope's rate limit continues from what the robot actually did
    after = robot.sent[13]  # sends 10..13 were the operator's (sent[9..12])
    assert np.all(np.abs(after - robot.command) <= np.asarray(robot.describe().max_delta) + 1e-6)


def test_deadline_misses_are_timed_so_a_stall_can_be_traced_to_what_ran_then():
    clock = VirtualClock()

    class Stalls(PointMassRobot):
        def send_action(self, action):
            if len(self.sent) == 30:
                clock.advance(0.55)  # the tick overran by 5.5 periods (a GC pause, a fetch)
            return super().send_action(action)

    loop, *_ = build(robot=Stalls(clock=clock), clock=clock)
    loop.run(max_ticks=50)
    assert loop.deadline_misses >= 4
    misses = loop.stats()["recent_misses"]
    assert sum(n for _, n in misses) == loop.deadline_misses
    # all of them at the stall: tick 30 began at ~3.0 s (10 Hz, after the reset's period)
    assert all(3.0 <= t <= 3.0 + 0.55 + 2 / RATE for t, _ in misses)
