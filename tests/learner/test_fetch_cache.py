"""The learner's cache of serialized artifact chunks (learner/fetch_cache.py)."""
import os
import threading

import pytest

from learner.fetch_cache import FetchCache
from tether.wire import tether_pb2 as pb

CHUNK = 1000


@pytest.fixture
def published(tmp_path):
    path = tmp_path / "policy.onnx.data"
    path.write_bytes(os.urandom(3 * CHUNK + 123))
    return path, ("v", 7, "policy.onnx.data", "ab" * 32)


def _messages(cache, path, key, offset=0):
    return [pb.ArtifactChunk.FromString(raw) for raw in
            cache.chunks(path, key, path.stat().st_size, offset)]


def test_chunks_cover_the_file_and_the_second_fetch_is_served_from_memory(published):
    path, key = published
    cache = FetchCache(max_bytes=1 << 20, chunk=CHUNK)
    first = list(cache.chunks(path, key, path.stat().st_size, 0))
    msgs = [pb.ArtifactChunk.FromString(raw) for raw in first]
    assert [m.offset for m in msgs] == [0, 1000, 2000, 3000]
    assert [m.last for m in msgs] == [False, False, False, True]
    assert b"".join(m.data for m in msgs) == path.read_bytes()
    assert (cache.misses, cache.hits) == (4, 0)
    second = list(cache.chunks(path, key, path.stat().st_size, 0))
    assert all(a is b for a, b in zip(first, second)) and (cache.misses, cache.hits) == (4, 4)


def test_a_resumed_fetch_reads_to_the_next_boundary_then_shares_the_cached_chunks(published):
    path, key = published
    cache = FetchCache(max_bytes=1 << 20, chunk=CHUNK)
    msgs = _messages(cache, path, key, offset=1500)
    assert [m.offset for m in msgs] == [1500, 2000, 3000]
    assert b"".join(m.data for m in msgs) == path.read_bytes()[1500:]
    assert cache.misses == 2  # the partial chunk is not cached
    end = _messages(cache, path, key, offset=path.stat().st_size)
    assert [(m.offset, m.data, m.last) for m in end] == [(path.stat().st_size, b"", True)]


def test_concurrent_fetches_build_each_chunk_once(published):
    path, key = published
    cache = FetchCache(max_bytes=1 << 20, chunk=CHUNK)
    got, start = [], threading.Barrier(8)

    def fetch():
        start.wait()
        got.append(list(cache.chunks(path, key, path.stat().st_size, 0)))

    threads = [threading.Thread(target=fetch) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.misses == 4 and cache.hits == 28
    assert all(all(a is b for a, b in zip(got[0], g)) for g in got)  # the same bytes objects


def test_memory_stays_bounded_and_evicted_chunks_are_rebuilt(published):
    path, key = published
    cache = FetchCache(max_bytes=2 * CHUNK + 50, chunk=CHUNK)
    for _ in range(3):
        assert b"".join(m.data for m in _messages(cache, path, key)) == path.read_bytes()
        assert cache.bytes <= cache.max_bytes
    assert cache.misses > 4  # the least recently used went and came back


def test_uncached_key_and_a_file_cut_short(published, tmp_path):
    path, key = published
    cache = FetchCache(max_bytes=1 << 20, chunk=CHUNK)
    assert b"".join(m.data for m in _messages(cache, path, None)) == path.read_bytes()
    assert cache.misses == cache.hits == cache.bytes == 0
    with pytest.raises(OSError, match="ends at byte"):  # the file shrank under its manifest
        list(cache.chunks(path, key, path.stat().st_size + CHUNK, 0))
    assert b"".join(m.data for m in _messages(cache, path, key)) == path.read_bytes()
