"""What data-parallel trainer ranks exchange, as plain bytes and tensors (never pickle).

Rank 0 owns the store and the registry; the other ranks keep a mirror of the registry's recent
versions (manifest + checkpoint) so that a Trainer can be built from it and can load the proximal
snapshot of any version it meets, exactly like rank 0 does. Records travel as serialized
ChunkRecords; the trainer config and the optimizer's layout as JSON.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np
import torch

from learner.registry import version_name
from runtime.artifact import MANIFEST, load_manifest, write_atomic
from tether.wire import tether_pb2 as pb


class DistributedError(RuntimeError):
    """A data-parallel rank failed, stopped answering, or left the others out of step."""


# -- records ---------------------------------------------------------------------------------
def encode_records(records: list[pb.ChunkRecord]) -> tuple[np.ndarray, np.ndarray]:
    """(lengths int64[n], payload uint8[sum(lengths)]) of the serialized records."""
    blobs = [r.SerializeToString() for r in records]
    lengths = np.fromiter((len(b) for b in blobs), np.int64, len(blobs))
    payload = np.frombuffer(b"".join(blobs), np.uint8) if blobs else np.zeros(0, np.uint8)
    return lengths, payload


def decode_records(lengths: np.ndarray, payload: bytes | memoryview, lo: int, hi: int
                   ) -> list[pb.ChunkRecord]:
    """Records lo..hi-1 of an encoded list (only those are parsed)."""
    ends = np.cumsum(lengths)
    out = []
    for i in range(lo, hi):
        start = int(ends[i] - lengths[i])
        r = pb.ChunkRecord()
        r.ParseFromString(bytes(payload[start:int(ends[i])]))
        out.append(r)
    return out


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[lo, hi) of ``rank``'s equal share of n records.

    Every rank gets n // world records, so every rank runs the same number of minibatch steps.
    The n % world left over (< world) are the first records of the first episode: dropping
    the start of an episode leaves the returns of the rest intact (they flow back from the end).
    """
    size, skip = divmod(n, world)
    return skip + rank * size, skip + (rank + 1) * size


# -- config ----------------------------------------------------------------------------------
def config_to_json(config) -> bytes:
    return json.dumps(dataclasses.asdict(config), sort_keys=True).encode()


def config_from_json(cls, data: bytes):
    """Rebuild a (possibly nested) frozen config dataclass from config_to_json's bytes."""
    def build(kind, values: dict):
        fields = {f.name: f for f in dataclasses.fields(kind)}
        unknown = set(values) - set(fields)
        if unknown:
            raise DistributedError(f"rank 0's {kind.__name__} has fields {sorted(unknown)} this "
                                   f"rank does not know: run the same tether version on every rank")
        defaults = kind()
        kwargs = {}
        for name, value in values.items():
            current = getattr(defaults, name)
            if dataclasses.is_dataclass(current):
                value = build(type(current), value)
            elif isinstance(current, tuple):
                value = tuple(value)
            kwargs[name] = value
        return kind(**kwargs)
    return build(cls, json.loads(data))


# -- optimizer state -------------------------------------------------------------------------
def optimizer_layout(optimizer: torch.optim.Optimizer) -> tuple[bytes, list[torch.Tensor]]:
    """(JSON layout, tensors in layout order) of an optimizer's state_dict.

    The layout names every tensor's place, shape and dtype and carries the scalar entries and
    the param-group hyperparameters, so a rank can allocate the tensors and receive them."""
    state = optimizer.state_dict()
    tensors, entries, scalars = [], [], []
    for index, slots in sorted(state["state"].items()):
        for key, value in sorted(slots.items()):
            if torch.is_tensor(value):
                dtype = str(value.dtype).removeprefix("torch.")
                entries.append([index, key, list(value.shape), dtype])
                tensors.append(value)
            else:
                scalars.append([index, key, value])
    groups = [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]
    layout = {"tensors": entries, "scalars": scalars, "groups": groups}
    return json.dumps(layout).encode(), tensors


def empty_tensors(layout: bytes) -> list[torch.Tensor]:
    return [torch.empty(shape, dtype=getattr(torch, dtype))
            for _, _, shape, dtype in json.loads(layout)["tensors"]]


def load_optimizer(optimizer: torch.optim.Optimizer, layout: bytes,
                   tensors: list[torch.Tensor]) -> None:
    spec = json.loads(layout)
    own = optimizer.state_dict()["param_groups"]
    if len(own) != len(spec["groups"]):
        raise DistributedError(f"rank 0's optimizer has {len(spec['groups'])} param groups, "
                               f"this rank's {len(own)}: the models differ")
    groups = []
    for mine, theirs in zip(own, spec["groups"]):
        theirs = {k: tuple(v) if isinstance(mine.get(k), tuple) else v for k, v in theirs.items()}
        groups.append({**theirs, "params": mine["params"]})
    state: dict = {}
    for (index, key, _, _), t in zip(spec["tensors"], tensors):
        state.setdefault(index, {})[key] = t
    for index, key, value in spec["scalars"]:
        state.setdefault(index, {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- the registry mirror ---------------------------------------------------------------------
class RegistryMirror:
    """The registry as seen by a trainer rank other than 0: recent versions' manifests and
    checkpoints, copied from rank 0, in the same layout. Read-only to the Trainer: publishing
    and the robots' staleness gate are rank 0's job."""

    def __init__(self, root: str | pathlib.Path, keep: int = 16):
        self.root = pathlib.Path(root)
        shutil.rmtree(self.root, ignore_errors=True)  # a stale mirror must never be trained from
        (self.root / "versions").mkdir(parents=True)
        (self.root / "checkpoints").mkdir()
        self.keep = keep
        self.version = 0  # what rank 0 says is current; the Trainer reads it as latest()
        self.min_version = 0

    def write(self, v: int, manifest: bytes, checkpoint: bytes) -> None:
        d = self.root / "versions" / version_name(v)
        d.mkdir(exist_ok=True)
        write_atomic(d / MANIFEST, manifest)
        if checkpoint:
            write_atomic(self.checkpoint_path(v), checkpoint)
        for old in sorted(self.root.joinpath("versions").iterdir())[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
            self.checkpoint_path(int(old.name[1:])).unlink(missing_ok=True)

    def checkpoint_path(self, v: int) -> pathlib.Path:
        return self.root / "checkpoints" / f"{version_name(v)}.pt"

    def latest(self) -> int:
        return self.version

    def manifest(self, v: int | None = None):
        return load_manifest(self.root / "versions" / version_name(self.version if v is None else v))

    def load_checkpoint(self, v: int | None = None) -> dict | None:
        path = self.checkpoint_path(self.version if v is None else v)
        if not path.exists():
            return None
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        position = (ckpt.get("trainer") or {}).get("position")
        if isinstance(position, dict):
            # this rank has no store and never polls one: resuming must not try to re-read
            # rank 0's store position (an empty position of the same shape)
            ckpt["trainer"]["position"] = {k: [] if isinstance(x, list) else 0
                                           for k, x in position.items()}
        return ckpt

    def set_min_version(self, v: int) -> None:
        """Rank 0 gates the robots; the other ranks' trainers may call this and it does nothing."""

    def __getattr__(self, name):
        raise AttributeError(f"RegistryMirror has no {name!r}: a trainer rank other than 0 only "
                             f"reads versions; publishing is rank 0's job")
