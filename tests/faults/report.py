"""Rows of the fault-injection report (``make faults`` -> ``faults.json``).

Each fault test calls :func:`record` once with what it injected and counted; the rows go to a
JSON-lines file so that tests in separate processes (pytest-xdist, reruns) can all add theirs,
and ``python -m tests.faults.collect`` folds them into ``faults.json`` (one row per fault kind,
the latest run of each). ``TETHER_FAULTS`` = ``full`` selects the sizes the issue asks for
(100 cuts, 20 kills, 10,000 messages, 64 streams for 10 minutes); anything else runs the small
sizes that fit the CI suite.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

FIELDS = ("fault", "injected", "sent", "stored", "lost", "duplicated", "robot_stops")
FULL = os.environ.get("TETHER_FAULTS", "") == "full"


def size(ci: int | float, full: int | float):
    """The CI size or, under ``TETHER_FAULTS=full``, the full one."""
    return full if FULL else ci


def rows_path() -> pathlib.Path:
    return pathlib.Path(os.environ.get("TETHER_FAULTS_DIR", "runs/faults")) / "rows.jsonl"


def record(fault: str, *, injected: int, sent: int, stored: int, lost: int, duplicated: int,
           robot_stops: int, **extra) -> dict:
    """Append one row (``extra``: anything else worth reporting, e.g. ack_p99_ms, rss_mb)."""
    row = dict(fault=fault, injected=int(injected), sent=int(sent), stored=int(stored),
               lost=int(lost), duplicated=int(duplicated), robot_stops=int(robot_stops),
               scale="full" if FULL else "ci", time=round(time.time(), 3), **extra)
    path = rows_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return row
