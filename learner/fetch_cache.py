"""Serialized ``ArtifactChunk`` messages of published files, built once and sent to every robot
that fetches the same version.

A rollout sends one version to the whole fleet at once: without this, the learner reads each
chunk from its file, copies it into a message and serializes it again for every robot (while
holding the GIL). A published file never changes, and the key holds its sha256 besides
(version, name, offset), so a cached chunk cannot be stale. Chunks start at multiples of the
chunk size; a fetch resumed at another offset gets one uncached chunk up to the next multiple.
The first request for a chunk builds it while concurrent requests for the same chunk wait for
it (one read, one serialization). Least recently used chunks go beyond ``max_bytes``.
"""
from __future__ import annotations

import collections
import pathlib
import threading

from tether.wire import tether_pb2 as pb


def chunk_bytes(offset: int, data: bytes, last: bool) -> bytes:
    return pb.ArtifactChunk(offset=offset, data=data, last=last).SerializeToString()


class _Entry:
    __slots__ = ("ready", "data")

    def __init__(self):
        self.ready = threading.Event()
        self.data: bytes | None = None


class FetchCache:
    def __init__(self, max_bytes: int, chunk: int):
        if chunk < 1 or max_bytes < 0:
            raise ValueError(f"chunk must be >= 1 and max_bytes >= 0, got {chunk}, {max_bytes}")
        self.max_bytes, self.chunk = int(max_bytes), int(chunk)
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def chunks(self, path: pathlib.Path, key: tuple, size: int, offset: int):
        """Serialized chunks of the file at ``path`` (``size`` bytes, identified by ``key``:
        version, name, sha256; None: not cached) from ``offset`` to its end; the last one has
        ``last`` set. An empty file, or ``offset == size``, gives one empty last chunk."""
        if offset >= size:
            yield chunk_bytes(offset, b"", True)
            return
        with open(path, "rb") as f:
            while offset < size:
                end = min(size, (offset // self.chunk + 1) * self.chunk)
                if key is None or offset % self.chunk:  # (resumed: to the next boundary)
                    f.seek(offset)
                    yield chunk_bytes(offset, f.read(end - offset), end >= size)
                else:
                    yield self._get(key + (offset,), f, offset, end, size)
                offset = end

    def _get(self, key: tuple, f, offset: int, end: int, size: int) -> bytes:
        with self._lock:
            entry = self._entries.get(key)
            build = entry is None
            if build:
                entry = self._entries[key] = _Entry()
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
        if not build:
            entry.ready.wait()
            if entry.data is not None:
                return entry.data
            # the builder failed: read it ourselves, uncached
        try:
            f.seek(offset)
            data = f.read(end - offset)
            if len(data) != end - offset:
                raise OSError(f"{f.name} ends at byte {offset + len(data)}, expected {size}")
            out = chunk_bytes(offset, data, end >= size)
        except BaseException:
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            entry.ready.set()
            raise
        entry.data = out  # for the requests waiting on it, even if it was evicted meanwhile
        with self._lock:
            if self._entries.get(key) is entry:
                self.bytes += len(out)
                while self.bytes > self.max_bytes and self._entries:
                    _, old = self._entries.popitem(last=False)
                    self.bytes -= len(old.data) if old.data is not None else 0
        entry.ready.set()
        return out
