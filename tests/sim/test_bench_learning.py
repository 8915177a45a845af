"""The learning benchmark's curve arithmetic (sim/bench_learning.py): moving windows over
cumulative samples, time to a level, the asynchronous speedup, the default window, blocks."""
import json

import pytest

from sim.bench_learning import (WINDOW_EPISODES, async_speedup, block_success, combine,
                                default_window, mean_curve, moving_success, time_to)


def _samples(rates_per_10s: list[float], episodes_per_10s: int = 20) -> list:
    """Cumulative (seconds, episodes, successes), one sample per 10 s at the given rates."""
    out, eps, succ = [], 0, 0
    for i, rate in enumerate(rates_per_10s):
        eps += episodes_per_10s
        succ += round(rate * episodes_per_10s)
        out.append([10.0 * (i + 1), eps, succ])
    return out


def test_moving_success_counts_only_the_last_window():
    samples = _samples([0.0] * 5 + [1.0] * 5)  # 100 episodes at 0, then 100 at 1
    curve = moving_success(samples, window=40, every_s=0.0)
    assert curve[0] == [10.0, 0.0]  # half a window is enough for a first point
    assert dict(map(tuple, curve))[60.0] == 0.5  # the window straddles the switch
    assert curve[-1] == [100.0, 1.0]  # the last 40 episodes were all successes


def test_moving_success_stops_at_the_run_end_and_spaces_points():
    samples = _samples([0.5] * 10)
    curve = moving_success(samples, window=20, until_s=50.0, every_s=20.0)
    assert [t for t, _ in curve] == [10.0, 30.0, 50.0]  # 60 s is past until_s + 1


def test_async_speedup_is_the_ratio_of_times_to_the_sync_final_level():
    sync = {"curve": [[100.0, 0.3], [400.0, 0.5], [900.0, 0.6]], "final_success": 0.6}
    fast = {"curve": [[100.0, 0.4], [300.0, 0.61], [900.0, 0.7]]}
    never = {"curve": [[100.0, 0.4], [900.0, 0.55]]}
    assert time_to(sync["curve"], 0.5) == 400.0
    assert async_speedup(sync, fast) == 3.0
    assert async_speedup(sync, never) is None


def test_default_window_spans_the_same_wall_time_at_any_sim_speed():
    assert default_window(1.0) == WINDOW_EPISODES
    assert default_window(3.0) == 3 * WINDOW_EPISODES
    assert default_window(0.5) == WINDOW_EPISODES  # slower than real time: never fewer episodes


def test_block_success_splits_wall_time_into_blocks():
    samples = [[10.0, 4, 1], [170.0, 10, 5], [200.0, 12, 5], [350.0, 20, 13]]
    blocks = block_success(samples, 180.0, 540.0)
    assert blocks == [[180.0, 0.5, 10], [360.0, 0.8, 10], [540.0, None, 0]]


def test_the_learning_tasks_and_their_clone_settings_are_valid():
    """The benchmark's tasks and pretraining overrides name registered tasks and real
    ``PretrainConfig`` fields: a typo would otherwise surface only 20 minutes into a benchmark."""
    from learner.pretrain import PretrainConfig
    from sim.bench_learning import LEARNING_PRETRAIN, LEARNING_TASKS
    from sim.tasks import get_task

    assert len(LEARNING_TASKS) == len(set(LEARNING_TASKS)) >= 2
    for task in LEARNING_TASKS:
        assert get_task(task).name == task
    # an unknown field raises TypeError here
    assert PretrainConfig(tasks=LEARNING_TASKS, **LEARNING_PRETRAIN).tasks == LEARNING_TASKS


def test_mean_curve_averages_on_the_span_all_curves_cover():
    a = [[30.0, 0.2], [130.0, 0.4], [230.0, 0.6]]
    b = [[10.0, 0.0], [110.0, 0.2], [210.0, 0.4]]  # starts earlier, ends earlier
    got = mean_curve([a, b], every_s=50.0)
    assert [t for t, _ in got] == [30.0, 80.0, 130.0, 180.0, 210.0]
    assert got[0] == [30.0, round((0.2 + 0.04) / 2, 4)]  # b interpolated at 30 s
    assert got[-1] == [210.0, round((0.56 + 0.4) / 2, 4)]
    with pytest.raises(ValueError, match="overlap"):
        mean_curve([[[0.0, 0.1], [10.0, 0.1]], [[20.0, 0.1], [30.0, 0.1]]])


def _result(sync_curve, async_curve, staleness=4):
    return {"learning": [{"staleness": 0, "curve": sync_curve, "final_success": sync_curve[-1][1]},
                         {"staleness": staleness, "curve": async_curve,
                          "final_success": async_curve[-1][1]}]}


def test_combine_measures_the_speedup_on_the_mean_curves_and_every_pairing():
    # run 1: async reaches the sync final (0.5 at 400 s) at 200 s; run 2: never reaches 0.7
    r1 = _result([[0.0, 0.1], [400.0, 0.5], [800.0, 0.5]], [[0.0, 0.1], [200.0, 0.5], [800.0, 0.6]])
    r2 = _result([[0.0, 0.3], [400.0, 0.5], [800.0, 0.7]], [[0.0, 0.2], [400.0, 0.4], [800.0, 0.6]])
    got = combine([r1, r2])
    assert got["runs"] == 2 and got["async_speedup_per_run"] == [2.0, None]
    assert got["async_speedup_pairs"] == [2.0, 0.5, None, None]  # (s1,a1) (s1,a2) (s2,a1) (s2,a2)
    assert got["async_speedup_pairs_median"] == 0.25  # never reaching counts as 0
    sync, asyn = got["mean"]
    assert (sync["staleness"], asyn["staleness"]) == (0, 4)
    assert sync["final_success"] == 0.6 and asyn["final_success"] == 0.6
    assert sync["runs_final_success"] == [0.5, 0.7]
    # the mean sync curve first reaches 0.6 at 800 s, the mean async one at 800 s too
    assert got["async_speedup"] == async_speedup(sync, asyn) == 1.0
    json.dumps(got)  # plain JSON
    with pytest.raises(ValueError, match="one synchronous and one asynchronous"):
        combine([{"learning": r1["learning"][:1]}])
    with pytest.raises(ValueError, match="differ in staleness"):
        combine([r1, _result(r2["learning"][0]["curve"], r2["learning"][1]["curve"], staleness=8)])
