"""Export to the LeRobotDataset v3.0 layout, read back with pyarrow: counts, episode boundaries,
frames vs. records, info.json consistency, selection filters, and no path outside --out."""
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from learner.export_lerobot import export, main, png_bytes
from learner.store import ExperienceStore
from runtime.tensors import from_proto, to_proto
from tests.learner.helpers import simple_record
from tether.wire import tether_pb2 as pb

FPS = 10.0


def _episode(robot, episode, n, *, first_seq, task="reach", success=False, ended=True,
             version=1, actions=2):
    out = []
    for i in range(n):
        last = ended and i == n - 1
        r = simple_record(robot, episode, first_seq + i, n=actions, reward=0.5 + i,
                          done=last and success, success=last and success, version=version)
        r.truncated = last and not success
        r.task = task
        r.observation.instruction = f"please {task}"
        out.append(r)
    return out


@pytest.fixture
def learner_data(tmp_path):
    """A learner data dir: r1 has 2 ended episodes + 1 still running, r2 one of another task."""
    store = ExperienceStore(tmp_path / "learner" / "experience")
    episodes = {
        ("r1", "e1"): _episode("r1", "e1", 3, first_seq=0, success=True),
        ("r1", "e2"): _episode("r1", "e2", 2, first_seq=3, version=2),
        ("r1", "e3"): _episode("r1", "e3", 2, first_seq=5, ended=False, version=2),
        ("r2", "e1"): _episode("r2", "e1", 2, first_seq=0, task="push", success=True,
                               version=3, actions=3),
    }
    # interleaved as robots stream them: an episode's records are spread over batches
    order = [("r1", "e1", 0), ("r2", "e1", 0), ("r1", "e1", 1), ("r1", "e1", 2),
             ("r1", "e2", 0), ("r2", "e1", 1), ("r1", "e2", 1), ("r1", "e3", 0), ("r1", "e3", 1)]
    for robot, ep, i in order:
        store.append(pb.ExperienceBatch(robot_id=robot, records=[episodes[(robot, ep)][i]]))
    store.close()
    return tmp_path / "learner", episodes


def _read(out):
    info = json.loads((out / "meta" / "info.json").read_text())
    files = sorted((out / "data").glob("chunk-*/file-*.parquet"))
    data = pq.read_table(files).to_pylist() if files else []
    meta = pq.read_table(sorted((out / "meta" / "episodes").glob("chunk-*/file-*.parquet")))
    return info, data, meta.to_pylist(), files


def test_export_writes_a_consistent_v3_dataset(learner_data, tmp_path):
    data_dir, episodes = learner_data
    out = tmp_path / "dataset"
    info = export(data_dir, out, fps=FPS)
    disk_info, frames, meta, files = _read(out)
    assert disk_info == info
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    expected = [("r1", "e1"), ("r2", "e1"), ("r1", "e2")]  # the running e3 is left out
    assert [(m["tether/robot_id"], m["tether/episode_id"]) for m in meta] == expected
    lengths = [sum(len(r.offsets) for r in episodes[k]) for k in expected]
    assert [m["length"] for m in meta] == lengths
    assert info["total_episodes"] == 3 and info["total_frames"] == len(frames) == sum(lengths)
    assert info["total_tasks"] == 2 and info["splits"] == {"train": "0:3"}
    assert set(info["features"]) == set(frames[0]) and info["features"]["action"]["shape"] == [4]
    assert info["features"]["observation.images.front"] == {
        "dtype": "image", "shape": [48, 48, 3], "names": ["height", "width", "channels"]}
    assert [f["index"] for f in frames] == list(range(len(frames)))
    for m, key in zip(meta, expected):
        rows = frames[m["dataset_from_index"]:m["dataset_to_index"]]
        assert m["dataset_to_index"] - m["dataset_from_index"] == m["length"]
        assert {f["episode_index"] for f in rows} == {m["episode_index"]}
        assert [f["frame_index"] for f in rows] == list(range(m["length"]))
        assert [f["timestamp"] for f in rows] == pytest.approx(
            [i / FPS for i in range(m["length"])])
        records = episodes[key]
        actions = np.concatenate([from_proto(r.actions) for r in records])
        np.testing.assert_array_equal(np.array([f["action"] for f in rows], np.float32), actions)
        states = np.concatenate([np.repeat(from_proto(r.observation.state)[None],
                                           len(r.offsets), 0) for r in records])
        np.testing.assert_array_equal(np.array([f["observation.state"] for f in rows]), states)
        assert sum(f["next.reward"] for f in rows) == pytest.approx(sum(r.reward for r in records))
        assert [f["next.done"] for f in rows] == [False] * (m["length"] - 1) + [True]
        assert rows[-1]["next.success"] == m["tether/success"] == records[-1].success
        assert m["tasks"] == [records[0].observation.instruction]
        assert (m["data/chunk_index"], m["data/file_index"]) == (0, 0)
    # images are PNGs of exactly the recorded pixels
    image_module = pytest.importorskip("PIL.Image")
    first = np.asarray(image_module.open(io.BytesIO(frames[0]["observation.images.front"]["bytes"])))
    np.testing.assert_array_equal(first, from_proto(episodes[("r1", "e1")][0].observation
                                                    .images["front"]))
    tasks = pq.read_table(out / "meta" / "tasks.parquet")
    assert dict(zip(tasks.column("task").to_pylist(), tasks.column("task_index").to_pylist())) \
        == {"please reach": 0, "please push": 1}
    assert json.loads(tasks.schema.metadata[b"pandas"])["index_columns"] == ["task"]
    stats = json.loads((out / "meta" / "stats.json").read_text())
    all_actions = np.array([f["action"] for f in frames])
    np.testing.assert_allclose(stats["action"]["mean"], all_actions.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["action"]["std"], all_actions.std(0), rtol=1e-5)
    assert stats["action"]["count"] == [len(frames)]
    assert np.array(stats["observation.images.front"]["mean"]).shape == (3, 1, 1)


def test_filters_select_episodes(learner_data, tmp_path):
    data_dir, _ = learner_data

    def picked(**kw):
        out = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        export(data_dir, out, fps=FPS, **kw)
        return [(m["tether/robot_id"], m["tether/episode_id"]) for m in _read(out)[2]]

    assert picked(successful_only=True) == [("r1", "e1"), ("r2", "e1")]
    assert picked(robot="r1") == [("r1", "e1"), ("r1", "e2")]
    assert picked(task="push") == [("r2", "e1")]
    assert picked(min_version=2, include_incomplete=True) == [("r2", "e1"), ("r1", "e2"),
                                                               ("r1", "e3")]
    with pytest.raises(LookupError, match="no episode"):
        export(data_dir, tmp_path / "none", robot="r9")


def test_episodes_never_span_data_files(learner_data, tmp_path):
    data_dir, _ = learner_data
    out = tmp_path / "dataset"
    export(data_dir, out, fps=FPS, data_file_mb=1e-6)  # every episode fills a file
    info, frames, meta, files = _read(out)
    assert len(files) == 3
    for m, path in zip(meta, files):
        assert path.relative_to(out).as_posix() == info["data_path"].format(
            chunk_index=m["data/chunk_index"], file_index=m["data/file_index"])
        assert pq.read_table(path).column("episode_index").to_pylist() == [m["episode_index"]] \
            * m["length"]


def test_hostile_names_never_become_paths(tmp_path, capsys):
    store = ExperienceStore(tmp_path / "learner" / "experience")
    r = _episode("../../robot", "../../../ep", 1, first_seq=0, task="../../task")[0]
    r.observation.images["../../cam/x"].CopyFrom(to_proto(np.zeros((4, 4, 3), np.uint8)))
    store.append(pb.ExperienceBatch(robot_id="../../robot", records=[r]))
    store.close()
    out = tmp_path / "a" / "dataset"
    assert main(["--data", str(tmp_path / "learner"), "--out", str(out), "--fps", "5"]) == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")
                     if p.is_file() and "learner" not in p.parts)
    assert written == ["a/dataset/data/chunk-000/file-000.parquet",
                       "a/dataset/meta/episodes/chunk-000/file-000.parquet",
                       "a/dataset/meta/info.json", "a/dataset/meta/stats.json",
                       "a/dataset/meta/tasks.parquet"]
    features = json.loads((out / "meta" / "info.json").read_text())["features"]
    assert "observation.images.______cam_x" in features
    # a second export into the same (now non-empty) directory is refused, nothing touched
    assert main(["--data", str(tmp_path / "learner"), "--out", str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_png_round_trip():
    image_module = pytest.importorskip("PIL.Image")
    img = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(image_module.open(io.BytesIO(png_bytes(img)))), img)
