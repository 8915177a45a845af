"""Fault 2, learner crash: kill -9 a training ``tether learner`` under load at random moments
(seeded) and restart it on the same port and data directory.

Load: client processes (tests/faults/procs.py), each a few simulated robots with a real spool
and ``ExperienceClient``, streaming episodes the model trains on; a batch counts as acknowledged
only once its keys are in the client's fsynced ``acked.log``. After every kill the store (opened
as a restart would) must hold every acknowledged record exactly once, the registry's latest
version must not have gone back, and at the end every record any client spooled is stored
exactly once. The trainer must resume (``resumed at version`` when a checkpoint existed) and
keep training after restarts (``updates.jsonl`` grows); a subscriber that reconnects across
restarts must never see the announced version decrease.
"""
import random
import time

import pytest

from tests.faults.procs import Clients, Learner, VersionWatch, acked_keys, per_robot, pretrained, stored_keys
from tests.faults.report import record, size

KILLS = size(3, 20)
GAP_S = size((1.5, 3.0), (2.0, 6.0))  # time the learner runs between restart and kill
ROBOTS = size(4, 8)
TRAIN = ("--publish-interval", "1.0", "--min-episodes", "1", "--staleness", "1000000")


def _updates(learner: Learner) -> int:
    path = learner.data / "updates.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.timeout(size(240, 1500))
def test_kill_9_the_training_learner_loses_nothing_acknowledged(tmp_path):
    rng = random.Random(3)
    learner = Learner(tmp_path / "learner", pretrained(), train=True, extra=TRAIN).start()
    robots = [f"load-{i}" for i in range(ROBOTS)]
    clients = Clients(tmp_path / "clients", learner.addr, robots, processes=2, per_batch=10,
                      interval_s=0.1, episode_records=20)
    watch = VersionWatch(learner.addr).start()
    latest, checked, resumable, updates_at_kill = [learner.registry_latest()], [], 0, []
    lost_at_kills = duplicated_at_kills = 0
    try:
        for _ in range(KILLS):
            time.sleep(rng.uniform(*GAP_S))
            learner.kill9()
            stored = stored_keys(learner.data)
            acked = set().union(*(acked_keys(clients.root, r) for r in robots))
            lost_at_kills += len(acked - set(stored))
            duplicated_at_kills += sum(n - 1 for n in stored.values())
            checked.append(len(acked))
            latest.append(learner.registry_latest())
            resumable += latest[-1] > 1  # a published checkpoint with trainer state exists
            updates_at_kill.append(_updates(learner))
            learner.start()
        results = clients.finish(drain_s=60)
        deadline = time.monotonic() + size(30, 60)  # training after the last restart
        while _updates(learner) <= updates_at_kill[-1] and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        clients.kill()
        watch.stop()
        learner.stop()
    log = learner.log_text()
    stored = stored_keys(learner.data)
    counts = per_robot(stored)
    acked = set().union(*(acked_keys(clients.root, r) for r in robots))
    sent = sum(r["spooled"] for r in results)
    lost_acked = len(acked - set(stored))
    lost = sent - sum(counts.get(r, (0, 0))[0] for r in robots)
    duplicated = sum(extra for _, extra in counts.values())
    resumed = log.count("resumed at version")
    record("learner_crash", injected=KILLS, sent=sent, stored=sum(stored.values()),
           lost=max(lost, lost_acked, lost_at_kills), duplicated=max(duplicated, duplicated_at_kills),
           robot_stops=0, acked=len(acked), acked_at_kills=checked, registry_latest=latest,
           versions_announced=len(watch.seen), version_max=max(watch.seen, default=0),
           subscribe_calls=watch.connects, resumed=resumed,
           updates=_updates(learner), updates_at_kills=updates_at_kill,
           learner_starts=learner.starts, robots=ROBOTS)
    assert lost_at_kills == 0, f"{lost_at_kills} acknowledged records missing right after kills"
    assert duplicated_at_kills == 0, "a record was stored twice"
    assert all(r["drained"] and r["quarantined"] == 0 for r in results), results
    assert lost == lost_acked == 0 and duplicated == 0, (lost, lost_acked, duplicated)
    assert len(acked) == sent, "the drain left records unacknowledged"
    assert checked == sorted(checked) and checked[-1] > 0, f"acks did not progress: {checked}"
    assert latest == sorted(latest), f"the registry's latest version went back: {latest}"
    assert not watch.decreases(), f"announced versions went back: {watch.seen}"
    assert resumed >= resumable, f"{resumed} resumes logged, {resumable} restarts had a checkpoint"
    assert resumable >= 1 and _updates(learner) > updates_at_kill[-1], \
        f"the trainer did not train after restarts: updates {updates_at_kill} -> {_updates(learner)}"
    assert "Traceback" not in log, log[log.index("Traceback"):][:3000]
