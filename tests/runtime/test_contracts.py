"""The small shared contracts: clock, tokenizer, wire tensors, artifact manifest."""
import dataclasses
import json
import threading
import time

import numpy as np
import pytest

from runtime import artifact, tensors
from runtime.clock import ScaledClock, VirtualClock, WallClock, make_clock
from runtime.distributions import gaussian_log_prob, sample
from runtime.tokenizer import tokenize
from tether.wire import tether_pb2 as pb


def test_wall_clock_sleeps_until_deadline():
    c = WallClock()
    t = c.now() + 0.02
    c.sleep_until(t)
    assert c.now() >= t


def test_a_scaled_clock_runs_speed_times_as_fast_as_the_wall_and_sleeps_in_its_own_time():
    c = ScaledClock(4.0)
    assert abs(c.now() - time.monotonic()) < 0.05  # reads equal at creation
    t0, w0 = c.now(), time.monotonic()
    time.sleep(0.05)
    ratio = (c.now() - t0) / (time.monotonic() - w0)
    assert 3.8 < ratio < 4.2
    target = c.now() + 0.4  # 0.4 s of the clock's time: 0.1 s of the wall's
    w0 = time.monotonic()
    c.sleep_until(target)
    waited = time.monotonic() - w0
    assert c.now() >= target
    assert 0.09 <= waited < 0.35, waited  # a WallClock would have waited 0.4 s
    for bad in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="speed"):
            ScaledClock(bad)


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


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_correlated_rows_log_prob_is_the_joint_gaussians(rho):
    """Against the multivariate normal written out: covariance std_i std_j (rho^2 + (1 - rho^2)
    [i == j]) per action dimension, over the executed rows only (a marginal)."""
    rng = np.random.default_rng(1)
    mean = rng.normal(size=(8, 3)).astype(np.float32)
    log_std = rng.uniform(-2, 0, size=(8, 3)).astype(np.float32)
    rows = np.array([2, 3, 5, 6])
    acts = sample(mean, log_std, rng, rho=rho)[rows]
    ref = 0.0
    for j in range(3):
        std = np.exp(log_std[rows, j].astype(np.float64))
        cov = np.outer(std, std) * (rho ** 2 + (1 - rho ** 2) * np.eye(len(rows)))
        r = acts[:, j] - mean[rows, j]
        ref += -0.5 * (r @ np.linalg.solve(cov, r) + np.linalg.slogdet(cov)[1]
                       + len(rows) * np.log(2 * np.pi))
    assert gaussian_log_prob(mean, log_std, acts, rows, rho) == pytest.approx(ref, rel=1e-6)
    assert gaussian_log_prob(mean, log_std, acts[:0], rows[:0], rho) == 0.0


def test_correlated_sampling_keeps_each_rows_spread_and_correlates_rows_by_rho_squared():
    rng = np.random.default_rng(3)
    mean = np.zeros((8, 2), np.float32)
    log_std = np.log(np.full((8, 2), 0.5, np.float32))
    draws = np.stack([sample(mean, log_std, rng, rho=0.8) for _ in range(4000)])  # [N, 8, 2]
    assert draws.std(0).mean() == pytest.approx(0.5, rel=0.05)
    corr = np.corrcoef(draws[:, 1, 0], draws[:, 6, 0])[0, 1]
    assert corr == pytest.approx(0.64, abs=0.05)
    assert abs(np.corrcoef(draws[:, 1, 0], draws[:, 6, 1])[0, 1]) < 0.06  # dims independent
    iid = np.stack([sample(mean, log_std, rng) for _ in range(4000)])
    assert abs(np.corrcoef(iid[:, 1, 0], iid[:, 6, 0])[0, 1]) < 0.06
    with pytest.raises(ValueError, match="rho"):
        sample(mean, log_std, rng, rho=1.0)


def test_a_manifest_refuses_a_row_correlation_out_of_range(tmp_path):
    m = _write_artifact(tmp_path)
    assert m.row_correlation == 0.0
    for bad in (1.0, -0.1, "0.5", True):
        with pytest.raises(artifact.ArtifactError, match="row_correlation"):
            dataclasses.replace(m, outputs={**m.outputs, "row_correlation": bad})
    good = dataclasses.replace(m, outputs={**m.outputs, "row_correlation": 0.9})
    assert good.row_correlation == 0.9


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
