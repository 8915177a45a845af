import json

from sim import report
from sim.fleet import check


def _status(rid, versions, sbv, spooled, acked, stall=0):
    return {"robot_id": rid, "versions_run": versions, "success_by_version": sbv,
            "episodes": sum(e for _, e in sbv.values()), "successes": sum(s for s, _ in sbv.values()),
            "records_spooled": spooled, "records_acked": acked, "swap_stall_ticks": stall,
            "control": {"ticks": 100, "deadline_misses": 1, "stall_ticks": 2, "jitter_p99_ms": 0.5},
            "verifier": {"chunks_checked": 10, "actions_clamped": 3}}


def test_aggregate_sums_and_rates():
    s = report.aggregate([_status("a", [1, 2, 3], {"1": [1, 4], "2": [3, 4]}, 50, 50),
                          _status("b", [1, 2], {"1": [0, 2], "10": [2, 2]}, 30, 30)],
                         {"records_stored": 80, "versions_published": 3}, 12.0)
    assert s["transitions_sent"] == s["transitions_acked"] == s["transitions_stored"] == 80
    assert s["versions_deployed_min"] == 2
    assert s["success_rate_by_version"] == {"1": round(1 / 6, 3), "2": 0.75, "10": 1.0}
    assert list(s["success_rate_by_version"]) == ["1", "2", "10"]  # numeric order
    assert s["control"]["ticks"] == 200 and s["verifier"]["actions_clamped"] == 6
    assert check(dict(s, robot_exit_codes={"a": 0, "b": 0})) == []


def test_check_reports_loss_stalls_and_crashes():
    s = report.aggregate([_status("a", [1], {"1": [1, 1]}, 10, 9, stall=2)],
                         {"records_stored": 9}, 1.0)
    problems = check(dict(s, robot_exit_codes={"a": -9}))
    assert len(problems) == 3 and "differ" in problems[0]
    dropped = dict(s, transitions_dropped=4, robot_exit_codes={"a": 0})
    assert any("4 transitions dropped" in p for p in check(dropped))


def test_learning_curve_bins_new_episodes():
    samples = [(1, 0, 0), (5, 2, 1), (11, 4, 1), (15, 5, 2), (22, 8, 5), (25, 8, 5)]
    assert report.learning_curve(samples, bin_s=10) == [[11, 0.25, 4], [22, 1.0, 4]]
    # a short tail joins the last bin; a long one is its own
    assert report.learning_curve(samples + [(24, 9, 5)], bin_s=10) == [[11, 0.25, 4], [24, 0.8, 5]]
    assert report.learning_curve(samples + [(28, 9, 5)], bin_s=10) == [[11, 0.25, 4], [22, 1.0, 4], [28, 0.0, 1]]


def test_outputs_written(tmp_path):
    report.write_outputs(tmp_path, {"robots": 1}, [[10.0, 0.5, 2]], [(0.0, 1), (8.0, 2)])
    assert json.loads((tmp_path / "summary.json").read_text())["version_times"] == [[0.0, 1], [8.0, 2]]
    assert (tmp_path / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_fleet_driver_turns_sigterm_into_a_clean_stop():
    """SIGTERM to the fleet's driver raises KeyboardInterrupt (so ``run_fleet``'s ``finally``
    stops the learner and robots) once; a second one during the clean-up is ignored; the
    previous handler comes back afterwards."""
    import os
    import signal

    import pytest

    from sim.fleet import stop_on_sigterm

    before = signal.getsignal(signal.SIGTERM)
    restore = stop_on_sigterm()
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before kill returns
        os.kill(os.getpid(), signal.SIGTERM)  # during clean-up: no second interrupt
    finally:
        restore()
    assert signal.getsignal(signal.SIGTERM) is before
