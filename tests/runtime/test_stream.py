"""The experience stream over real gRPC on loopback against a controllable learner double:
streaming (StreamExperience, a window of batches in flight) and the PushExperience fallback."""
import logging
import queue
import threading
import time

import grpc
import pytest

from runtime.spool import CORRUPT, Spool
from runtime.stream import Backoff, ExperienceClient
from tether.wire import tether_pb2 as pb

from tests.runtime.learner_double import LearnerDouble, serve


class StreamingDouble(LearnerDouble):
    """Adds StreamExperience with the double's injections: ``fail_first`` refuses whole calls,
    ``invalid_batches`` end a stream at that batch (named in the trailer, as the learner does).
    It reads ahead of its acks (``ack_delay_s`` each) so the client's window is what limits
    the batches in flight; ``stall_streams`` calls read but never ack."""

    def __init__(self):
        super().__init__()
        self.stream_calls = 0
        self.ack_delay_s = 0.0
        self.stall_streams = 0
        self.max_unacked = 0

    def StreamExperience(self, request_iterator, context):
        with self._cond:
            self.stream_calls += 1
            if self.fail_first > 0:
                self.fail_first -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "learner double: injected outage")
            stall = self.stall_streams > 0
            self.stall_streams -= stall
        received: queue.Queue = queue.Queue()
        unacked = [0]

        def read():
            try:
                for batch in request_iterator:
                    with self._cond:
                        unacked[0] += 1
                        self.max_unacked = max(self.max_unacked, unacked[0])
                    received.put(batch)
            except Exception:  # cancelled
                pass
            received.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            batch = received.get()
            if batch is None or stall:
                if stall:
                    time.sleep(5)
                return
            if batch.batch_seq in self.invalid_batches:
                context.set_trailing_metadata((("tether-batch-seq", str(batch.batch_seq)),))
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "learner double: poison batch")
            time.sleep(self.ack_delay_s)
            with self._cond:
                unacked[0] -= 1
            yield self.PushExperience(batch, context)


@pytest.fixture(params=["stream", "push"])
def learner(request):
    double = StreamingDouble() if request.param == "stream" else LearnerDouble()
    server, port = serve(double)
    yield double, f"127.0.0.1:{port}"
    server.stop(0)


def _fill(spool, batches, per_batch=2):
    for i in range(batches):
        spool.append([pb.ChunkRecord(robot_id=spool.robot_id, episode_id=f"e{i}",
                                     seq=spool.next_record_seq()) for _ in range(per_batch)])


def test_delivers_every_batch_in_order_despite_failures(tmp_path, learner):
    double, addr = learner
    double.fail_first = 3
    spool = Spool(tmp_path, "r1")
    _fill(spool, 5)
    client = ExperienceClient(addr, spool, "r1", backoff_cap_s=0.1).start()
    try:
        assert client.drain(10.0)
        _fill(spool, 2)  # batches spooled while the client runs go out too
        assert client.drain(10.0)
    finally:
        client.stop()
    assert [b.batch_seq for b in double.batches] == list(range(1, 8))  # each exactly once
    if isinstance(double, StreamingDouble):
        assert client.transport == "stream" and double.stream_calls >= 4
    else:  # the learner double has no StreamExperience: the client fell back to pushes
        assert client.transport == "push" and double.push_calls == 7 + 3
    assert client.batches_acked == 7 and client.errors == 3
    assert "UNAVAILABLE" in client.last_error
    assert spool.pending() == 0 and spool.records_acked == 14
    assert not list(tmp_path.glob("b*.pb"))
    assert 0 < client.ack_latency_p50_s <= client.ack_latency_p99_s < 5


def test_invalid_argument_quarantines_the_poison_batch(tmp_path, learner, caplog):
    double, addr = learner
    double.invalid_batches = {2}
    spool = Spool(tmp_path, "r1")
    _fill(spool, 3)
    client = ExperienceClient(addr, spool, "r1").start()
    with caplog.at_level(logging.ERROR):
        assert client.drain(10.0)
    client.stop()
    assert [b.batch_seq for b in double.batches] == [1, 3]
    assert len(list((tmp_path / CORRUPT).glob("b000000000002-*.pb"))) == 1
    assert client.batches_quarantined == 1 and "refused by the learner" in caplog.text


def test_resends_are_deduplicated_by_the_learner(tmp_path, learner):
    double, addr = learner
    spool = Spool(tmp_path, "r1")
    _fill(spool, 1)
    [(seq, batch)] = spool.peek(1)
    double.PushExperience(batch, None)  # as if an earlier send landed but its Ack was lost
    client = ExperienceClient(addr, spool, "r1").start()
    assert client.drain(10.0)
    client.stop()
    assert client.records_duplicate == 2 and client.records_stored == 0


def test_outage_keeps_data_and_stop_drain_behave(tmp_path):
    spool = Spool(tmp_path, "r1")
    _fill(spool, 2)
    # nothing listens on this port: every send fails, nothing may be lost
    client = ExperienceClient("127.0.0.1:1", spool, "r1", rpc_timeout_s=0.5,
                              backoff_cap_s=0.05).start()
    assert not client.drain(0.5)
    t0 = time.monotonic()
    client.stop()
    assert time.monotonic() - t0 < 2.0
    assert client.errors >= 1 and spool.pending() == 4
    # a restarted robot picks the same batches up and delivers them
    double = LearnerDouble()
    server, port = serve(double)
    try:
        client = ExperienceClient(f"127.0.0.1:{port}", Spool(tmp_path, "r1"), "r1").start()
        assert client.drain(10.0)
        client.stop()
    finally:
        server.stop(0)
    assert [b.batch_seq for b in double.batches] == [1, 2]


def test_refuses_a_foreign_spool(tmp_path):
    with pytest.raises(ValueError, match="its own experience"):
        ExperienceClient("127.0.0.1:1", Spool(tmp_path, "r1"), "r2")


def test_backoff_is_capped_and_jittered():
    b = Backoff(base_s=0.05, cap_s=2.0)
    delays = [b.next_delay() for _ in range(12)]
    assert all(0.025 <= d <= 2.0 for d in delays)
    assert max(delays[-4:]) > 1.0 and len(set(delays)) == len(delays)
    b.reset()
    assert b.next_delay() <= 0.05


def test_stream_keeps_a_window_of_batches_in_flight(tmp_path):
    double = StreamingDouble()
    double.ack_delay_s = 0.03
    server, port = serve(double)
    spool = Spool(tmp_path, "r1")
    _fill(spool, 12)
    client = ExperienceClient(f"127.0.0.1:{port}", spool, "r1", window=4).start()
    try:
        assert client.drain(10.0)
    finally:
        client.stop()
        server.stop(0)
    assert [b.batch_seq for b in double.batches] == list(range(1, 13))
    assert double.max_unacked == 4  # the window is used, and never exceeded
    assert double.stream_calls == 1 and client.transport == "stream"
    assert client.batches_sent == client.batches_acked == 12


def test_stream_without_acks_times_out_and_resends(tmp_path):
    double = StreamingDouble()
    double.stall_streams = 1  # the first stream reads everything and acknowledges nothing
    server, port = serve(double)
    spool = Spool(tmp_path, "r1")
    _fill(spool, 3)
    client = ExperienceClient(f"127.0.0.1:{port}", spool, "r1", rpc_timeout_s=0.5,
                              backoff_cap_s=0.05).start()
    try:
        assert client.drain(10.0)
    finally:
        client.stop()
        server.stop(0)
    assert "no ack for batch 1" in client.last_error and client.errors == 1
    assert [b.batch_seq for b in double.batches] == [1, 2, 3]
    assert spool.pending() == 0 and client.batches_sent == 6  # every batch went out twice
