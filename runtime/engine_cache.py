"""The TensorRT engine cache and the decisions around an engine, kept free of TensorRT and CUDA
so that every rule here is tested on a CPU machine.

An engine is only valid for the TensorRT version, GPU (name and compute capability),
precision, input-shape profile and ONNX bytes it was built from (``onnx_sha256``: the
policy's ``runtime.artifact.policy_digest``, over ``policy.onnx`` and its external weights);
the cache key holds all five (plus whether it was built refittable). Entries are written
atomically (temporary name, fsync, rename) next to a JSON sidecar with the key and the engine's
sha256, so a torn or tampered file is never deserialized; the oldest entries beyond ``keep``
are pruned.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pathlib

import numpy as np

from runtime.artifact import sha256_bytes, write_atomic

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16")
# parity tolerance of a built or refitted engine against the fp32 reference, per precision
TOLERANCES = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2), "bf16": (6e-2, 6e-2)}  # (atol, rtol)


@dataclasses.dataclass(frozen=True)
class EngineKey:
    trt_version: str
    gpu_name: str
    compute_capability: str      # e.g. "9.0"
    precision: str
    shape_profile: tuple         # ((input, min, opt, max), ...) with shapes as tuples
    onnx_sha256: str
    refittable: bool = True

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"engine precision {self.precision!r} is not one of {PRECISIONS}")
        if len(self.onnx_sha256) != 64:
            raise ValueError(f"onnx_sha256 must be a sha256 hex digest, got {self.onnx_sha256!r}")

    def digest(self) -> str:
        d = dataclasses.asdict(self)
        d["shape_profile"] = [[n, list(a), list(b), list(c)] for n, a, b, c in self.shape_profile]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def filename(self) -> str:
        return f"{self.onnx_sha256[:12]}-{self.precision}-{self.digest()}.engine"


def shape_profile(manifest, max_batch: int = 1, opt_batch: int = 1) -> tuple:
    """The optimization profile for the policy graph's inputs (see runtime/artifact.py): batch
    from 1 to ``max_batch`` (K candidates for the verifier), every other dimension fixed."""
    if not 1 <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= opt_batch <= max_batch, got {opt_batch}, {max_batch}")
    h, a = manifest.horizon, manifest.action_dim
    dims = {f"image_{c['name']}": (int(c.get("channels", 3)), int(c["height"]), int(c["width"]))
            for c in manifest.cameras}
    dims.update(state=(int(manifest.inputs["state_dim"]),),
                tokens=(int(manifest.inputs["tokenizer"]["max_len"]),), prefix=(h, a),
                prefix_len=())
    return tuple((n, (1, *d), (opt_batch, *d), (max_batch, *d)) for n, d in sorted(dims.items()))


class EngineCache:
    def __init__(self, directory: str | os.PathLike, keep: int = 4):
        if keep < 1:
            raise ValueError(f"EngineCache keep must be >= 1, got {keep}")
        self.dir = pathlib.Path(directory)
        self.keep = int(keep)

    def path(self, key: EngineKey) -> pathlib.Path:
        return self.dir / key.filename

    def timing_cache_path(self, key: EngineKey) -> pathlib.Path:
        """Timing caches are per TensorRT version and GPU, shared across models."""
        tag = hashlib.sha256(f"{key.trt_version}|{key.gpu_name}|{key.compute_capability}"
                             .encode()).hexdigest()[:16]
        return self.dir / f"timing-{tag}.cache"

    def load(self, key: EngineKey) -> bytes | None:
        """The cached engine for ``key``, or None (missing, or not matching its sidecar: then
        the broken entry is removed and the engine must be rebuilt)."""
        path = self.path(key)
        meta_path = path.with_suffix(".json")
        if not path.exists() or not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            data = path.read_bytes()
        except (OSError, ValueError) as e:
            log.warning("engine cache: unreadable entry %s (%s); rebuilding", path, e)
            self._remove(path)
            return None
        if meta.get("key") != key.digest() or meta.get("sha256") != sha256_bytes(data):
            log.warning("engine cache: %s does not match its sidecar; rebuilding", path)
            self._remove(path)
            return None
        os.utime(path)  # recently used entries survive pruning
        return data

    def store(self, key: EngineKey, data: bytes) -> pathlib.Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        write_atomic(path, data)
        meta = {"key": key.digest(), "sha256": sha256_bytes(data), "size": len(data),
                **{k: v for k, v in dataclasses.asdict(key).items() if k != "shape_profile"}}
        write_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1).encode())
        self.prune(protect=path)
        return path

    def entries(self) -> list[pathlib.Path]:
        if not self.dir.exists():
            return []
        return sorted(self.dir.glob("*.engine"), key=lambda p: p.stat().st_mtime, reverse=True)

    def prune(self, protect: pathlib.Path | None = None) -> list[pathlib.Path]:
        """Remove all but the ``keep`` most recently used engines; returns what was removed."""
        entries = [p for p in self.entries() if p != protect]
        keep = self.keep - (1 if protect is not None else 0)
        gone = entries[max(0, keep):]
        for p in gone:
            self._remove(p)
        for tmp in self.dir.glob(".*.tmp*") if self.dir.exists() else []:
            tmp.unlink(missing_ok=True)  # torn writes of a crashed build
        return gone

    @staticmethod
    def _remove(path: pathlib.Path) -> None:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class ParityReport:
    ok: bool
    worst_output: str
    max_abs_error: float
    reason: str = ""


def parity(candidate: dict, reference: dict, precision: str,
           names: tuple[str, ...] = ("mean", "log_std", "features")) -> ParityReport:
    """Compare an engine's outputs with the reference (ONNX Runtime CPU, fp32) on the same
    inputs, within the precision's tolerance. Missing, misshapen or non-finite outputs fail."""
    atol, rtol = TOLERANCES[precision]
    worst, worst_err = "", 0.0
    for name in names:
        if name not in candidate or name not in reference:
            return ParityReport(False, name, float("inf"), f"output {name!r} missing")
        c, r = np.asarray(candidate[name], np.float64), np.asarray(reference[name], np.float64)
        if c.shape != r.shape:
            return ParityReport(False, name, float("inf"), f"{name} shape {c.shape} != {r.shape}")
        if not np.all(np.isfinite(c)):
            return ParityReport(False, name, float("inf"), f"{name} is not finite")
        err = np.abs(c - r)
        if float(err.max(initial=0.0)) > worst_err:
            worst, worst_err = name, float(err.max(initial=0.0))
        if np.any(err > atol + rtol * np.abs(r)):
            return ParityReport(False, name, float(err.max()),
                                f"{name} differs by up to {float(err.max()):.3g} "
                                f"(tolerance {atol:g} + {rtol:g}*|ref| for {precision})")
    return ParityReport(True, worst, worst_err)


def swap_plan(refittable: bool, old_structure: str, new_structure: str) -> str:
    """How a running engine takes a new version's weights: ``refit`` (seconds, same engine)
    when it was built refittable and the graph structure is unchanged; otherwise ``rebuild``
    (minutes), which runs off the control path while the old engine keeps serving."""
    return "refit" if refittable and old_structure == new_structure else "rebuild"


def structure_digest(model) -> str:
    """sha256 of an ONNX model's graph with the initializer values left out: two versions with
    the same digest differ only in weights, so a refittable engine can take the new ones."""
    graph = model.graph
    parts = [f"{n.op_type}|{','.join(n.input)}|{','.join(n.output)}|"
             f"{sorted((a.name, str(a)) for a in n.attribute if a.name != 'value')}"
             for n in graph.node]
    parts += [f"init|{t.name}|{list(t.dims)}|{t.data_type}" for t in graph.initializer]
    parts += [f"io|{v.name}|{v.type}" for v in list(graph.input) + list(graph.output)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
