"""End to end: a real learner process and two real robot processes on loopback.

The robots run ONNX Runtime inference at their control rate, stream experience over gRPC, and
swap in the versions the learner trains and publishes. The run must lose nothing: every
transition a robot recorded is acknowledged and stored exactly once. The robots' clocks run at
twice the wall's pace (``--sim-speed 2``), as a simulated fleet may.
"""
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


# a cold cache pretrains first (~70 s alone on 2 cores; several minutes on a loaded machine)
@pytest.mark.timeout(900)
def test_fleet_learns_and_loses_nothing(tmp_path):
    out = tmp_path / "fleet"
    # a status file an earlier fleet left in this folder does not count in this run's samples
    stale = out / "robots" / "robot-0" / "status.json"
    stale.parent.mkdir(parents=True)
    stale.write_text(json.dumps({"robot_id": "robot-0", "episodes": 100_000, "successes": 0}))
    cmd = [sys.executable, "-m", "tether.cli", "fleet", "--robots", "2", "--minutes", "1",
           "--publish-interval", "12", "--out", str(out), "--supervision", "0.5",
           "--sim-speed", "2",
           "--cache-dir", str(REPO / ".tether-cache" / "pretrained")]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=840)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["robots"] == 2 and 0 < s["episodes"] < 100_000
    assert all(sample[1] < 100_000 for sample in s["samples"])
    # per task (two robots on two of the default tasks), adding up to the fleet's samples
    per_task = s["task_samples"]
    assert set(per_task) == set(s["tasks"]) and len(s["tasks"]) == 3
    last = [rows[-1] for rows in per_task.values()]
    assert [sum(r[1] for r in last), sum(r[2] for r in last)] == s["samples"][-1][1:]
    assert s["transitions_sent"] > 0
    assert s["transitions_sent"] == s["transitions_acked"] == s["transitions_stored"]
    assert s["duplicates_dropped"] >= 0
    assert s["versions_published"] >= 2
    assert s["versions_deployed_min"] >= 2, s["per_robot"]
    assert s["swap_stall_ticks"] == 0
    assert s["control"]["ticks"] > 0 and s["verifier"]["chunks_checked"] > 0
    # 2 robots x 60 s of wall time at 25 Hz is 3,000 ticks in real time; at 2x up to 6,000
    assert s["sim_speed"] == 2.0 and s["control"]["ticks"] > 3_900, s["control"]
    assert set(s["success_rate_by_version"]) >= {"1"}
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "learner: stored" in r.stdout  # live progress was shown
    # over mutual TLS by default: a fresh CA and one certificate (key 0600) per robot
    assert (out / "certs" / "robot-1" / "key.pem").stat().st_mode & 0o077 == 0
    assert "plaintext" not in (out / "learner.log").read_text()
    # a simulated operator watched about half the episodes and took over stalled ones: its
    # commands reached the store as human interventions and the trainer imitated them
    assert s["supervised_episodes"] > 0 and s["interventions"] > 0
    assert s["control"]["operator_ticks"] > 0
    from learner.store import ExperienceStore
    store = ExperienceStore(out / "learner" / "experience", readonly=True)
    try:
        flags = [x for t in store.scan(["human_intervention"])
                 for x in t.column("human_intervention").to_pylist()]
    finally:
        store.close()
    assert 0 < sum(flags) < len(flags)
