"""The weight rollout benchmark end to end, small: two real robot processes, a 4 MB artifact."""
import pytest


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rollout_bench_reports_every_robot_swapping(tmp_path):
    pytest.importorskip("sim.metaworld_robot", reason="needs the sim extra (Meta-World)")
    from sim.bench_rollout import run_rollout
    r = run_rollout(robots=2, artifact_mb=4.0, work_dir=tmp_path, rounds=1, log=lambda m: None)
    assert r["robots"] == 2 and 3.5 < r["artifact_mb"] < 4.5
    [round_] = r["rounds"]
    assert len(r["per_robot_s"]) == 2 and 0 < r["seconds_to_all"] == max(r["per_robot_s"])
    assert 0 < r["announce_to_serve_p50_s"] <= r["seconds_to_all"]
    assert round_["version"] == 2 and round_["swap_stall_ticks"] == 0
    assert isinstance(r["missed_ticks"], int) and r["missed_ticks"] >= 0
