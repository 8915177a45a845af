"""A small ONNX-graph interpreter over torch ops, for the torch backend: runs the artifact's own
``policy.onnx`` with torch (eager, compilable, CUDA-graph capturable) without learner code or
pickle. It covers the opset-17 operators the reference VLA exports; an artifact using another
operator fails at load, naming it (use the ``ort`` backend for such graphs)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _axes(x, axes, keep=True):
    return [int(a) for a in (axes.tolist() if torch.is_tensor(axes) else axes)]


def _gemm(a, b, c=None, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.t() if transA else a
    b = b.t() if transB else b
    out = alpha * (a @ b)
    return out if c is None else out + beta * c


def _conv(x, w, b=None, strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1), group=1, **_):
    n = len(strides)
    if list(pads[:n]) != list(pads[n:]):
        x = F.pad(x, [p for i in reversed(range(n)) for p in (pads[i], pads[i + n])])
        pads = (0,) * (2 * n)
    return F.conv2d(x, w, b, tuple(strides), tuple(pads[:n]), tuple(dilations), group)


def _reshape(x, shape, allowzero=0):
    shape = [int(s) for s in shape.tolist()]
    shape = [x.shape[i] if s == 0 and not allowzero else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _unsqueeze(x, axes):
    for a in sorted(_axes(x, axes)):
        x = x.unsqueeze(a if a >= 0 else a + x.dim() + 1)
    return x


def _reduce_sum(x, axes=None, keepdims=1, noop_with_empty_axes=0):
    if axes is None or len(axes) == 0:
        return x if noop_with_empty_axes else x.sum(keepdim=bool(keepdims))
    return x.sum(dim=_axes(x, axes), keepdim=bool(keepdims))


_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 9: torch.bool, 10: torch.float16,
           11: torch.float64, 16: torch.bfloat16}

OPS = {
    "Relu": lambda x: torch.relu(x),
    "Tanh": lambda x: torch.tanh(x),
    "Exp": lambda x: torch.exp(x),
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b if a.is_floating_point() else torch.div(a, b, rounding_mode="trunc"),
    "Greater": lambda a, b: a > b,
    "Less": lambda a, b: a < b,
    "Where": lambda c, a, b: torch.where(c, a, b),
    "Gemm": _gemm,
    "MatMul": lambda a, b: a @ b,
    "Conv": _conv,
    "Reshape": _reshape,
    "Flatten": lambda x, axis=1: x.reshape(int(np.prod(x.shape[:axis])), -1),
    "Unsqueeze": _unsqueeze,
    "Concat": lambda *xs, axis: torch.cat(xs, dim=axis),
    "Shape": lambda x, start=0, end=None: torch.tensor(x.shape[start:end], dtype=torch.int64,
                                                       device=x.device),
    "Gather": lambda x, i, axis=0: torch.index_select(x, axis, i.reshape(-1)).reshape(
        x.shape[:axis] + i.shape + x.shape[axis + 1:]),
    "Cast": lambda x, to: x.to(_DTYPES[to]),
    "Range": lambda s, e, d: torch.arange(s.item(), e.item(), d.item(), dtype=s.dtype,
                                          device=s.device),
    "Expand": lambda x, shape: x * torch.ones([int(s) for s in shape.tolist()], dtype=x.dtype,
                                              device=x.device),
    "Clip": lambda x, lo=None, hi=None: torch.clamp(x, lo, hi),
    "Softmax": lambda x, axis=-1: torch.softmax(x, dim=axis),
    "ReduceSum": _reduce_sum,
}


# Operands that are shapes or axes: read on the host (a .tolist() of a GPU tensor would stall the
# stream, and is not allowed inside CUDA-graph capture).
HOST_ARGS = {("Reshape", 1), ("Expand", 1), ("Unsqueeze", 1), ("ReduceSum", 1),
             ("Range", 0), ("Range", 1), ("Range", 2)}


class OnnxModule(torch.nn.Module):
    """``forward(*inputs)`` in the graph's input order returns the graph's outputs (a tuple).

    Shape arithmetic is specialized per input signature: nodes whose value depends only on
    constants and tensor shapes (``Shape`` and everything computed from shapes and constants) run
    once on the host for each new signature and are cached, with device copies; later calls run
    only the data nodes, with no device-to-host syncs, so the module can be CUDA-graph captured.
    """

    def __init__(self, model):
        super().__init__()
        from onnx import numpy_helper

        unknown = sorted({n.op_type for n in model.graph.node} - set(OPS) - {"Constant"})
        if unknown:
            raise NotImplementedError(f"the torch backend cannot run ONNX operators {unknown}; "
                                      f"use the 'ort' or 'tensorrt' backend for this artifact")
        self._consts: dict[str, str] = {}      # graph name -> buffer name (moves with .to())
        self._host: dict[str, torch.Tensor] = {}  # integer/bool constants, kept on the host

        def add_const(name: str, value: np.ndarray) -> None:
            key = f"w{len(self._consts)}"
            self.register_buffer(key, torch.from_numpy(value))
            self._consts[name] = key
            if value.dtype.kind in "biu":
                self._host[name] = torch.from_numpy(value.copy())

        for t in model.graph.initializer:
            add_const(t.name, numpy_helper.to_array(t).copy())
        names = set(self._consts)
        self.input_names = tuple(i.name for i in model.graph.input if i.name not in names)
        self.output_names = tuple(o.name for o in model.graph.output)
        static = set(self._consts)
        self._nodes = []
        for node in model.graph.node:
            attrs = _attrs(node)
            if node.op_type == "Constant":
                add_const(node.output[0], numpy_helper.to_array(attrs["value"]).copy())
                static.add(node.output[0])
                continue
            ins = list(node.input)
            is_static = node.op_type == "Shape" or all(n in static for n in ins if n)
            if is_static and node.op_type != "Shape" and not any(n in self._host or n not in
                                                                   self._consts for n in ins if n):
                is_static = False  # pure float-constant arithmetic: leave it on the device
            if is_static:
                static.update(node.output)
            self._nodes.append((node.op_type, OPS[node.op_type], ins, list(node.output), attrs,
                                is_static))
        self._static = frozenset(static)
        self._shape_cache: dict[tuple, tuple[dict, dict]] = {}

    def _const(self, name: str) -> torch.Tensor:
        return getattr(self, self._consts[name])

    def forward(self, *inputs):
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        cached = self._shape_cache.get(key)
        first = cached is None
        host, dev = (dict(self._host), {}) if first else cached
        env = dict(zip(self.input_names, inputs))

        def operand(op_type: str, i: int, name: str):
            if not name:
                return None
            if name in env:
                return env[name]
            if (op_type, i) in HOST_ARGS and name in host:
                return host[name]
            if name in self._consts:
                return self._const(name)
            if name not in dev:  # first call only: later calls find every copy cached
                dev[name] = host[name].to(inputs[0].device if inputs else "cpu")
            return dev[name]

        for op_type, op, ins, outs, attrs, is_static in self._nodes:
            if is_static:
                if not first:
                    continue
                if op_type == "Shape":
                    data = env[ins[0]] if ins[0] in env else self._const(ins[0])
                    result = torch.tensor(data.shape[attrs.get("start", 0):attrs.get("end")],
                                          dtype=torch.int64)
                else:
                    args = [host[n] if n in host else self._const(n).cpu() if n else None
                            for n in ins]
                    while args and args[-1] is None:
                        args.pop()
                    result = op(*args, **attrs)
                for name, value in zip(outs, result if isinstance(result, tuple) else (result,)):
                    host[name] = value
                continue
            args = [operand(op_type, i, n) for i, n in enumerate(ins)]
            while args and args[-1] is None:
                args.pop()
            result = op(*args, **attrs)
            for name, value in zip(outs, result if isinstance(result, tuple) else (result,)):
                env[name] = value
        if first:
            for name in self.output_names:  # an output that is pure shape arithmetic
                if name in host and name not in env:
                    dev.setdefault(name, host[name].to(inputs[0].device if inputs else "cpu"))
            self._shape_cache[key] = (host, dev)
        return tuple(env[n] if n in env else dev[n] for n in self.output_names)
