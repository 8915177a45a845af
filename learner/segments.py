"""Experience segments: the columnar files that hold the records, in Arrow and Parquet.

A segment starts as an append-only file of Arrow IPC *frames* (``seg-00000001.arrows``): each
group commit appends one frame, a complete IPC stream holding that group's records. Which bytes
of the file count is decided by the catalog alone (it stores each frame's offset and length), so
a torn or uncommitted tail is simply ignored and cut off when the store reopens. A full segment
is sealed: its frames are rewritten as one Parquet file (``seg-00000001.parquet``) with row
groups for random access, and the IPC file is deleted once the catalog points at the Parquet.

Every row keeps the serialized ``ChunkRecord`` (``record``, so ``read`` returns exactly what was
sent) next to typed columns for analytics and export. Images are only in ``record``.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from learner.validate import ROW_FIELDS
from runtime.artifact import fsync_dir

IPC_SUFFIX = ".arrows"
PARQUET_SUFFIX = ".parquet"
ROW_GROUP_ROWS = 4096
# Sealing competes with ingest for the CPU: lz4 costs a third of zstd's time for nearly its
# ratio here, dictionaries only where values repeat, no statistics for blobs and vectors.
PARQUET_COMPRESSION = "lz4"
_DICTIONARY_COLUMNS = ["robot_id", "episode_id", "weight_sha256", "task", "instruction"]

SCHEMA = pa.schema([
    ("rowid", pa.int64()),
    ("robot_id", pa.string()),
    ("episode_id", pa.string()),
    ("seq", pa.int64()),
    ("policy_version", pa.int64()),
    ("weight_sha256", pa.string()),
    ("task", pa.string()),
    ("instruction", pa.string()),
    ("timestamp", pa.float64()),
    ("start_tick", pa.int64()),
    ("reward", pa.float32()),
    ("terminated", pa.bool_()),
    ("truncated", pa.bool_()),
    ("success", pa.bool_()),
    ("human_intervention", pa.bool_()),
    ("behaviour_log_prob", pa.float64()),
    ("prefix_len", pa.int32()),
    ("underrun_ticks", pa.int32()),
    ("state", pa.list_(pa.float32())),
    ("actions", pa.list_(pa.float32())),  # [n, action_dim] flattened row-major
    ("action_dim", pa.int32()),
    ("offsets", pa.list_(pa.int32())),
    # envelope interventions + verifier rejections of the chunk (the canary's safety measure);
    # null in segments written before the column existed
    ("interventions", pa.int32()),
    ("record", pa.binary()),
])
_STATISTICS_COLUMNS = [n for n in SCHEMA.names
                       if n not in ("state", "actions", "offsets", "record")]
assert tuple(SCHEMA.names[1:]) == ROW_FIELDS, "segment schema and validated rows disagree"


def _float_lists(chunks: list[bytes]) -> pa.Array:
    lengths = np.fromiter((len(c) // 4 for c in chunks), np.int32, len(chunks))
    offsets = np.zeros(len(chunks) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.frombuffer(b"".join(chunks), np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def build_table(rows: list[tuple], first_rowid: int) -> pa.Table:
    """Rows (``learner.validate.ROW_FIELDS``) -> a table with consecutive rowids from ``first_rowid``."""
    cols = list(zip(*rows))
    arrays = [pa.array(np.arange(first_rowid, first_rowid + len(rows), dtype=np.int64))]
    for i, field in enumerate(list(SCHEMA)[1:]):
        if field.name in ("state", "actions"):
            arrays.append(_float_lists(cols[i]))
        else:
            arrays.append(pa.array(cols[i], field.type))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def conform(table: pa.Table, names: list[str] | None = None) -> pa.Table:
    """``table`` with the columns ``names`` (default: all of SCHEMA) in that order; a column a
    segment written by an older version lacks reads as nulls."""
    names = SCHEMA.names if names is None else names
    have = set(table.schema.names)
    if all(n in have for n in names):
        return table.select(names)
    cols = [table.column(n) if n in have else pa.nulls(table.num_rows, SCHEMA.field(n).type)
            for n in names]
    return pa.Table.from_arrays(cols, schema=pa.schema([SCHEMA.field(n) for n in names]))


def encode_frame(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, SCHEMA) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def decode_frame(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def segment_name(segment_id: int, suffix: str) -> str:
    return f"seg-{segment_id:08d}{suffix}"


def sync_file(fd: int) -> None:
    # fdatasync also flushes the file size, which is all an append changes besides the data
    getattr(os, "fdatasync", os.fsync)(fd)


class ActiveSegment:
    """The open IPC segment the writer appends frames to; ``end`` = bytes the catalog owns."""

    def __init__(self, directory: pathlib.Path, segment_id: int, end: int, *, create: bool):
        self.id = segment_id
        self.path = directory / segment_name(segment_id, IPC_SUFFIX)
        flags = os.O_RDWR | (os.O_CREAT | os.O_TRUNC if create else 0)
        self.fd = os.open(self.path, flags, 0o644)
        self.end = end
        if create:
            fsync_dir(directory)  # the name must be durable before the catalog refers to it
        elif os.fstat(self.fd).st_size > end:
            os.ftruncate(self.fd, end)  # a torn or uncommitted tail: never acknowledged
            sync_file(self.fd)

    def write(self, frame: bytes) -> int:
        """Write a frame at the committed end and make it durable; returns its offset.

        ``end`` moves only when the catalog commit succeeds (``committed``)."""
        view, offset = memoryview(frame), self.end
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        sync_file(self.fd)
        return self.end

    def committed(self, length: int) -> None:
        self.end += length

    def close(self) -> None:
        os.close(self.fd)


def read_frame(path: pathlib.Path, offset: int, length: int) -> pa.Table:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise OSError(f"{path}: frame at {offset} has {len(data)} of {length} bytes; "
                      f"the segment is shorter than the catalog says")
    return decode_frame(data)


def seal_to_parquet(directory: pathlib.Path, segment_id: int,
                    frames: list[tuple[int, int]]) -> tuple[pathlib.Path, int]:
    """Rewrite an IPC segment's frames [(offset, length)] as Parquet; returns (path, bytes).

    Written to a temporary name, fsynced, renamed and the directory fsynced: the caller then
    points the catalog at it. A crash before that leaves an orphan the store removes on open.
    """
    src = directory / segment_name(segment_id, IPC_SUFFIX)
    table = pa.concat_tables([conform(read_frame(src, off, n)) for off, n in frames])
    dst = directory / segment_name(segment_id, PARQUET_SUFFIX)
    tmp = directory / f".{dst.name}.tmp"
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression=PARQUET_COMPRESSION,
                   use_dictionary=_DICTIONARY_COLUMNS, write_statistics=_STATISTICS_COLUMNS)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, dst)
    fsync_dir(directory)
    return dst, dst.stat().st_size


def parquet_row_groups(path: pathlib.Path) -> list[int]:
    """Rows per row group of a Parquet segment."""
    meta = pq.read_metadata(path)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def read_row_group(path: pathlib.Path, index: int, columns: list[str] | None = None) -> pa.Table:
    f = pq.ParquetFile(path)
    have = set(f.schema_arrow.names)
    wanted = SCHEMA.names if columns is None else columns
    return conform(f.read_row_group(index, columns=[n for n in wanted if n in have]), wanted)
