"""Validation of experience before it is stored: a batch is accepted whole or refused whole.

Ingest runs this on every record (20,000+ a second on two cores), so tensors are checked from
their dtype, shape and byte count without building numpy arrays, and the finiteness of every
float tensor of a batch is checked with one numpy call over their joined bytes. Only when that
call finds a NaN does the slow path look for the record and field to name in the error.
"""
from __future__ import annotations

import math

import numpy as np

from runtime.tensors import ALLOWED_DTYPES, MAX_TENSOR_BYTES
from tether.wire import tether_pb2 as pb

MAX_RECORDS_PER_BATCH = 1024
MAX_ID_CHARS = 128
MAX_TASK_CHARS = 256
MAX_INSTRUCTION_CHARS = 1024
MAX_ACTION_ROWS = 256
MAX_ACTION_DIM = 64
MAX_CAMERAS = 8
MAX_SEQ = 2**63 - 1  # the catalog's integers are signed 64-bit

_ITEMSIZE = {name: np.dtype(name).itemsize for name in ALLOWED_DTYPES}
_FLOATS = {"float32": np.float32, "float64": np.float64}
_FLOAT_SIZE = {"float32": 4, "float64": 8}


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise ValueError(f"{name} is {value}; it must be a finite number")


def _check_id(name: str, value: str) -> None:
    if not value:
        raise ValueError(f"{name} is empty; every record needs a non-empty {name}")
    if len(value) > MAX_ID_CHARS:
        raise ValueError(f"{name} has {len(value)} characters (limit {MAX_ID_CHARS})")


def _shape(name: str, t: pb.Tensor, floats: list | None) -> tuple[int, ...]:
    """The tensor's shape after checking dtype and byte count; float data goes to ``floats``."""
    itemsize = _ITEMSIZE.get(t.dtype)
    if itemsize is None:
        raise ValueError(f"{name}: tensor dtype {t.dtype!r} not allowed; use one of "
                         f"{sorted(ALLOWED_DTYPES)}")
    shape = t.shape
    if shape and min(shape) < 0:
        raise ValueError(f"{name}: tensor shape {tuple(shape)} has a negative dimension")
    expected = math.prod(shape) * itemsize
    if expected > MAX_TENSOR_BYTES or expected != len(t.data):
        raise ValueError(f"{name}: tensor of dtype {t.dtype} and shape {tuple(shape)} needs "
                         f"{expected} bytes, got {len(t.data)} (limit {MAX_TENSOR_BYTES})")
    if floats is not None and t.dtype in _FLOATS:
        floats.append((name, t.dtype, t.data))
    return shape


def _f32(dtype: str, data: bytes) -> bytes:
    if dtype == "float32":
        return data
    return np.frombuffer(data, "<f8").astype("<f4").tobytes()


def _tensor_error(name: str, t: pb.Tensor, expected: str) -> None:
    """Raise the precise error for a tensor the fast path refused."""
    shape = _shape(name, t, None)  # raises for a bad dtype or byte count
    raise ValueError(f"{name} is {t.dtype} {tuple(shape)}; expected {expected}")


# The typed fields of a valid record, as ``validate_batch`` returns them: the store's columns.
ROW_FIELDS = ("robot_id", "episode_id", "seq", "policy_version", "weight_sha256", "task",
              "instruction", "timestamp", "start_tick", "reward", "terminated", "truncated",
              "success", "human_intervention", "behaviour_log_prob", "prefix_len",
              "underrun_ticks", "state", "actions", "action_dim", "offsets", "interventions",
              "record")


def _check_structure(r: pb.ChunkRecord, floats: list) -> tuple:
    """Check one record; return its ``ROW_FIELDS``. Validation reads every field anyway and
    ingest cannot afford to read them twice; each check is one fast condition, and only when
    it fails is the precise error worked out."""
    robot_id, episode_id, seq, task = r.robot_id, r.episode_id, r.seq, r.task
    if not (0 < len(robot_id) <= MAX_ID_CHARS and 0 < len(episode_id) <= MAX_ID_CHARS):
        _check_id("robot_id", robot_id)
        _check_id("episode_id", episode_id)
    if seq > MAX_SEQ:
        raise ValueError(f"seq {seq} exceeds {MAX_SEQ}")
    if len(task) > MAX_TASK_CHARS:
        raise ValueError(f"task has {len(task)} characters (limit {MAX_TASK_CHARS})")
    obs = r.observation
    reward, log_prob, timestamp = r.reward, r.behaviour_log_prob, obs.timestamp
    if not (math.isfinite(reward) and math.isfinite(log_prob) and math.isfinite(timestamp)):
        _finite("reward", reward)
        _finite("behaviour_log_prob", log_prob)
        _finite("observation.timestamp", timestamp)
    instruction = obs.instruction
    if len(instruction) > MAX_INSTRUCTION_CHARS:
        raise ValueError(f"instruction has {len(instruction)} characters "
                         f"(limit {MAX_INSTRUCTION_CHARS})")
    images = obs.images
    if not 0 < len(images) <= MAX_CAMERAS:
        raise ValueError(f"observation has {len(images)} camera images; need 1..{MAX_CAMERAS}")
    for cam in images:  # not .items(): its iterator is Python code
        t = images[cam]
        shape = t.shape
        if len(shape) == 3 and t.dtype == "uint8" and 0 < len(cam) <= MAX_ID_CHARS:
            h, w, c = shape[0], shape[1], shape[2]  # indexing: unpacking iterates, 3x slower
            if h >= 0 and w >= 0 and c >= 0 and h * w * c == len(t.data) <= MAX_TENSOR_BYTES:
                continue
        if not 0 < len(cam) <= MAX_ID_CHARS:
            raise ValueError(f"observation.images[{cam[:64]!r}]: camera names need "
                             f"1..{MAX_ID_CHARS} characters")
        _tensor_error(f"observation.images[{cam!r}]", t, "HxWxC uint8 (images are HxWxC uint8)")
    state = obs.state
    s_dtype, s_data, s_shape = state.dtype, state.data, state.shape
    size = _FLOAT_SIZE.get(s_dtype)
    if not (size and len(s_shape) == 1 and s_shape[0] * size == len(s_data) <= MAX_TENSOR_BYTES):
        _tensor_error("observation.state", state, "a float vector")
    floats.append(("observation.state", s_dtype, s_data))
    actions = r.actions
    a_dtype, a_data, a_shape = actions.dtype, actions.data, actions.shape
    size = _FLOAT_SIZE.get(a_dtype)
    if not (size and len(a_shape) == 2):
        _tensor_error("actions", actions, "float [n, A]")
    n, a_dim = a_shape[0], a_shape[1]
    if not (1 <= n <= MAX_ACTION_ROWS and 1 <= a_dim <= MAX_ACTION_DIM):
        raise ValueError(f"actions shape {(n, a_dim)}: need 1..{MAX_ACTION_ROWS} rows and "
                         f"1..{MAX_ACTION_DIM} dims")
    if n * a_dim * size != len(a_data):
        _shape("actions", actions, None)
    floats.append(("actions", a_dtype, a_data))
    offsets = r.offsets[:]  # a list; slicing is 4x faster than list() on a repeated field
    if len(offsets) != n or offsets[0] < 0 or sorted(set(offsets)) != offsets:
        if len(offsets) != n:
            raise ValueError(f"{len(offsets)} offsets for {n} executed actions; need one per "
                             f"action")
        raise ValueError(f"offsets {offsets} must be >= 0 and strictly increasing")
    if r.HasField("policy_actions"):
        proposed = r.policy_actions
        q_dtype, q_data = proposed.dtype, proposed.data
        if not (q_dtype == a_dtype and proposed.shape == a_shape and len(q_data) == len(a_data)):
            _shape("policy_actions", proposed, None)
            raise ValueError(f"policy_actions is {q_dtype} {tuple(proposed.shape)}; expected "
                             f"{a_dtype} {(n, a_dim)}, the shape of actions")
        if r.human_intervention:
            raise ValueError("a human-intervention record carries policy_actions; an "
                             "operator's rows are not the policy's")
        floats.append(("policy_actions", q_dtype, q_data))
    prefix_len = r.prefix_len
    if r.HasField("prefix"):
        prefix = r.prefix
        p_shape, p_dtype, p_data = prefix.shape, prefix.dtype, prefix.data
        size = _ITEMSIZE.get(p_dtype)
        if not (size and len(p_shape) == 2 and p_shape[1] == a_dim
                and p_shape[0] * a_dim * size == len(p_data) <= MAX_TENSOR_BYTES):
            shape = _shape("prefix", prefix, None)
            raise ValueError(f"prefix shape {tuple(shape)} does not match actions dim {a_dim}; "
                             f"expected [H, {a_dim}]")
        if p_dtype in _FLOAT_SIZE:
            floats.append(("prefix", p_dtype, p_data))
        if not 0 <= prefix_len <= p_shape[0] or offsets[-1] >= p_shape[0]:
            raise ValueError(f"prefix_len {prefix_len} / offsets {offsets} do not fit a "
                             f"chunk of {p_shape[0]} rows")
    elif prefix_len != 0:
        raise ValueError(f"prefix_len {prefix_len} without a prefix tensor")
    verifier = r.verifier
    return (robot_id, episode_id, seq, r.policy_version, r.weight_sha256, task, instruction,
            timestamp, r.start_tick, reward, r.terminated, r.truncated, r.success,
            r.human_intervention, log_prob, prefix_len, r.underrun_ticks, _f32(s_dtype, s_data),
            _f32(a_dtype, a_data), a_dim, offsets, verifier.actions_clamped + verifier.rejected,
            r.SerializeToString(deterministic=True))


def _all_finite(floats: list) -> bool:
    for dtype, np_type in _FLOATS.items():
        joined = b"".join(data for _, d, data in floats if d == dtype)
        if joined and not np.isfinite(np.frombuffer(joined, np_type)).all():
            return False
    return True


def _first_non_finite(floats: list) -> str | None:
    for name, dtype, data in floats:
        if not np.isfinite(np.frombuffer(data, _FLOATS[dtype])).all():
            return name
    return None


def validate_record(r: pb.ChunkRecord) -> None:
    """Raise ValueError naming the first thing wrong with one record."""
    floats: list = []
    _check_structure(r, floats)
    if not _all_finite(floats):
        raise ValueError(f"{_first_non_finite(floats)} holds NaN or infinite values")


def validate_batch(batch: pb.ExperienceBatch) -> list[tuple]:
    """Refuse the whole batch (ValueError naming the record) if any record is bad; else return
    each record's ``ROW_FIELDS``."""
    _check_id("batch robot_id", batch.robot_id)
    records = batch.records
    if len(records) > MAX_RECORDS_PER_BATCH:
        raise ValueError(f"batch holds {len(records)} records (limit "
                         f"{MAX_RECORDS_PER_BATCH}); send smaller batches")
    floats: list = []
    rows = []
    for i, r in enumerate(records):
        if r.robot_id != batch.robot_id:
            raise ValueError(f"{_where(i, r)}: robot_id {r.robot_id!r} differs from the batch's "
                             f"{batch.robot_id!r}; a robot may only write its own experience")
        try:
            rows.append(_check_structure(r, floats))
        except ValueError as e:
            raise ValueError(f"{_where(i, r)}: {e}") from None
    if not _all_finite(floats):
        for i, r in enumerate(records):  # slow path: name the record
            try:
                validate_record(r)
            except ValueError as e:
                raise ValueError(f"{_where(i, r)}: {e}") from None
    return rows


def _where(i: int, r: pb.ChunkRecord) -> str:
    return f"record {i} (episode {r.episode_id[:64]!r}, seq {r.seq})"
