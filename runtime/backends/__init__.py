"""Policy backends: one small protocol, several engines, registered by name as
``"module:Class"`` strings and imported only when chosen (so choosing ``ort`` never imports
TensorRT, and the robot side never imports torch unless a torch backend is chosen)."""
from __future__ import annotations

import os
from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from tether.names import resolve

BACKENDS = {
    "ort": "runtime.backends.ort_backend:OrtBackend",
    "torch": "runtime.backends.torch_backend:TorchBackend",
    "tensorrt": "runtime.backends.trt_backend:TensorRTBackend",
}

EXTRAS = {
    "ort": "pip install onnxruntime (onnxruntime-gpu for CUDA/TensorRT providers)",
    "torch": "pip install torch onnx",
    "tensorrt": "pip install tensorrt cuda-python onnxruntime, on a machine with an NVIDIA GPU",
}


@runtime_checkable
class PolicyBackend(Protocol):
    """An inference engine for one policy artifact (see runtime/artifact.py for the graph).

    ``load`` prepares the engine for ``artifact_dir/policy.onnx``; ``infer`` takes the feeds
    named by the ONNX graph contract (numpy arrays, batch first) and returns ``mean``,
    ``log_std`` (float32 [B,H,A], normalized action space) and ``features`` (float32 [B,F]);
    ``info`` reports the backend name, device and the execution providers actually active.
    """

    def load(self, artifact_dir: str | os.PathLike, manifest) -> None: ...

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def info(self) -> dict: ...


def load_backend(name: str, artifact_dir: str | os.PathLike, manifest, **options) -> PolicyBackend:
    """Build the backend registered as ``name`` with ``options`` and load the artifact into it."""
    cls = resolve(BACKENDS, name, "policy backend", f"install it ({EXTRAS.get(name, '')})")
    backend = cls(**options)
    backend.load(artifact_dir, manifest)
    return backend
