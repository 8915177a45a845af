"""The robot reads ArtifactChunk bytes in place (runtime/fetch.py parse_chunk): it must agree with
protobuf on every encoding a learner may send, and refuse malformed bytes (a known field with the
wrong wire type too, which protobuf would keep as an unknown field)."""
import pytest

from runtime.fetch import parse_chunk
from tether.wire import tether_pb2 as pb


def _parsed(raw: bytes):
    offset, data, last = parse_chunk(raw)
    return offset, bytes(data), last


@pytest.mark.parametrize("offset,data,last", [
    (0, b"", False),                       # every field at its default: an empty message
    (0, b"abc", True),
    (1 << 20, bytes(range(256)) * 4097, False),
    ((1 << 62) + 5, b"\x00" * 7, True),
    (-3, b"x", False),                     # int64 on the wire as 10-byte two's complement
])
def test_agrees_with_protobuf(offset, data, last):
    raw = pb.ArtifactChunk(offset=offset, data=data, last=last).SerializeToString()
    assert _parsed(raw) == (offset, data, last)


def test_field_order_repeats_and_unknown_fields_follow_proto3():
    a = pb.ArtifactChunk(last=True).SerializeToString()
    b = pb.ArtifactChunk(offset=9, data=b"old").SerializeToString()
    c = pb.ArtifactChunk(data=b"new").SerializeToString()
    unknown = bytes([0x20, 0x05, 0x2A, 0x02]) + b"zz" + bytes([0x35]) + b"\x01\x02\x03\x04"
    raw = a + unknown + b + c   # concatenated messages merge; the last scalar wins
    expected = pb.ArtifactChunk.FromString(raw)
    assert _parsed(raw) == (expected.offset, expected.data, expected.last) == (9, b"new", True)


def test_the_data_is_a_view_not_a_copy():
    raw = pb.ArtifactChunk(offset=4, data=b"q" * 1000).SerializeToString()
    _, data, _ = parse_chunk(raw)
    assert data.obj is raw and len(data) == 1000


@pytest.mark.parametrize("raw", [
    bytes([0x12, 0x05]) + b"abc",          # data claims 5 bytes, 3 left
    bytes([0x08, 0x80]),                   # offset's varint never ends
    bytes([0x08]) + b"\xff" * 11,          # a varint longer than 64 bits
    bytes([0x0A, 0x01, 0x00]),             # offset sent length-delimited
    bytes([0x10, 0x01]),                   # data sent as a varint
    bytes([0x23]),                         # a group (wire type 3)
    bytes([0x21]) + b"\x00" * 3,           # a fixed64 field cut short
])
def test_malformed_bytes_raise(raw):
    with pytest.raises(ValueError):
        parse_chunk(raw)
