"""Robots placed by Ray (a local Ray instance here): a real learner process and two real
``tether robot`` processes started by Ray actors, each in its own node-local folder with shipped
copies of the artifact and key; their experience must reach the learner's store."""
import json
import sys
import time

import pytest

from sim.fleet import Fleet, FleetConfig, learner_trust
from tests.doubles import export_tiny_artifact

ray = pytest.importorskip("ray", reason="needs the scale extra (pip install 'tether[scale]')")
pytest.importorskip("sim.metaworld_robot", reason="needs the sim extra (Meta-World)")


@pytest.mark.timeout(180)
def test_two_robots_placed_by_ray_stream_experience_to_the_learner(tmp_path):
    from sim.ray_fleet import RayPlacement
    export_tiny_artifact(tmp_path / "pretrained", version=1, seed=1)
    config = FleetConfig(robots=2, minutes=0.25, out=str(tmp_path / "fleet"), train=False,
                         ray="auto", drain_timeout_s=30, progress_s=5)
    fleet = Fleet(config, ("reach-v3",))
    fleet.out.mkdir(parents=True)
    try:
        fleet.placement = RayPlacement("auto", robots=2)
    except Exception as e:  # a sandbox without the resources Ray needs to start
        pytest.skip(f"a local Ray instance could not start here: {e}")
    try:
        assert fleet.placement.local and fleet.placement.bind_host == "127.0.0.1"
        fleet.start_learner(tmp_path / "pretrained", None)
        fleet.t0 = time.monotonic()
        fleet.start_robots(learner_trust(fleet.out / "learner")[0])
        robots = list(fleet.robots.values())
        statuses = fleet.monitor()  # returns when both robots have finished
        stats = fleet.learner_stats()
    finally:
        fleet.stop()
        fleet.placement.close()
    assert ray.is_initialized() is False  # the local instance was shut down
    assert [r.returncode for r in robots] == [0, 0], [(r.home / "robot.log").read_text()[-2000:]
                                                      for r in robots]
    for r in robots:  # the process ran in its node folder; its status and log were mirrored
        assert r.node and not (r.home / "spool").exists()
        assert "node: stopped after" in (r.home / "robot.log").read_text()
    by_robot = {s["robot_id"]: s for s in statuses}
    assert set(by_robot) == {"robot-0", "robot-1"}
    for s in by_robot.values():
        assert s["done"] and s["records_spooled"] > 0
        assert s["records_acked"] == s["records_spooled"]
    stored = json.loads((fleet.out / "learner" / "learner.json").read_text())["robots"]
    assert {rid: stored[rid]["records"] for rid in by_robot} == \
        {rid: s["records_acked"] for rid, s in by_robot.items()}
    assert stats["records_stored"] == sum(s["records_acked"] for s in by_robot.values())


def test_without_ray_the_error_names_the_extra(monkeypatch):
    from sim.ray_fleet import import_ray
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'tether\[scale\]'"):
        import_ray()
