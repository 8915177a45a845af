"""``tether export``: a selection of the learner's experience as a LeRobotDataset (v3.0 layout).

    tether export --data LEARNER_DATA --out DIR [--robot R] [--task T] [--min-version V]
                  [--successful-only] [--include-incomplete] [--fps HZ]

Layout written (the v3.0 one: many episodes per Parquet file, relational episode metadata)::

    meta/info.json                              codebase_version "v3.0", fps, features, templates
    meta/stats.json                             min/max/mean/std/count per feature
    meta/tasks.parquet                          task (the index, as pandas reads it) -> task_index
    meta/episodes/chunk-000/file-000.parquet    one row per episode: length, tasks, data file,
                                                dataset_from/to_index, per-episode stats
    data/chunk-XXX/file-YYY.parquet             one row per control tick

A frame is one executed action (one control tick). Tether records an observation per chunk, at
inference time, so every frame of a chunk carries that chunk's observation; ``next.reward`` (the
chunk's reward, summed over its executed span) sits on the chunk's last frame. Cameras are
``image`` features stored as PNG bytes in the data files (no videos). Robot, episode and task
names never become paths: every path is a template filled with integers, so nothing can be
written outside ``--out``; the dataset is built in a temporary directory and renamed into place.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import shutil
import struct
import sys
import tempfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from learner.store import ExperienceStore
from runtime.tensors import from_proto
from tether.wire import tether_pb2 as pb

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk directory
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
DEFAULT_FPS = 25.0
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_\-]")


def png_bytes(image: np.ndarray) -> bytes:
    """A lossless PNG of an HxWxC uint8 image (C in 1, 3, 4), written with zlib only."""
    h, w, c = image.shape
    color = {1: 0, 3: 2, 4: 6}.get(c)
    if color is None or image.dtype != np.uint8:
        raise ValueError(f"cannot write a {image.dtype} image with {c} channels as PNG")
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * c)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)) + chunk(b"IEND", b""))


class _Stats:
    """Running min/max/mean/std/count of a feature, element-wise over frames (float64).

    ``shape`` is how LeRobot lays the numbers out: [d] for vectors, [1] for scalars, [3, 1, 1]
    for images (per channel, in [0, 1])."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.shape, self.n = shape, 0.0
        self.sum = self.sq = self.lo = self.hi = None

    def add(self, values, weights=None) -> None:
        """Rows of ``values`` are frames (a row may stand for ``weights[i]`` frames)."""
        v = np.asarray(values, np.float64)
        v = v.reshape(len(v), -1)
        w = np.ones(len(v)) if weights is None else np.asarray(weights, np.float64)
        if self.sum is None:
            self.sum, self.sq = np.zeros(v.shape[1]), np.zeros(v.shape[1])
            self.lo, self.hi = np.full(v.shape[1], np.inf), np.full(v.shape[1], -np.inf)
        self.n += w.sum()
        self.sum += (v * w[:, None]).sum(0)
        self.sq += (v * v * w[:, None]).sum(0)
        self.lo, self.hi = np.minimum(self.lo, v.min(0)), np.maximum(self.hi, v.max(0))

    def as_dict(self) -> dict:
        mean = self.sum / self.n
        std = np.sqrt(np.maximum(self.sq / self.n - mean * mean, 0.0))
        shape = self.shape or mean.shape
        return {"min": self.lo.reshape(shape).tolist(), "max": self.hi.reshape(shape).tolist(),
                "mean": mean.reshape(shape).tolist(), "std": std.reshape(shape).tolist(),
                "count": [int(self.n)]}


class _Writer:
    """Frames into data/chunk-XXX/file-YYY.parquet, a new file once one passes ``file_mb``
    (an episode never spans two files)."""

    def __init__(self, root: pathlib.Path, schema: pa.Schema, file_mb: float):
        self.root, self.schema, self.limit = root, schema, file_mb * 1e6
        self.index, self.writer, self.bytes = 0, None, 0

    def location(self) -> tuple[int, int]:
        return divmod(self.index, CHUNKS_SIZE)

    def write(self, table: pa.Table) -> tuple[int, int]:
        """Write one episode's frames; returns (chunk_index, file_index) it landed in."""
        if self.writer is not None and self.bytes >= self.limit:
            self.writer.close()
            self.writer, self.bytes, self.index = None, 0, self.index + 1
        chunk, file = self.location()
        if self.writer is None:
            path = self.root / DATA_PATH.format(chunk_index=chunk, file_index=file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, self.schema)
        self.writer.write_table(table)
        self.bytes += table.nbytes
        return chunk, file

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _feature(dtype: str, shape: list[int], names=None) -> dict:
    return {"dtype": dtype, "shape": shape, "names": names}


class _Episodes:
    """Builds frames and metadata episode by episode, in the order they complete."""

    def __init__(self, root: pathlib.Path, first: pb.ChunkRecord, fps: float, file_mb: float):
        self.root, self.fps = root, fps
        self.cameras = {}  # feature name -> camera name in the records
        for cam in sorted(first.observation.images):
            key = "observation.images." + _SAFE_NAME.sub("_", cam)
            if key in self.cameras:
                raise ValueError(f"camera names {cam!r} and {self.cameras[key]!r} both become "
                                 f"{key!r}; rename one on the robot")
            self.cameras[key] = cam
        self.image_shapes = {k: list(first.observation.images[c].shape)
                             for k, c in self.cameras.items()}
        self.state_dim = int(first.observation.state.shape[0])
        self.action_dim = int(first.actions.shape[1])
        image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        self.schema = pa.schema(
            [("observation.state", pa.list_(pa.float32(), self.state_dim)),
             ("action", pa.list_(pa.float32(), self.action_dim))]
            + [(k, image) for k in self.cameras]
            + [("timestamp", pa.float32()), ("frame_index", pa.int64()),
               ("episode_index", pa.int64()), ("index", pa.int64()), ("task_index", pa.int64()),
               ("next.reward", pa.float32()), ("next.done", pa.bool_()),
               ("next.success", pa.bool_()), ("tether.policy_version", pa.int64()),
               ("tether.chunk_seq", pa.int64()), ("tether.human_intervention", pa.bool_())])
        self.writer = _Writer(root, self.schema, file_mb)
        self.tasks: dict[str, int] = {}
        self.rows: list[dict] = []
        self.frames = 0
        self.stats = {k: _Stats() for k in ("observation.state", "action", "timestamp",
                                            "frame_index", "episode_index", "index",
                                            "task_index", "next.reward")}
        self.stats.update({k: _Stats((3, 1, 1)) for k in self.cameras})

    def _check(self, r: pb.ChunkRecord, state: np.ndarray, actions: np.ndarray) -> None:
        images = {k: list(r.observation.images[c].shape) if c in r.observation.images else None
                  for k, c in self.cameras.items()}
        if (state.shape != (self.state_dim,) or actions.shape[1] != self.action_dim
                or images != self.image_shapes
                or set(r.observation.images) != set(self.cameras.values())):
            raise ValueError(f"robot {r.robot_id!r} episode {r.episode_id!r} seq {r.seq}: state "
                             f"{state.shape}, actions {actions.shape}, cameras "
                             f"{ {c: list(t.shape) for c, t in r.observation.images.items()} } "
                             f"differ from the first episode's ({self.state_dim}, "
                             f"{self.action_dim}, {self.image_shapes}); one dataset needs one "
                             f"robot layout: narrow the selection with --robot or --task")

    def add(self, meta: dict, records: list[pb.ChunkRecord]) -> None:
        """Append one episode (its catalog row and all its records)."""
        records.sort(key=lambda r: r.seq)
        first = records[0]
        task = first.observation.instruction or first.task
        task_index = self.tasks.setdefault(task, len(self.tasks))
        episode_index = len(self.rows)
        cols = {name: [] for name in self.schema.names}
        states, actions_all, rewards, means, weights = [], [], [], {k: [] for k in self.cameras}, []
        for r in records:
            state = from_proto(r.observation.state).astype(np.float32)
            actions = from_proto(r.actions).astype(np.float32)
            self._check(r, state, actions)
            n = len(actions)
            for key, cam in self.cameras.items():
                img = from_proto(r.observation.images[cam])
                cols[key] += [{"bytes": png_bytes(img), "path": None}] * n
                means[key].append(img.reshape(-1, img.shape[2]).mean(0) / 255.0)
            weights.append(n)
            states.append(np.broadcast_to(state, (n, self.state_dim)))
            actions_all.append(actions)
            rewards += [0.0] * (n - 1) + [float(r.reward)]
            cols["tether.policy_version"] += [r.policy_version] * n
            cols["tether.chunk_seq"] += [r.seq] * n
            cols["tether.human_intervention"] += [r.human_intervention] * n
        length = sum(weights)
        frame_index = np.arange(length, dtype=np.int64)
        last = frame_index == length - 1
        cols.update({
            "observation.state": np.concatenate(states), "action": np.concatenate(actions_all),
            "timestamp": (frame_index / self.fps).astype(np.float32), "frame_index": frame_index,
            "episode_index": np.full(length, episode_index, np.int64),
            "index": self.frames + frame_index, "task_index": np.full(length, task_index, np.int64),
            "next.reward": np.asarray(rewards, np.float32),
            "next.done": last & bool(meta["terminated"] or meta["truncated"]),
            "next.success": last & bool(meta["success"])})
        table = pa.table({name: self._column(name, cols[name]) for name in self.schema.names},
                         schema=self.schema)
        chunk, file = self.writer.write(table)
        for name, stat in self.stats.items():
            if name in self.cameras:
                stat.add(np.stack(means[name]), weights)
            else:
                stat.add(cols[name])
        row = {"episode_index": episode_index, "tasks": [task], "length": length,
               "data/chunk_index": chunk, "data/file_index": file,
               "dataset_from_index": self.frames, "dataset_to_index": self.frames + length,
               "meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
               "tether/robot_id": meta["robot_id"], "tether/episode_id": meta["episode_id"],
               "tether/task": meta["task"], "tether/success": bool(meta["success"]),
               "tether/min_version": meta["min_version"], "tether/max_version": meta["max_version"]}
        for name in ("observation.state", "action"):
            ep = _Stats()
            ep.add(cols[name])
            for stat, value in ep.as_dict().items():
                row[f"stats/{name}/{stat}"] = value
        self.rows.append(row)
        self.frames += length

    def _column(self, name: str, values) -> pa.Array:
        field = self.schema.field(name)
        if name in ("observation.state", "action"):
            flat = pa.array(np.ascontiguousarray(values, np.float32).reshape(-1))
            return pa.FixedSizeListArray.from_arrays(flat, field.type.list_size)
        return pa.array(values, field.type)

    def finish(self, robot_type: str | None) -> dict:
        """Write the metadata files; returns info.json's content."""
        self.writer.close()
        meta = self.root / "meta"
        path = self.root / EPISODES_PATH.format(chunk_index=0, file_index=0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(self.rows), path)
        tasks = pa.table({"task_index": pa.array(list(self.tasks.values()), pa.int64()),
                          "task": pa.array(list(self.tasks), pa.string())})
        pq.write_table(tasks.replace_schema_metadata({b"pandas": json.dumps(_PANDAS_TASKS)}),
                       meta / "tasks.parquet")
        (meta / "stats.json").write_text(json.dumps(
            {name: s.as_dict() for name, s in self.stats.items()}, indent=1))
        features = {
            "observation.state": _feature("float32", [self.state_dim],
                                          [f"state_{i}" for i in range(self.state_dim)]),
            "action": _feature("float32", [self.action_dim],
                               [f"action_{i}" for i in range(self.action_dim)]),
            **{k: _feature("image", shape, ["height", "width", "channels"])
               for k, shape in self.image_shapes.items()},
            "timestamp": _feature("float32", [1]), "frame_index": _feature("int64", [1]),
            "episode_index": _feature("int64", [1]), "index": _feature("int64", [1]),
            "task_index": _feature("int64", [1]), "next.reward": _feature("float32", [1]),
            "next.done": _feature("bool", [1]), "next.success": _feature("bool", [1]),
            "tether.policy_version": _feature("int64", [1]),
            "tether.chunk_seq": _feature("int64", [1]),
            "tether.human_intervention": _feature("bool", [1])}
        info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
                "total_episodes": len(self.rows), "total_frames": self.frames,
                "total_tasks": len(self.tasks), "chunks_size": CHUNKS_SIZE,
                "data_files_size_in_mb": round(self.writer.limit / 1e6),
                "video_files_size_in_mb": 0, "fps": self.fps,
                "splits": {"train": f"0:{len(self.rows)}"}, "data_path": DATA_PATH,
                "video_path": None, "features": features}
        (meta / "info.json").write_text(json.dumps(info, indent=4))
        return info


# pandas reads tasks.parquet with the task text as the index, as LeRobot expects
_PANDAS_TASKS = {
    "index_columns": ["task"],
    "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                        "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
    "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                 "numpy_type": "int64", "metadata": None},
                {"name": "task", "field_name": "task", "pandas_type": "unicode",
                 "numpy_type": "object", "metadata": None}],
    "creator": {"library": "pyarrow", "version": pa.__version__}, "pandas_version": "2.2.0"}


def _store_dir(data: pathlib.Path) -> pathlib.Path:
    for candidate in (data / "experience", data):
        if (candidate / "catalog.sqlite").is_file():
            return candidate
    raise FileNotFoundError(f"{data} holds no experience store (no experience/catalog.sqlite); "
                            f"pass the learner's --data directory")


def _registry_defaults(data: pathlib.Path) -> tuple[float | None, str | None]:
    """(control rate, robot) of the learner's latest published version, if there is one."""
    try:
        latest = int((data / "registry" / "LATEST").read_text().strip())
        manifest = json.loads((data / "registry" / "versions" / f"v{latest:06d}" /
                               "manifest.json").read_text())
        return float(manifest["control_rate_hz"]), str(manifest.get("robot") or "") or None
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def export(data: str | os.PathLike, out: str | os.PathLike, *, robot: str | None = None,
           task: str | None = None, min_version: int | None = None,
           successful_only: bool = False, include_incomplete: bool = False,
           fps: float | None = None, data_file_mb: float = 100.0) -> dict:
    """Export the selected episodes; returns info.json's content. See the module docstring."""
    data, out = pathlib.Path(data), pathlib.Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} exists and is not an empty directory; pick a new one")
    rate, robot_type = _registry_defaults(data)
    fps = float(fps or rate or DEFAULT_FPS)
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps}")
    store = ExperienceStore(_store_dir(data), readonly=True)
    try:
        selected = {(e["robot_id"], e["episode_id"]): e for e in store.episodes(
            robot=robot, task=task, min_version=min_version, successful_only=successful_only,
            complete_only=not include_incomplete)}
        if not selected:
            raise LookupError(f"no episode in {data} matches robot={robot!r} task={task!r} "
                              f"min_version={min_version} successful_only={successful_only} "
                              f"include_incomplete={include_incomplete}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            info = _write(store, selected, tmp, fps, data_file_mb, robot_type)
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        store.close()
    return info


def _write(store: ExperienceStore, selected: dict, root: pathlib.Path, fps: float,
           data_file_mb: float, robot_type: str | None) -> dict:
    """Stream the store once; an episode is written as soon as all its records were seen."""
    pending: dict[tuple[str, str], list[pb.ChunkRecord]] = {}
    episodes: _Episodes | None = None
    for table in store.scan(["robot_id", "episode_id", "record"]):
        for robot_id, episode_id, blob in zip(table.column("robot_id").to_pylist(),
                                              table.column("episode_id").to_pylist(),
                                              table.column("record").to_pylist()):
            meta = selected.get((robot_id, episode_id))
            if meta is None:
                continue
            records = pending.setdefault((robot_id, episode_id), [])
            records.append(pb.ChunkRecord.FromString(blob))
            if len(records) == meta["n_records"]:
                if episodes is None:
                    episodes = _Episodes(root, records[0], fps, data_file_mb)
                episodes.add(meta, pending.pop((robot_id, episode_id)))
    if pending:  # the catalog counted records the segments do not hold: refuse, say which
        raise RuntimeError(f"{len(pending)} selected episodes are incomplete in the segments, "
                           f"e.g. {next(iter(pending))}; the store is damaged")
    return episodes.finish(robot_type)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tether export", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the learner's --data directory")
    p.add_argument("--out", required=True, help="new (or empty) directory for the dataset")
    p.add_argument("--robot", help="only this robot's episodes")
    p.add_argument("--task", help="only episodes of this task (the record's task id)")
    p.add_argument("--min-version", type=int, help="only episodes run entirely on policy "
                                                   "versions >= this")
    p.add_argument("--successful-only", action="store_true", help="only successful episodes")
    p.add_argument("--include-incomplete", action="store_true",
                   help="also episodes that have not ended (default: ended episodes only)")
    p.add_argument("--fps", type=float, help="control rate (default: the latest policy's)")
    p.add_argument("--data-file-mb", type=float, default=100.0, help="size per data file")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        info = export(args.data, args.out, robot=args.robot, task=args.task,
                      min_version=args.min_version, successful_only=args.successful_only,
                      include_incomplete=args.include_incomplete, fps=args.fps,
                      data_file_mb=args.data_file_mb)
    except (OSError, LookupError, ValueError, RuntimeError) as e:
        print(f"tether export: {e}", file=sys.stderr)
        return 2
    print(f"exported {info['total_episodes']} episodes, {info['total_frames']} frames, "
          f"{info['total_tasks']} tasks to {pathlib.Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
