"""Expert demonstrations: collection, chunk targets and padding, npz round trip."""
import numpy as np
import pytest

from learner.demos import DemoSet, collect_demos


def _tiny(episodes=(3, 2)):
    """Two hand-made episodes with actions 1, 2, 3 | 10, 20 (every component)."""
    acts = np.array([[v] * 4 for v in (1, 2, 3, 10, 20)], np.float32)[: sum(episodes)]
    ep = np.repeat(np.arange(len(episodes)), episodes)
    step = np.concatenate([np.arange(n) for n in episodes])
    n = len(acts)
    return DemoSet(images=np.zeros((n, 4, 4, 3), np.uint8), state=np.zeros((n, 4), np.float32),
                   actions=acts, task_index=np.zeros(n, np.int64), episode=ep, step=step,
                   episode_task=np.zeros(len(episodes), np.int64),
                   episode_success=np.array([True, False]), tasks=("reach-v3",),
                   instructions=("reach the goal position",))


def test_chunk_targets_stay_in_episode_and_pad_with_last_action():
    d = _tiny()
    targets, valid = d.chunk_targets(3)
    assert targets.shape == (5, 3, 4) and valid.shape == (5, 3)
    np.testing.assert_array_equal(targets[:, :, 0], [[1, 2, 3], [2, 3, 3], [3, 3, 3],
                                                     [10, 20, 20], [20, 20, 20]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]])
    assert d.success_rate() == {"reach-v3": 0.5}


def test_npz_round_trip(tmp_path):
    d = _tiny()
    d.save(tmp_path / "d.npz")
    e = DemoSet.load(tmp_path / "d.npz")
    assert e.tasks == d.tasks and e.instructions == d.instructions
    for key in ("images", "state", "actions", "episode", "step", "episode_success"):
        np.testing.assert_array_equal(getattr(e, key), getattr(d, key))


def test_inconsistent_arrays_are_refused():
    d = _tiny()
    with pytest.raises(ValueError, match="state has"):
        DemoSet(**{**d.__dict__, "state": d.state[:2]})


def test_collect_demos_records_expert_episodes():
    d = collect_demos(["reach-v3", "button-press-topdown-v3"], 2, seed=0, max_steps=150)
    assert d.tasks == ("reach-v3", "button-press-topdown-v3")
    assert d.instructions == ("reach the goal position", "press the button from the top")
    assert d.images.shape[1:] == (48, 48, 3) and d.images.dtype == np.uint8
    assert d.state.shape == (len(d), 4) and d.actions.shape == (len(d), 4)
    assert np.all(np.abs(d.actions) <= 1.0)
    assert sorted(set(d.episode.tolist())) == [0, 1, 2, 3]
    assert set(d.task_index[d.episode == 3].tolist()) == {1}
    for e in range(4):
        np.testing.assert_array_equal(d.step[d.episode == e], np.arange((d.episode == e).sum()))
    assert d.success_rate()["reach-v3"] == 1.0  # the reach expert is reliable
