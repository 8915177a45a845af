"""runtime/priority.py: the control loop's thread under SCHED_FIFO, only it, and a clear reason
when the machine does not allow it."""
import os
import threading

import pytest

from runtime import priority
from runtime.priority import normal_thread, realtime_thread, thread_policy


def _in_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_priority_out_of_range_is_refused():
    with pytest.raises(ValueError, match="1..99"):
        realtime_thread(0)
    with pytest.raises(ValueError, match="1..99"):
        realtime_thread(100)


def test_not_permitted_says_what_is_needed(monkeypatch):
    def refuse(*_):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(priority.os, "sched_setscheduler", refuse)
    why = realtime_thread(40)
    assert "not permitted" in why and "CAP_SYS_NICE" in why and "40" in why


def test_only_the_calling_thread_becomes_real_time():
    if _in_thread(lambda: realtime_thread(25)) is not None:
        pytest.skip("this machine does not allow SCHED_FIFO (needs root, CAP_SYS_NICE or "
                    "ulimit -r); the refusal is covered above")

    def body():
        assert realtime_thread(25) is None
        mine = thread_policy()
        child = _in_thread(thread_policy)  # started by a real-time thread
        normal_thread()
        return mine, child, thread_policy()
    mine, child, after = _in_thread(body)
    assert mine == ("SCHED_FIFO", 25)
    assert child == ("SCHED_OTHER", 0)  # SCHED_RESET_ON_FORK: what it starts stays normal
    assert after == ("SCHED_OTHER", 0)
    assert thread_policy() == ("SCHED_OTHER", 0)  # the test's own thread never changed
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
