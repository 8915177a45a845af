"""torch backend: the artifact's ONNX graph run by torch ops (``onnx_torch.OnnxModule``;
no pickle, no learner code), run eagerly, optionally ``torch.compile``d, and on CUDA optionally
replayed from a CUDA graph (fixed batch 1 shapes, static input buffers).

Loaded by name only (``load_backend("torch", ...)``): the robot side never imports torch unless
this backend is chosen. Needs torch and onnx.
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping

import numpy as np
import torch

from runtime.backends.onnx_torch import OnnxModule
from runtime.backends.ort_backend import OUTPUTS


def _convert(onnx_path: pathlib.Path) -> tuple[torch.nn.Module, tuple[str, ...]]:
    """The module and the ONNX input names in its positional order."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("the torch backend needs 'onnx' to read the policy graph; "
                          "pip install onnx") from e
    module = OnnxModule(onnx.load(str(onnx_path))).eval()
    return module, module.input_names


class TorchBackend:
    def __init__(self, device: str = "cpu", compile: bool = False, cuda_graph: bool = False,
                 threads: int = 1):
        if cuda_graph and not device.startswith("cuda"):
            raise ValueError(f"cuda_graph needs a CUDA device, got device={device!r}")
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"torch backend asked for {device!r} but torch sees no CUDA "
                               f"device; use device='cpu' or install a CUDA build of torch")
        self.device = torch.device(device)
        self.compile, self.cuda_graph, self.threads = bool(compile), bool(cuda_graph), int(threads)
        self._module: torch.nn.Module | None = None
        self._inputs: tuple[str, ...] = ()
        self._graph = None
        self._static_in: dict[str, torch.Tensor] = {}
        self._static_out: tuple[torch.Tensor, ...] = ()

    def load(self, artifact_dir: str | os.PathLike, manifest) -> None:
        if self.device.type == "cpu" and self.threads > 0:
            torch.set_num_threads(self.threads)
        path = pathlib.Path(artifact_dir) / "policy.onnx"
        module, self._inputs = _convert(path)
        module = module.to(self.device)
        self._module = torch.compile(module, mode="reduce-overhead") if self.compile else module
        self._graph = None

    def _forward(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            out = self._module(*tensors)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def _capture(self, feeds: Mapping[str, np.ndarray]) -> None:
        self._static_in = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
                           for n in self._inputs}
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm up allocations outside the graph
                self._forward(list(self._static_in.values()))
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_out = self._forward(list(self._static_in.values()))

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._module is None:
            raise RuntimeError("TorchBackend.infer before load(); load an artifact first")
        missing = [n for n in self._inputs if n not in feeds]
        if missing:
            raise ValueError(f"policy graph needs inputs {missing}; got {sorted(feeds)}")
        if self.cuda_graph:
            shapes = {n: tuple(np.shape(feeds[n])) for n in self._inputs}
            if self._graph is None or any(tuple(self._static_in[n].shape) != s
                                          for n, s in shapes.items()):
                self._capture(feeds)  # fixed shapes: captured once, replayed every chunk
            for n in self._inputs:
                self._static_in[n].copy_(torch.from_numpy(np.ascontiguousarray(feeds[n])))
            self._graph.replay()
            out = self._static_out
        else:
            out = self._forward([torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
                                 for n in self._inputs])
        return {name: t.detach().float().cpu().numpy() for name, t in zip(OUTPUTS, out)}

    def info(self) -> dict:
        return {"name": "torch", "device": str(self.device), "providers": [f"torch-{torch.__version__}"],
                "compiled": self.compile, "cuda_graph": self.cuda_graph}
