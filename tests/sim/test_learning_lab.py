"""The learning lab runs the robots' real pipeline on virtual clocks into the real trainer."""
import pytest

from sim import learning_lab
from sim.tasks import DEFAULT_TASKS


@pytest.mark.timeout(600)
def test_the_lab_trains_on_what_the_robots_recorded_and_publishes_each_iteration(tmp_path):
    rows = learning_lab.run(2, 1, trainer={"epochs": 1}, work_dir=tmp_path, log=lambda _: None)
    assert [r["version"] for r in rows] == [1, 2]  # iteration 2 ran the version 1 trained
    for r in rows:
        assert set(r["tasks"]) == set(DEFAULT_TASKS)
        assert all(t["episodes"] == 1 and 0 <= t["successes"] <= 1 and t["supervised"] == 0
                   for t in r["tasks"].values())
        assert r["records"] >= 3 and r["human_records"] == 0 and r["kl_update"] >= 0
    assert (tmp_path / "registry").is_dir()
