"""Real-time scheduling for the control loop's thread.

On a robot the control loop must get its core when its tick is due, whatever else the machine
does (fetching and loading a new version, inference, logging, other processes). Linux offers
that with SCHED_FIFO: a thread under it preempts every normal thread. ``realtime_thread`` puts
the calling thread (only it: SCHED_RESET_ON_FORK keeps the threads and processes it starts
later normal) under SCHED_FIFO. It needs root, CAP_SYS_NICE or an RLIMIT_RTPRIO at least the
priority asked (``ulimit -r``; /etc/security/limits.conf ``@robot - rtprio 80``); without them it
says why and the loop runs as a normal thread. The kernel's RT throttling
(``/proc/sys/kernel/sched_rt_runtime_us``) keeps a share of each core for everything else.
"""
from __future__ import annotations

import contextlib
import os

MAX_PRIORITY = 99


def realtime_thread(priority: int) -> str | None:
    """SCHED_FIFO at ``priority`` (1..99) for the calling thread; None when done, else why not."""
    if not 1 <= priority <= MAX_PRIORITY:
        raise ValueError(f"real-time priority must be in 1..{MAX_PRIORITY}, got {priority}")
    fifo = getattr(os, "SCHED_FIFO", None)
    if fifo is None or not hasattr(os, "sched_setscheduler"):
        return "SCHED_FIFO is not available on this platform (Linux only)"
    try:
        # pid 0 is the calling thread on Linux; the flag keeps what it starts later normal
        os.sched_setscheduler(0, fifo | getattr(os, "SCHED_RESET_ON_FORK", 0),
                              os.sched_param(priority))
    except PermissionError:
        return (f"not permitted to use SCHED_FIFO {priority}: needs root, CAP_SYS_NICE or an "
                f"RLIMIT_RTPRIO >= {priority} (ulimit -r)")
    except OSError as e:
        return f"sched_setscheduler(SCHED_FIFO, {priority}) failed: {e}"
    return None


INFERENCE_BELOW_LOOP = 10


def worker_rt_priority(loop_priority: int | None) -> int | None:
    """The inference thread's SCHED_FIFO priority for a control loop at ``loop_priority``: below
    it, so a tick always preempts inference, and above every normal thread."""
    return max(1, loop_priority - INFERENCE_BELOW_LOOP) if loop_priority else None


def normal_thread() -> None:
    """Back to SCHED_OTHER for the calling thread (lowering needs no privilege)."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_OTHER"):
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


@contextlib.contextmanager
def realtime(priority: int | None):
    """Run the block on the calling thread under SCHED_FIFO ``priority`` (None or 0: as it is);
    yields (why it was refused or None, the thread's (policy, priority)). The thread is normal
    again after the block."""
    why = realtime_thread(priority) if priority else None
    sched = thread_policy()
    try:
        yield why, sched
    finally:
        if sched[0] == "SCHED_FIFO":
            normal_thread()


def thread_policy() -> tuple[str, int]:
    """(policy name, priority) of the calling thread, for status reports."""
    if not hasattr(os, "sched_getscheduler"):
        return "unknown", 0
    policy = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_FIFO", "SCHED_RR", "SCHED_BATCH",
                                         "SCHED_IDLE") if hasattr(os, n)}
    return names.get(policy, str(policy)), os.sched_getparam(0).sched_priority
