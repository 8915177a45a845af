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
    assert sum(round_["misses_by_phase"].values()) <= round_["deadline_misses"]


def test_misses_are_sorted_by_what_the_robot_was_doing_then():
    from sim.bench_rollout import _misses_by_phase
    # committed at 10.0; fetched 10.1-10.6, loaded 10.6-10.7, swapped at 10.75
    swapped = {"r": {"swapped_at": 10.75, "weights": {
        "installed_at": 10.7, "timings": {"fetch_s": 0.5, "load_s": 0.1}}}}
    misses = [[9.5, 4], [10.05, 1], [10.3, 2], [10.65, 1], [10.72, 1], [11.0, 3]]
    now = {"r": {"control": {"recent_misses": misses}}}
    assert _misses_by_phase(now, swapped, 10.0) == {
        "before_fetch": 1, "fetch": 2, "load": 1, "staged": 1, "after_swap": 3}
