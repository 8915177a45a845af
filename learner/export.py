"""Export the reference VLA to a policy artifact: ``policy.onnx`` (the graph and its small
tensors), ``policy.onnx.data`` (tensors of ``EXTERNAL_MIN_BYTES`` or more, as ONNX external
data, page-aligned so ONNX Runtime maps them) and ``manifest.json``."""
from __future__ import annotations

import dataclasses
import datetime
import io
import json
import pathlib
import shutil
import warnings

import numpy as np
import torch

from learner.model import ReferenceVLA, VLAConfig
from runtime.artifact import (MANIFEST, POLICY, POLICY_DATA, Manifest, file_entry, fsync_dir,
                              write_atomic)

OPSET = 17
EXTERNAL_MIN_BYTES = 64 * 1024
PAGE = 4096


class _OnnxWrapper(torch.nn.Module):
    """Flat positional inputs in the order of the ONNX contract."""

    def __init__(self, model: ReferenceVLA):
        super().__init__()
        self.model = model

    def forward(self, *args):
        cams = self.model.config.cameras
        images = dict(zip(cams, args[: len(cams)]))
        state, tokens, prefix, prefix_len = args[len(cams):]
        return self.model(images, state, tokens, prefix, prefix_len)


def example_inputs(config: VLAConfig, batch: int = 1) -> tuple[list[str], tuple]:
    c = config
    names = [f"image_{cam}" for cam in c.cameras] + ["state", "tokens", "prefix", "prefix_len"]
    tensors = tuple(torch.zeros(batch, c.channels, *c.image_hw) for _ in c.cameras) + (
        torch.zeros(batch, c.state_dim),
        torch.zeros(batch, c.max_tokens, dtype=torch.int64),
        torch.zeros(batch, c.horizon, c.action_dim),
        torch.zeros(batch, dtype=torch.int64),
    )
    return names, tensors


def onnx_bytes(model: ReferenceVLA) -> bytes:
    model = model.eval()
    names, inputs = example_inputs(model.config, batch=2)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _OnnxWrapper(model), inputs, buf, input_names=names,
            output_names=["mean", "log_std", "features"],
            dynamic_axes={n: {0: "batch"} for n in names + ["mean", "log_std", "features"]},
            opset_version=OPSET, dynamo=False,
        )
    return buf.getvalue()


def split_weights(graph: bytes, location: str = POLICY_DATA,
                  min_bytes: int = EXTERNAL_MIN_BYTES) -> tuple[bytes, bytes]:
    """(graph, data): the ONNX model with every raw tensor of ``min_bytes`` or more moved to
    external data at page-aligned offsets in ``location``; data is b"" when none is that big."""
    import onnx

    model = onnx.load_from_string(graph)
    data = bytearray()
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) < min_bytes:
            continue
        offset = -(-len(data) // PAGE) * PAGE
        data += bytes(offset - len(data))
        data += t.raw_data
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", offset), ("length", len(data) - offset)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    return (model.SerializeToString(), bytes(data)) if data else (graph, b"")


def export_artifact(model: ReferenceVLA, out_dir: str | pathlib.Path, *, version: int,
                    parent_version: int, normalization: dict, robot: str,
                    control_rate_hz: float, verifier=None) -> Manifest:
    """Write the artifact into ``out_dir`` (created; files fsynced; manifest written last).
    ``verifier``: a ``learner.verifier_train.TrainedScorer`` to ship as ``verifier.onnx``
    (described under the manifest's ``extra.verifier``)."""
    c = model.config
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    graph, data = split_weights(onnx_bytes(model))
    files = {}
    if data:
        write_atomic(out / POLICY_DATA, data)
        files[POLICY_DATA] = file_entry(out / POLICY_DATA)
    write_atomic(out / POLICY, graph)
    files[POLICY] = file_entry(out / POLICY)
    extra = {"model_config": dataclasses.asdict(c)}
    if verifier is not None:
        write_atomic(out / "verifier.onnx", verifier.onnx_bytes())
        files["verifier.onnx"] = file_entry(out / "verifier.onnx")
        extra["verifier"] = verifier.manifest_entry()
    manifest = Manifest(
        version=version, parent_version=parent_version,
        files=files,
        inputs={"cameras": [{"name": n, "height": c.image_hw[0], "width": c.image_hw[1],
                             "channels": c.channels} for n in c.cameras],
                "state_dim": c.state_dim,
                "tokenizer": {"kind": "bytes", "max_len": c.max_tokens}},
        outputs={"horizon": c.horizon, "action_dim": c.action_dim, "distribution": "gaussian",
                 "row_correlation": c.row_correlation, "features": c.features},
        accepts_prefix=True,
        normalization={k: [float(x) for x in np.asarray(v).ravel()] for k, v in normalization.items()},
        control_rate_hz=float(control_rate_hz), robot=robot,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        extra=extra,
    )
    text = manifest.to_json()
    write_atomic(out / MANIFEST, text.encode())
    fsync_dir(out)
    return Manifest.from_json(text)  # the canonical (JSON round-tripped) form robots will see


def config_from_manifest(manifest: Manifest) -> VLAConfig:
    d = dict(manifest.extra["model_config"])
    d["cameras"] = tuple(d["cameras"])
    d["image_hw"] = tuple(d["image_hw"])
    return VLAConfig(**d)
