"""The ROS 2 node on the cyclonedds transport against a separate process that plays the robot
over DDS on loopback: joint states and images in, trajectories out. Checks command timing, hold
on stale and out-of-sync data, diagnostics and lifecycle transitions."""
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("cyclonedds", reason="the DDS transport needs cyclonedds: pip install "
                                         "'tether[dds]'")

from robots.description import load_description  # noqa: E402
from runtime.ros.transport_dds import LOOPBACK_URI  # noqa: E402
from tests.ros.helpers import HOME, export_arm7_artifact  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOMAIN = 100 + os.getpid() % 100   # a domain of our own per test run


@pytest.fixture(scope="module")
def loopback():
    old = os.environ.get("CYCLONEDDS_URI")
    os.environ["CYCLONEDDS_URI"] = LOOPBACK_URI  # read when the first participant is made
    yield
    if old is None:
        os.environ.pop("CYCLONEDDS_URI", None)
    else:
        os.environ["CYCLONEDDS_URI"] = old


class Arm:
    def __init__(self, tmp_path):
        self.log = tmp_path / "arm.jsonl"
        env = {**os.environ, "CYCLONEDDS_URI": LOOPBACK_URI, "PYTHONPATH": REPO}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.ros.fake_arm", "--domain", str(DOMAIN),
             "--log", str(self.log), "--home", ",".join(map(str, HOME))],
            cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def commands(self):
        return [json.loads(x) for x in self.log.read_text().splitlines() if x.strip()]

    def close(self):
        if self.proc.poll() is None:
            self.send("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Diagnostics:
    def __init__(self):
        from runtime.ros.transport_dds import DdsTransport
        self.t = DdsTransport(DOMAIN)
        self.msgs = []
        self.t.subscribe("diagnostics", "/diagnostics", "status", self.msgs.append)

    def last(self):
        s = self.msgs[-1].status[0]
        return s.level, s.message, {kv.key: kv.value for kv in s.values}

    def wait_for(self, text, timeout=3.0):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.msgs and text in self.last()[1]:
                return self.last()
            time.sleep(0.02)
        raise AssertionError(f"no diagnostics saying {text!r}; last: "
                             f"{self.last() if self.msgs else None}")


def count_between(cmds, t0, t1):
    return [c for c in cmds if t0 <= c["t"] < t1]


def test_node_over_dds_commands_holds_and_follows_the_lifecycle(loopback, tmp_path):
    from runtime.ros.node_core import LifecycleError, RosNodeCore
    from runtime.ros.params import RosParams
    from runtime.ros.transport_dds import DdsTransport

    export_arm7_artifact(tmp_path / "policy")
    from tests.doubles import public_key_for_tests
    params = RosParams(artifact=str(tmp_path / "policy"), robot_id="arm0",
                       trusted_keys=public_key_for_tests(),
                       spool=str(tmp_path / "spool"), max_age_s=0.5, max_skew_s=0.1)
    desc = load_description("arm7_position")
    arm = Arm(tmp_path)
    diag = Diagnostics()
    transport = DdsTransport(DOMAIN)
    core = RosNodeCore(params, transport)
    try:
        with pytest.raises(LifecycleError, match="unconfigured"):
            core.activate()
        core.configure()
        time.sleep(1.0)
        assert arm.commands() == [], "an inactive node must not command"
        assert "inactive" in diag.wait_for("inactive")[1]

        core.activate()
        t_on = time.time()
        diag.wait_for("commanding")
        time.sleep(2.0)
        t_hold = time.time()
        cmds = count_between(arm.commands(), t_on + 0.5, t_hold)
        # 25 Hz: ~37 commands in 1.5 s; arrival spacing near 40 ms
        assert 30 <= len(cmds) <= 42, len(cmds)
        gaps = np.diff([c["t"] for c in cmds])
        assert 0.030 < np.median(gaps) < 0.050, np.median(gaps)
        assert all(c["names"] == list(desc.joints) and c["n_points"] == 1 for c in cmds)
        assert all(abs(c["tfs"] - 0.04) < 1e-6 for c in cmds)
        pos = np.array([c["positions"] for c in cmds])
        assert np.all(np.abs(np.diff(pos, axis=0)) <= np.asarray(desc.max_delta) + 1e-5)
        lo, hi = desc.bounds()
        assert np.all(pos >= lo - 1e-6) and np.all(pos <= hi + 1e-6)

        # the camera stops: after max_age_s the node holds (one hold command) and says why
        arm.send("camera off")
        level, message, values = diag.wait_for("front stale")
        assert level == 1 and values["state"] == "active"
        assert values["control_sched"] == "SCHED_OTHER 0"  # rt_priority 0: a normal thread
        time.sleep(0.5)  # the hold, and anything in flight on a loaded machine, has arrived
        n_hold = len(arm.commands())
        time.sleep(0.6)
        assert len(arm.commands()) == n_hold, "commands while holding on stale images"
        last_two = arm.commands()[-2:]
        assert last_two[1]["positions"] == last_two[0]["positions"], "the hold is not in place"

        arm.send("camera on")
        diag.wait_for("commanding")
        time.sleep(0.5)
        assert len(arm.commands()) > n_hold + 5, "did not resume after the camera came back"

        # images 0.3 s behind the joint states: fresh enough, but out of sync
        arm.send("skew 0.3")
        level, message, _ = diag.wait_for("out of sync")
        assert level == 1 and "front" in message
        arm.send("skew 0")
        diag.wait_for("commanding")

        # an operator takes over on the teleop topic: its targets go out, recorded as such
        arm.send("teleop -0.2")
        diag.wait_for("operator driving")
        t_op = time.time()
        time.sleep(0.5)
        taken = count_between(arm.commands(), t_op + 0.1, time.time() - 0.1)
        assert taken and all(np.allclose(c["positions"], np.clip(np.full(7, -0.2), lo, hi))
                             for c in taken)
        arm.send("teleop off")
        diag.wait_for("commanding")
        _, _, values = diag.last()
        assert int(values["operator_ticks"]) >= 5 and int(values["interventions"]) >= 1

        # deactivate holds and stops commanding; activate resumes; cleanup unconfigures
        core.deactivate()
        diag.wait_for("inactive")
        time.sleep(0.3)  # let commands already in flight on a loaded machine arrive
        n = len(arm.commands())
        time.sleep(0.4)
        assert len(arm.commands()) == n
        core.activate()
        diag.wait_for("commanding")
        time.sleep(0.4)
        assert len(arm.commands()) > n
        _, _, values = diag.last()
        holds = values["holds"]
        assert "front stale" in holds and "cameras and joint states out of sync" in holds
        core.deactivate()
        core.cleanup()
        assert core.state == "unconfigured"
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["control"]["ticks"] > 50 and status["episodes"] >= 3
        assert status["records_spooled"] > 0
    finally:
        core.shutdown()
        transport.shutdown()
        diag.t.shutdown()
        arm.close()
