"""ONNX Runtime backend. The providers actually active are checked against the requested ones:
a session that fell back (say CUDA requested, CPU active) is an error unless ``allow_fallback``
is set, and even then it is reported by ``info()``; never a silent CPU fallback."""
from __future__ import annotations

import logging
import os
import pathlib
from typing import Mapping

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

OUTPUTS = ("mean", "log_std", "features")


class OrtBackend:
    def __init__(self, providers: tuple[str, ...] | list[str] = ("CPUExecutionProvider",),
                 allow_fallback: bool = False, intra_op_num_threads: int = 1):
        if not providers:
            raise ValueError("OrtBackend needs at least one execution provider, "
                             "e.g. providers=('CPUExecutionProvider',)")
        if intra_op_num_threads < 0:
            raise ValueError(f"intra_op_num_threads must be >= 0 (0 = ORT's default), "
                             f"got {intra_op_num_threads}")
        self.providers = tuple(providers)
        self.allow_fallback = bool(allow_fallback)
        self.intra_op_num_threads = int(intra_op_num_threads)
        self._session: ort.InferenceSession | None = None
        self._active: tuple[str, ...] = ()
        self._inputs: tuple[str, ...] = ()

    def load(self, artifact_dir: str | os.PathLike, manifest) -> None:
        path = pathlib.Path(artifact_dir) / "policy.onnx"
        available = set(ort.get_available_providers())
        missing = [p for p in self.providers if p not in available]
        if missing and not self.allow_fallback:
            raise RuntimeError(f"onnxruntime has no {missing} here (available: {sorted(available)});"
                               f" install the matching onnxruntime build or set allow_fallback")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_num_threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        requested = [p for p in self.providers if p in available] or ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), sess_options=opts, providers=requested)
        active = tuple(session.get_providers())
        lost = [p for p in self.providers if p not in active]
        if lost:
            msg = (f"onnxruntime did not activate {lost} for {path} (active: {list(active)})")
            if not self.allow_fallback:
                raise RuntimeError(msg + "; fix the provider installation or set allow_fallback")
            log.warning("%s; continuing because allow_fallback is set", msg)
        self._session, self._active = session, active
        self._inputs = tuple(i.name for i in session.get_inputs())

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            raise RuntimeError("OrtBackend.infer before load(); load an artifact first")
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise ValueError(f"policy graph needs inputs {missing}; got {sorted(feeds)}")
        outs = self._session.run(list(OUTPUTS), {n: feeds[n] for n in self._inputs})
        return dict(zip(OUTPUTS, outs))

    def info(self) -> dict:
        return {"name": "ort", "device": "cuda" if "CUDAExecutionProvider" in self._active
                else "cpu", "providers": list(self._active), "requested": list(self.providers),
                "fallback": any(p not in self._active for p in self.providers)}
