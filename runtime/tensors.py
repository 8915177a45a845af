"""numpy <-> wire ``Tensor`` (dtype, shape, raw bytes). Never pickle."""
from __future__ import annotations

import numpy as np

from tether.wire import tether_pb2 as pb

ALLOWED_DTYPES = frozenset({"float32", "float64", "uint8", "int32", "int64", "bool"})
MAX_TENSOR_BYTES = 16 * 1024 * 1024


def to_proto(array: np.ndarray) -> pb.Tensor:
    a = np.ascontiguousarray(array)
    if a.dtype.name not in ALLOWED_DTYPES:
        raise ValueError(f"tensor dtype {a.dtype.name} not allowed on the wire; "
                         f"use one of {sorted(ALLOWED_DTYPES)}")
    return pb.Tensor(dtype=a.dtype.name, shape=list(a.shape), data=a.astype(a.dtype.newbyteorder("<")).tobytes())


def from_proto(t: pb.Tensor) -> np.ndarray:
    """Decode and validate: a tensor whose bytes do not match dtype x shape is refused."""
    if t.dtype not in ALLOWED_DTYPES:
        raise ValueError(f"tensor dtype {t.dtype!r} not allowed; use one of {sorted(ALLOWED_DTYPES)}")
    shape = tuple(int(s) for s in t.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"tensor shape {shape} has a negative dimension")
    dtype = np.dtype(t.dtype).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected > MAX_TENSOR_BYTES or expected != len(t.data):
        raise ValueError(f"tensor of dtype {t.dtype} and shape {shape} needs {expected} bytes, "
                         f"got {len(t.data)} (limit {MAX_TENSOR_BYTES})")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
