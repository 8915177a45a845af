"""The fetch process of its own (runtime/fetch_process.py): its priority, its life with the
subscriber's, and a child killed in the middle of a fetch. What it fetches, refuses and abandons
is tested in tests/runtime/test_weights.py, every test of which runs through it too."""
import os
import pathlib
import signal
import sys
import time

import pytest

from runtime.artifact import POLICY_DATA, verify_artifact
from runtime.fetch_process import IDLE, ChannelSpec, FetchProcess
from runtime.signature import Trust
from runtime.tls import TlsError
from runtime.weights import WeightSubscriber

from tests.doubles import public_key_for_tests
from tests.runtime.test_weights import Installed, artifacts, learner  # noqa: F401  (fixtures)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"),
                           reason="scheduling policies and /proc are Linux's")


def _subscriber(addr, tmp_path, installed, priority=IDLE):
    return WeightSubscriber(addr, "r1", tmp_path / "staging", installed, backoff_cap_s=0.1,
                            trust=Trust.load([public_key_for_tests()]),
                            fetch_process=ChannelSpec(addr), fetch_priority=priority).start()


def _threads(pid: int) -> list[int]:
    return [int(t.name) for t in pathlib.Path(f"/proc/{pid}/task").iterdir()]


@linux
def test_every_thread_of_the_fetch_process_is_idle_and_it_ends_with_the_subscriber(
        tmp_path, learner, artifacts):  # noqa: F811
    double, addr = learner
    double.publish(1, artifacts[1])
    sub = _subscriber(addr, tmp_path, Installed())
    try:
        assert sub.wait_for_version(1, 20.0)
        pid = sub.fetcher.pid
        assert pid != os.getpid()
        tids = _threads(pid)
        assert len(tids) > 1  # the reader and gRPC's own threads, started after the switch
        assert {os.sched_getscheduler(t) for t in tids} == {os.SCHED_IDLE}
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the robot's process is untouched
        assert sub.status()["fetch_in"] == f"process {pid} at priority idle (started 1 times)"
    finally:
        sub.stop()
    assert not pathlib.Path(f"/proc/{pid}").exists()
    assert sub.status()["fetch_in"] == "a process (stopped) at priority idle (started 1 times)"


def _connected(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds an established TCP connection to ``port``."""
    inodes = set()
    for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[2].rsplit(":", 1)[1], 16) == port and f[3] == "01" and f[9] in inodes:
                return True
    return False


@linux
def test_the_fetch_process_connects_before_any_version_is_announced(tmp_path, learner):  # noqa: F811
    """A version's fetch must not be the one that waits for the connection (and TLS handshake):
    under SCHED_IDLE on a busy computer that took ~0.5 s of the first rollout."""
    double, addr = learner  # nothing published: there is nothing to fetch
    port = int(addr.rsplit(":", 1)[1])
    sub = _subscriber(addr, tmp_path, Installed())
    try:
        deadline = time.monotonic() + 10.0
        while not _connected(sub.fetcher.pid, port):
            assert time.monotonic() < deadline, "the fetch process did not connect by itself"
            time.sleep(0.05)
    finally:
        sub.stop()


@linux
def test_a_nice_increment_instead(tmp_path, learner, artifacts):  # noqa: F811
    double, addr = learner
    double.publish(1, artifacts[1])
    sub = _subscriber(addr, tmp_path, Installed(), priority=7)
    try:
        assert sub.wait_for_version(1, 20.0)
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in _threads(sub.fetcher.pid)} == \
            {min(19, mine + 7)}
    finally:
        sub.stop()


def test_a_killed_fetch_process_is_started_again_and_the_fetch_resumes(tmp_path, learner,
                                                                         artifacts):  # noqa: F811
    double, addr = learner
    double.chunk_bytes, double.chunk_delay_s = 16 * 1024, 0.01
    double.publish(1, artifacts[1])
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed)
    partial = tmp_path / "staging" / "v1.partial" / POLICY_DATA
    try:
        for _ in range(1000):  # until part of the big file is on disk
            if partial.exists() and partial.stat().st_size > 100_000:
                break
            sub.wait_for_version(99, 0.01)
        first = sub.fetcher.pid
        os.kill(first, signal.SIGKILL)
        assert sub.wait_for_version(1, 30.0), list(sub.events)
        assert sub.fetcher.pid != first and sub.fetcher.starts == 2
    finally:
        sub.stop()
    assert installed.versions == [1] and sub.refused == 0
    assert any("fetch process died" in e for e in sub.events)
    resumed = [o for _, n, o in double.fetches if n == POLICY_DATA]
    assert resumed[0] == 0 and resumed[-1] > 100_000 and sub.resumed_bytes > 100_000
    assert verify_artifact(tmp_path / "staging" / "v1").version == 1


def test_a_fetch_process_that_keeps_dying_refuses_the_version(tmp_path):
    """A child that cannot even start (here: its Python is missing a module) is not started
    forever: after MAX_DEATHS tries the version is refused, saying why."""
    from runtime.fetch import Refused
    from tether.wire import tether_pb2 as pb
    events = []
    proc = FetchProcess(ChannelSpec("127.0.0.1:1"), tmp_path, Trust(), rpc_timeout_s=1.0,
                        backoff_cap_s=0.1, superseded=lambda v: False,
                        event=lambda m, level=0: events.append(m))
    proc._config["priority"] = "not a priority"  # the child's int() raises before it replies
    with pytest.raises(Refused, match="died 3 times"):
        proc.fetch(None, pb.VersionAnnouncement(version=4))
    assert proc.starts == 3 and sum("died" in e for e in events) == 2
    proc.close()


def test_channel_spec_reads_its_tls_files_when_asked_for_a_factory(tmp_path):
    with pytest.raises(TlsError, match="learner_ca"):
        ChannelSpec("127.0.0.1:1", tls_ca=str(tmp_path / "missing.pem")).channel_factory()
    with pytest.raises(TlsError, match="needs key"):
        ChannelSpec("127.0.0.1:1", tls_cert=str(tmp_path / "c.pem")).channel_factory()


def test_lowering_the_priority_of_a_process_says_what_it_got():
    """Run in a child so this test's process keeps its own priority."""
    import subprocess
    code = ("from runtime.fetch_process import lower_process_priority as f; import os; "
            "print(f('idle')); print(f(3))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    if sys.platform.startswith("linux"):
        assert out[0] == "SCHED_IDLE"
    assert out[1].startswith("nice ")
