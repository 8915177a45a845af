"""Fault 3, robot crash: kill -9 a ``tether robot`` process mid-episode and restart it with the same
robot id, spool and status file: its spool is replayed, and every record it ever wrote to its
spool is stored exactly once.

To make sure each kill leaves unacknowledged batches behind (else there is nothing to replay),
the learner is frozen (SIGSTOP) for a moment before the kill: batches pile up in the spool, some
of them sent and even stored but not acknowledged. The learner resumes (SIGCONT) after the kill.
"""
import random
import signal
import time

import pytest

from tests.faults.procs import TASKS, Learner, RobotProc, per_robot, pretrained, stored_keys
from tests.faults.report import record, size

ROBOTS = size(1, 4)
KILLS_PER_ROBOT = size(2, 5)


@pytest.mark.timeout(size(240, 1200))
def test_kill_9_a_robot_mid_episode_replays_its_spool(tmp_path):
    rng = random.Random(9)
    learner = Learner(tmp_path / "learner", pretrained()).start()
    artifact, key = learner.signed_v1()
    robots = [RobotProc(tmp_path / f"robot-{i}", f"robot-{i}", artifact, key, learner.addr,
                        seed=200 + i, task=TASKS[i % len(TASKS)]) for i in range(ROBOTS)]
    left_pending, mid_episode, exits = [], 0, {}
    try:
        for r in robots:
            r.start()
        for r in robots:
            r.wait_ticking()
        for k in range(ROBOTS * KILLS_PER_ROBOT):
            victim = robots[k % ROBOTS]
            time.sleep(rng.uniform(0.5, 2.0))
            learner.proc.send_signal(signal.SIGSTOP)  # acks stop: the spool fills
            time.sleep(rng.uniform(1.5, 2.5))
            status = victim.status()
            mid_episode += int(status.get("queue_depth", 0) > 0)
            victim.kill9()
            learner.proc.send_signal(signal.SIGCONT)
            left_pending.append(victim.pending_batches())
            victim.start()
            victim.wait_ticking()
        exits = {r.robot_id: r.stop(90) for r in robots}
    finally:
        if learner.proc.poll() is None:
            learner.proc.send_signal(signal.SIGCONT)
        for r in robots:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.kill()
        learner.stop()
    stored = per_robot(stored_keys(learner.data))
    sent = lost = duplicated = 0
    differ = {}
    for r in robots:
        written, (have, extra) = int(r.spool_state()["records_spooled"]), stored.get(r.robot_id, (0, 0))
        sent, lost, duplicated = sent + written, lost + max(0, written - have), duplicated + extra
        if have != written:
            differ[r.robot_id] = (written, have)
    record("robot_crash", injected=len(left_pending), sent=sent,
           stored=sum(h + e for h, e in stored.values()), lost=lost, duplicated=duplicated,
           robot_stops=sum(code != 0 for code in exits.values()), robots=ROBOTS,
           batches_pending_at_kills=left_pending, killed_mid_episode=mid_episode,
           resends_deduplicated=learner.duplicates_dropped())
    assert sum(left_pending) > 0, "no kill left a batch in a spool: nothing was replayed"
    assert sent > 0 and lost == 0 and duplicated == 0 and not differ, (sent, duplicated, differ)
    assert all(r.pending_batches() == 0 for r in robots), "a spool was not drained"
    assert all(int(r.spool_state()["records_quarantined"]) == 0 for r in robots)
    assert exits == {r.robot_id: 0 for r in robots}, exits
