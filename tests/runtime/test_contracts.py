"""The small shared contracts: clock, tokenizer, wire tensors, artifact manifest."""
import json
import threading

import numpy as np
import pytest

from runtime import artifact, tensors
from runtime.clock import VirtualClock, WallClock, make_clock
from runtime.distributions import gaussian_log_prob, sample
from runtime.tokenizer import tokenize
from tether.wire import tether_pb2 as pb


def test_wall_clock_sleeps_until_deadline():
    c = WallClock()
    t = c.now() + 0.02
    c.sleep_until(t)
    assert c.now() >= t


def test_virtual_clock_waits_for_advance():
    c = VirtualClock(auto_advance=False)
    woke = threading.Event()
    th = threading.Thread(target=lambda: (c.sleep_until(1.0), woke.set()))
    th.start()
    assert not woke.wait(0.05)
    c.advance(1.0)
    assert woke.wait(2.0)
    th.join()
    with pytest.raises(ValueError):
        c.advance(-1)
    with pytest.raises(ValueError, match="unknown clock"):
        make_clock("sundial")


def test_tokenizer_normalizes_and_pads():
    spec = {"kind": "bytes", "max_len": 8}
    a = tokenize("  Reach  the GOAL", spec)
    assert a.dtype == np.int64 and a.shape == (8,)
    assert (a == tokenize("reach the goal", spec)).all()
    assert tokenize("ab", spec).tolist() == [ord("a") + 1, ord("b") + 1, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="unknown tokenizer"):
        tokenize("x", {"kind": "sentencepiece", "max_len": 4})


@pytest.mark.parametrize("dtype", ["float32", "uint8", "int64", "bool"])
def test_tensor_roundtrip(dtype):
    a = (np.arange(24).reshape(2, 3, 4) % 2).astype(dtype)
    b = tensors.from_proto(pb.Tensor.FromString(tensors.to_proto(a).SerializeToString()))
    assert b.dtype == a.dtype and b.shape == a.shape and (a == b).all()


def test_tensor_refuses_mismatched_bytes_and_dtypes():
    with pytest.raises(ValueError, match="needs 24 bytes"):
        tensors.from_proto(pb.Tensor(dtype="float32", shape=[2, 3], data=b"\0" * 7))
    with pytest.raises(ValueError, match="not allowed"):
        tensors.from_proto(pb.Tensor(dtype="object", shape=[1], data=b"x"))
    with pytest.raises(ValueError, match="negative"):
        tensors.from_proto(pb.Tensor(dtype="uint8", shape=[-1], data=b""))
    with pytest.raises(ValueError, match="not allowed"):
        tensors.to_proto(np.array(["a"]))


def test_log_prob_matches_closed_form():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(8, 4)).astype(np.float32)
    log_std = np.full((8, 4), -1.0, np.float32)
    acts = sample(mean, log_std, rng)
    lp = gaussian_log_prob(mean, log_std, acts[2:5], np.arange(2, 5))
    std = np.exp(-1.0)
    ref = np.sum(-0.5 * ((acts[2:5] - mean[2:5]) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi))
    assert lp == pytest.approx(ref, rel=1e-5)
    assert (sample(mean, log_std, rng, temperature=0.0) == mean).all()


def _write_artifact(tmp_path):
    (tmp_path / "policy.onnx").write_bytes(b"not really onnx")
    m = artifact.Manifest(
        version=2, parent_version=1, files={"policy.onnx": artifact.file_entry(tmp_path / "policy.onnx")},
        inputs={"cameras": [], "state_dim": 4, "tokenizer": {"kind": "bytes", "max_len": 8}},
        outputs={"horizon": 8, "action_dim": 4}, accepts_prefix=True, normalization={},
        control_rate_hz=25.0, robot="sawyer_metaworld")
    artifact.write_atomic(tmp_path / artifact.MANIFEST, m.to_json().encode())
    return m


def test_artifact_verifies_and_detects_tampering(tmp_path):
    m = _write_artifact(tmp_path)
    assert artifact.verify_artifact(tmp_path) == m
    (tmp_path / "policy.onnx").write_bytes(b"not really onnX")
    with pytest.raises(artifact.ArtifactError, match="corrupt or tampered"):
        artifact.verify_artifact(tmp_path)
    (tmp_path / "policy.onnx").write_bytes(b"short")
    with pytest.raises(artifact.ArtifactError, match="bytes, manifest says"):
        artifact.verify_artifact(tmp_path)


def test_manifest_refuses_path_traversal_and_garbage(tmp_path):
    m = json.loads(_write_artifact(tmp_path).to_json())
    m["files"]["../../etc/passwd"] = {"sha256": "0", "size": 1}
    with pytest.raises(artifact.ArtifactError, match="plain file name"):
        artifact.Manifest.from_json(json.dumps(m))
    with pytest.raises(artifact.ArtifactError, match="not valid JSON"):
        artifact.Manifest.from_json(b"\xff{")
    with pytest.raises(artifact.ArtifactError, match="misses keys"):
        artifact.Manifest.from_json("{}")
