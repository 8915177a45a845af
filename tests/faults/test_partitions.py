"""Fault 1, network partitions: real ``tether robot`` processes (Meta-World, ONNX Runtime) stream
to a real ``tether learner`` through a TCP fault proxy that resets connections, drops new ones,
delays bytes and partitions the network (refused or black-holed) at random, seeded.

After healing and draining, every record each robot wrote to its spool (its spool's own
counter) is stored exactly once (the store, by (robot, episode, seq)), and no robot's control
loop stopped: an exit, a tick more than 1 s late by the loop's own clock, or a status file that
showed no new tick for 2 s counts as a stop (tests/faults/procs.py TickWatch).
"""
import time

import pytest

from tests.faults.procs import TASKS, Learner, RobotProc, TickWatch, per_robot, pretrained, stored_keys
from tests.faults.proxy import FaultProxy
from tests.faults.report import record, size

ROBOTS = size(2, 8)
CHAOS_S = size(10, 90)
MIN_CUTS = size(10, 100)


@pytest.mark.timeout(size(240, 900))
def test_partitions_lose_nothing_and_never_stop_the_robots(tmp_path):
    learner = Learner(tmp_path / "learner", pretrained()).start()
    proxy = FaultProxy(learner.port)
    artifact, key = learner.signed_v1()
    robots = [RobotProc(tmp_path / f"robot-{i}", f"robot-{i}", artifact, key, proxy.addr,
                        seed=100 + i, task=TASKS[i % len(TASKS)]) for i in range(ROBOTS)]
    watch = None
    try:
        for r in robots:
            r.start()
        for r in robots:
            r.wait_ticking()
        watch = TickWatch(robots).start()
        stats = proxy.chaos(CHAOS_S, seed=11, mean_gap_s=size(0.4, 0.6))
        deadline = time.monotonic() + 60
        while stats.cuts < MIN_CUTS and time.monotonic() < deadline:  # a quiet draw: top up
            proxy.cut(1)  # (counted in proxy.stats, which is stats)
            time.sleep(0.3)
        healed = watch.stop()  # the faults are over: stalls count up to here
        watch = None
        exits = {r.robot_id: r.stop(90) for r in robots}  # SIGTERM: drain through the proxy
    finally:
        if watch is not None:
            watch.stop()
        for r in robots:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.kill()
        proxy.close()
        learner.stop()
    stored = per_robot(stored_keys(learner.data))
    sent = lost = duplicated = quarantined = dropped = 0
    differ = {}
    for r in robots:
        state, status = r.spool_state(), r.status()
        written, (have, extra) = int(state["records_spooled"]), stored.get(r.robot_id, (0, 0))
        sent += written
        lost += max(0, written - have)
        if have != written:
            differ[r.robot_id] = (written, have)
        duplicated += extra
        quarantined += int(state["records_quarantined"])
        dropped += int(status.get("records_dropped", 0))
    stops = healed["robot_stops"] + sum(code != 0 for code in exits.values())
    record("partition", injected=stats.injected, sent=sent, stored=sum(h for h, _ in stored.values()),
           lost=lost, duplicated=duplicated, robot_stops=stops, robots=ROBOTS,
           cuts=stats.cuts, reply_cuts=stats.reply_cuts, drops=stats.drops, delays=stats.delays, partitions=stats.partitions,
           partition_s=round(stats.partition_s, 1), chaos_s=CHAOS_S,
           max_tick_late_ms=healed["max_tick_late_ms"], max_status_gap_s=healed["max_status_gap_s"],
           deadline_misses=healed["deadline_misses"],
           resends_deduplicated=learner.duplicates_dropped())
    assert stats.cuts >= MIN_CUTS and stats.partitions >= 1, stats
    assert learner.duplicates_dropped() > 0, "no resend reached the learner: the faults missed"
    assert sent > 0 and lost == 0 and duplicated == 0 and not differ, (sent, duplicated, differ)
    assert quarantined == 0 and dropped == 0, (quarantined, dropped)
    assert all(r.pending_batches() == 0 for r in robots), "a spool was not drained after healing"
    assert set(stored) <= {r.robot_id for r in robots}
    assert exits == {r.robot_id: 0 for r in robots}, (exits, robots[0].log_tail())
    assert healed["robot_stops"] == 0, healed
