"""TensorRT backend (TensorRT 10 Python API; buffers and stream from torch CUDA tensors).

``load`` builds (or takes from the engine cache, runtime/engine_cache.py) an engine for the
artifact's ``policy.onnx`` with one optimization profile (batch 1..``max_batch``), the chosen
precision flags and a persistent timing cache; executes with preallocated device buffers on a
dedicated CUDA stream, replayed from a CUDA graph (the profile's opt shapes are fixed); and
refuses to serve until the engine matches the ONNX Runtime CPU reference on the same inputs
(``engine_cache.parity``). ``refit`` swaps a new version's weights into a refittable engine and
parity-checks again; when refit is impossible it returns False and ``rebuild_async`` builds a
new backend on a background thread while this one keeps serving.

Needs an NVIDIA GPU with ``tensorrt`` and a CUDA build of ``torch``; loaded by name only.
"""
from __future__ import annotations

import logging
import os
import pathlib
import threading
import time
from typing import Mapping

import numpy as np
import tensorrt as trt
import torch

from runtime.artifact import policy_digest, write_atomic
from runtime.backends.ort_backend import OUTPUTS, OrtBackend
from runtime.engine_cache import (EngineCache, EngineKey, parity, shape_profile, structure_digest,
                                  swap_plan)

log = logging.getLogger(__name__)
_LOGGER = trt.Logger(trt.Logger.WARNING)
_TORCH_DTYPES = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                 trt.int64: torch.int64, trt.bool: torch.bool, trt.bfloat16: torch.bfloat16}


def _onnx(path: pathlib.Path):
    import onnx

    return onnx.load(str(path))


class TensorRTBackend:
    def __init__(self, precision: str = "fp16", cache_dir: str = ".tether-cache/engines",
                 keep: int = 4, refittable: bool = True, cuda_graph: bool = True,
                 max_batch: int = 1, workspace_mb: int = 2048, device: int = 0):
        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs a CUDA GPU and a CUDA build of torch "
                               "(torch sees none); use backend 'ort' on this machine")
        self.precision, self.refittable, self.cuda_graph = precision, refittable, cuda_graph
        self.max_batch, self.workspace = int(max_batch), int(workspace_mb) << 20
        self.cache = EngineCache(cache_dir, keep)
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(self.device)
        self._engine = self._context = self._graph = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._inputs: tuple[str, ...] = ()
        self.key: EngineKey | None = None
        self._plan_key: EngineKey | None = None  # the cached plan this engine was made from
        self.structure = ""
        self.last_parity = None
        self.built_s = self.refit_s = None

    # -- engine ------------------------------------------------------------------------------
    def _key(self, onnx_path: pathlib.Path, manifest) -> EngineKey:
        props = torch.cuda.get_device_properties(self.device)
        return EngineKey(trt.__version__, props.name, f"{props.major}.{props.minor}",
                         self.precision, shape_profile(manifest, self.max_batch, 1),
                         policy_digest({n: i["sha256"] for n, i in manifest.files.items()}),
                         self.refittable)

    def _build(self, onnx_path: pathlib.Path, key: EngineKey) -> bytes:
        t0 = time.monotonic()
        builder = trt.Builder(_LOGGER)
        network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
        parser = trt.OnnxParser(network, _LOGGER)
        if not parser.parse_from_file(str(onnx_path)):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        elif self.precision == "bf16":
            config.set_flag(trt.BuilderFlag.BF16)
        if self.refittable:
            config.set_flag(trt.BuilderFlag.REFIT)
        profile = builder.create_optimization_profile()
        for name, lo, opt, hi in key.shape_profile:
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        timing_path = self.cache.timing_cache_path(key)
        blob = timing_path.read_bytes() if timing_path.exists() else b""
        config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
        engine = builder.build_serialized_network(network, config)
        if engine is None:
            raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path} ({key})")
        timing_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(timing_path, bytes(memoryview(config.get_timing_cache().serialize())))
        self.built_s = time.monotonic() - t0
        return bytes(memoryview(engine))

    def load(self, artifact_dir: str | os.PathLike, manifest) -> None:
        onnx_path = pathlib.Path(artifact_dir) / "policy.onnx"
        key = self._key(onnx_path, manifest)
        data = self.cache.load(key)
        if data is None:
            data = self._build(onnx_path, key)
            self.cache.store(key, data)
        self._adopt(data, key, structure_digest(_onnx(onnx_path)))
        self._verify(artifact_dir, manifest)

    def _adopt(self, data: bytes, key: EngineKey, structure: str) -> None:
        """Deserialize a plan and make it this backend's engine (contexts, buffers)."""
        engine = trt.Runtime(_LOGGER).deserialize_cuda_engine(data)
        if engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {self.cache.path(key)}; delete it")
        self._engine, self.key, self._plan_key, self.structure = engine, key, key, structure
        self._context = engine.create_execution_context()
        self._allocate(key)
        self._graph = None

    def _allocate(self, key: EngineKey) -> None:
        opt = {name: o for name, _, o, _ in key.shape_profile}
        self._inputs = tuple(n for n in (self._engine.get_tensor_name(i)
                                         for i in range(self._engine.num_io_tensors))
                             if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        for name in self._inputs:
            self._context.set_input_shape(name, opt[name])
        self._buffers = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = _TORCH_DTYPES[self._engine.get_tensor_dtype(name)]
            self._buffers[name] = torch.empty(shape, dtype=dtype, device=self.device)
            self._context.set_tensor_address(name, self._buffers[name].data_ptr())

    def _verify(self, artifact_dir, manifest) -> None:
        """Parity against ONNX Runtime on the CPU before this engine may serve."""
        reference = OrtBackend()
        reference.load(artifact_dir, manifest)
        rng = np.random.default_rng(0)
        feeds = {}
        for name, _, opt, _ in self.key.shape_profile:
            dtype = self._buffers[name].dtype
            feeds[name] = (rng.integers(0, 3, opt).astype(np.int64) if dtype == torch.int64
                           else rng.random(opt, dtype=np.float32))
        report = parity(self.infer(feeds), reference.infer(feeds), self.precision)
        self.last_parity = report
        if not report.ok:
            raise RuntimeError(f"TensorRT engine {self.cache.path(self.key).name} fails parity "
                               f"with ONNX Runtime: {report.reason}; not serving it")

    # -- execution ---------------------------------------------------------------------------
    def _enqueue(self) -> None:
        if not self.cuda_graph:
            self._context.execute_async_v3(self.stream.cuda_stream)
            return
        if self._graph is None:
            with torch.cuda.stream(self.stream):
                self._context.execute_async_v3(self.stream.cuda_stream)  # set-up run, uncaptured
                self.stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._context.execute_async_v3(self.stream.cuda_stream)
            self._graph = graph
        self._graph.replay()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise RuntimeError("TensorRTBackend.infer before load(); load an artifact first")
        with torch.cuda.stream(self.stream):
            for name in self._inputs:
                src = torch.from_numpy(np.ascontiguousarray(feeds[name]))
                if tuple(src.shape) != tuple(self._buffers[name].shape):
                    raise ValueError(f"input {name} has shape {tuple(src.shape)}; this engine "
                                     f"runs {tuple(self._buffers[name].shape)} (CUDA graph)")
                self._buffers[name].copy_(src, non_blocking=True)
            self._enqueue()
            out = {n: self._buffers[n].float().cpu() for n in OUTPUTS}
        self.stream.synchronize()
        return {n: t.numpy() for n, t in out.items()}

    # -- weight swaps ------------------------------------------------------------------------
    def refit(self, artifact_dir: str | os.PathLike, manifest) -> bool:
        """Take a new version's weights in place. False when refit is impossible (not built
        refittable, or a different graph): call ``rebuild_async`` then."""
        onnx_path = pathlib.Path(artifact_dir) / "policy.onnx"
        if swap_plan(self.refittable, self.structure, structure_digest(_onnx(onnx_path))) != "refit":
            return False
        t0 = time.monotonic()
        refitter = trt.Refitter(self._engine, _LOGGER)
        parser = trt.OnnxParserRefitter(refitter, _LOGGER)
        if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
            raise RuntimeError(f"TensorRT refit from {onnx_path} failed; rebuild instead")
        self.refit_s = time.monotonic() - t0
        self._graph = None  # captured kernels may hold the old weights' addresses
        self.key = self._key(onnx_path, manifest)
        self._verify(artifact_dir, manifest)
        return True

    def derive(self, artifact_dir: str | os.PathLike, manifest) -> "TensorRTBackend | None":
        """A backend for another version of this policy without a rebuild: a second copy of this
        engine, deserialized from the engine cache and refitted with the new weights, parity-
        checked against ONNX Runtime. This engine keeps serving meanwhile and stays intact, so
        the node can roll back to it. None when refit is impossible (not built refittable,
        another graph, the cached plan gone): the caller then builds afresh, as the weight
        subscriber does off the control path. The refitted plan is cached under the new
        version's key, so a restart on that version loads it without a build."""
        onnx_path = pathlib.Path(artifact_dir) / "policy.onnx"
        structure = structure_digest(_onnx(onnx_path))
        if swap_plan(self.refittable, self.structure, structure) != "refit" or self._plan_key is None:
            return None
        data = self.cache.load(self._plan_key)
        if data is None:
            return None
        twin = TensorRTBackend(self.precision, str(self.cache.dir), self.cache.keep, self.refittable,
                               self.cuda_graph, self.max_batch, self.workspace >> 20,
                               self.device.index or 0)
        twin._adopt(data, self._plan_key, self.structure)
        if not twin.refit(artifact_dir, manifest):
            return None
        twin._plan_key = twin.key
        self.cache.store(twin.key, bytes(memoryview(twin._engine.serialize())))
        return twin

    def rebuild_async(self, artifact_dir, manifest, done) -> threading.Thread:
        """Build a fresh backend for ``artifact_dir`` off the control path; ``done(backend or
        exception)`` is called on the builder thread."""
        def work():
            try:
                fresh = TensorRTBackend(self.precision, str(self.cache.dir), self.cache.keep,
                                        self.refittable, self.cuda_graph, self.max_batch,
                                        self.workspace >> 20, self.device.index or 0)
                fresh.load(artifact_dir, manifest)
                done(fresh)
            except Exception as e:  # reported to the caller, who keeps the old engine
                done(e)
        thread = threading.Thread(target=work, name="tether-trt-rebuild", daemon=True)
        thread.start()
        return thread

    def info(self) -> dict:
        return {"name": "tensorrt", "device": str(self.device), "providers": [f"tensorrt-{trt.__version__}"],
                "precision": self.precision, "engine": self.key.filename if self.key else None,
                "cuda_graph": self.cuda_graph, "build_s": self.built_s, "refit_s": self.refit_s,
                "parity_max_abs": self.last_parity.max_abs_error if self.last_parity else None}
