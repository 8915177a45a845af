"""Fault 7, load: many simulated robot streams against one training ``tether learner``.

Client processes (tests/faults/procs.py) run one real spool and ``ExperienceClient`` per robot,
each streaming episodes of model-shaped records (one 48x48 camera: ~7 KB a record) at about
16 records a second, i.e. a robot executing a chunk every few ticks at a generous rate. The
learner's resident memory is sampled from /proc twice a second: it must stay bounded (no growth
worth the name over the second half of the run). Afterwards every record each client spooled
(and every one it logged as acknowledged) is stored exactly once. Reported: ack latency p50/p99
(send to ack, the client's own clock), max RSS and its growth over the second half, and
acknowledged transitions a second.
"""
import threading
import time

import numpy as np
import pytest

from tests.faults.procs import Clients, Learner, acked_keys, per_robot, pretrained, rss_mb, stored_keys
from tests.faults.report import record, size

STREAMS = size(16, 64)
SECONDS = size(15, 600)
PROCESSES = size(2, 8)
TRAIN = ("--publish-interval", "10", "--min-episodes", "1", "--staleness", "1000000")


@pytest.mark.timeout(size(240, 1200))
def test_many_streams_bounded_memory_no_loss(tmp_path):
    learner = Learner(tmp_path / "learner", pretrained(), train=True, extra=TRAIN).start()
    robots = [f"load-{i:02d}" for i in range(STREAMS)]
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample_rss():
        while not stop.wait(0.5):
            mb = rss_mb(learner.proc.pid)
            if mb is not None:
                samples.append((time.monotonic(), mb))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    clients = None
    try:
        clients = Clients(tmp_path / "clients", learner.addr, robots, processes=PROCESSES,
                          per_batch=8, interval_s=0.5, episode_records=40)
        t0 = time.monotonic()
        sampler.start()
        time.sleep(SECONDS)
        stop.set()
        elapsed = time.monotonic() - t0
        results = clients.finish(drain_s=120)
        assert learner.proc.poll() is None, "the learner died under load"
    finally:
        stop.set()
        if clients is not None:
            clients.kill()
        learner.stop()
    stored = stored_keys(learner.data)
    counts = per_robot(stored)
    sent = sum(r["spooled"] for r in results)
    acked = set().union(*(acked_keys(clients.root, r) for r in robots))
    lost = max(sent - sum(counts.get(r, (0, 0))[0] for r in robots), len(acked - set(stored)))
    duplicated = sum(extra for _, extra in counts.values())
    latencies = np.concatenate([np.asarray(r["latencies_ms"], float) for r in results])
    half = t0 + elapsed / 2
    first = [mb for t, mb in samples if t < half]
    second = [mb for t, mb in samples if t >= half]
    growth = second[-1] - second[0] if len(second) > 1 else 0.0
    rss_max = max(mb for _, mb in samples)
    row = record("load", injected=STREAMS, sent=sent, stored=sum(stored.values()), lost=lost,
                 duplicated=duplicated, robot_stops=0, streams=STREAMS, seconds=round(elapsed, 1),
                 ack_p50_ms=round(float(np.percentile(latencies, 50)), 2),
                 ack_p99_ms=round(float(np.percentile(latencies, 99)), 2),
                 rss_max_mb=round(rss_max, 1), rss_first_half_max_mb=round(max(first), 1),
                 rss_growth_second_half_mb=round(growth, 1),
                 transitions_per_s=round(len(acked) / elapsed, 1),
                 client_errors=sum(r["errors"] for r in results))
    assert all(r["drained"] and r["quarantined"] == 0 for r in results), results
    assert sent > 0 and lost == 0 and duplicated == 0, row
    assert len(acked) == sent
    # bounded: the second half adds at most a fifth of what the first half reached (and a few
    # MB of allocator noise); a leak per batch or per record grows with the run instead
    assert growth <= max(32.0, 0.2 * max(first)), row
