import json
import pathlib
import shutil

import numpy as np
import pytest

from robots.base import Observation
from runtime.artifact import (POLICY, POLICY_DATA, ArtifactError, load_manifest, policy_digest,
                              sha256_file)
from runtime.backends import load_backend
from runtime.policy import PolicyRunner
from tests.doubles import export_tiny_artifact


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    import torch
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("art") / "v1"
    export_tiny_artifact(d, version=1)
    return d


@pytest.fixture(scope="module")
def runner(artifact):
    return PolicyRunner(artifact, seed=0)


def _on_disk(directory):
    """policy_digest of the manifest's files as they are on disk (hashed here)."""
    return policy_digest({n: sha256_file(directory / n) for n in load_manifest(directory).files})


def obs(state=(0.0, 0.6, 0.2, 0.5), shape=(48, 48, 3), camera="front"):
    return Observation(images={camera: np.full(shape, 255, np.uint8)},
                       state=np.asarray(state, np.float32), instruction="Reach  the GOAL",
                       timestamp=0.0)


def test_feeds_follow_the_graph_contract(runner):
    prefix = np.arange(32, dtype=np.float32).reshape(8, 4)
    f = runner.feeds(obs(state=(0.2, 0.8, 0.3, 1.0)), prefix, 3)
    assert f["image_front"].shape == (1, 3, 48, 48) and f["image_front"].dtype == np.float32
    assert np.all(f["image_front"] == 1.0)  # 255 -> 1.0
    # state normalized with the manifest's statistics
    np.testing.assert_allclose(f["state"][0], [1.0, 1.0, 1.0, 1.0], rtol=1e-5)
    assert f["tokens"].dtype == np.int64 and f["tokens"].shape == (1, 32)
    assert f["tokens"][0, 0] == ord("r") + 1  # lower-cased bytes tokenizer
    assert f["prefix"].shape == (1, 8, 4)
    np.testing.assert_array_equal(f["prefix"][0, :3], prefix[:3])
    assert np.all(f["prefix"][0, 3:] == 0)
    assert f["prefix_len"].tolist() == [3]


def test_infer_returns_a_finite_chunk_and_identity(runner, artifact):
    out = runner.infer(obs())
    assert out.mean.shape == out.log_std.shape == out.actions.shape == (8, 4)
    assert out.features.shape == (16,)
    assert np.all(np.isfinite(out.actions)) and out.latency_s > 0
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert runner.version == 1 and runner.horizon == 8 and runner.action_dim == 4
    files = manifest["files"]
    assert POLICY_DATA in files  # the exporter keeps the large tensors outside the graph
    assert runner.weight_sha256 == _on_disk(artifact) == policy_digest(
        {n: files[n]["sha256"] for n in (POLICY, POLICY_DATA)}) != files[POLICY]["sha256"]
    runner.check()
    stats = runner.latency_stats()
    assert set(stats) == {"preprocess", "infer", "postprocess", "total"}
    assert stats["infer"]["p50_ms"] > 0
    info = runner.backend.info()
    assert info["name"] == "ort" and info["providers"] == ["CPUExecutionProvider"]


def test_temperature_zero_gives_the_mean(artifact):
    r = PolicyRunner(artifact, temperature=0.0)
    out = r.infer(obs())
    np.testing.assert_array_equal(out.actions, out.mean)


def test_a_temperature_reports_the_spread_it_samples_with(artifact):
    """The chunk's log_std is what its actions were drawn from, so the behaviour log-prob the
    recorder computes from it is the sampling distribution's (it was the untempered policy's)."""
    plain, hot = PolicyRunner(artifact, seed=1), PolicyRunner(artifact, seed=1, temperature=2.0)
    o = obs()
    ref = plain.infer(o)
    out = hot.infer(o)
    np.testing.assert_allclose(out.log_std, ref.log_std + np.log(2.0), atol=1e-6)
    z = np.stack([(hot.infer(o).actions - out.mean) / np.exp(out.log_std) for _ in range(300)])
    assert z.std() == pytest.approx(1.0, rel=0.05)
    cand = hot.candidates(out, 200)
    assert ((cand - out.mean) / np.exp(out.log_std)).std() == pytest.approx(1.0, rel=0.05)


def test_normalization_round_trip(runner):
    a = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
    cmd = runner.to_command(a)
    np.testing.assert_allclose(cmd, a * 0.5)  # action_std 0.5, mean 0
    np.testing.assert_allclose(runner.from_command(cmd), a, rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (obs(camera="wrist"), "no image from camera 'front'"),
    (obs(shape=(32, 32, 3)), r"shape \(32, 32, 3\).*expects HxWxC \(48, 48, 3\)"),
    (obs(state=(np.nan, 0.6, 0.2, 0.5)), "state is not finite"),
    (obs(state=(0.0, 0.6, 0.2)), "state has 3 entries"),
])
def test_bad_observations_raise_clear_errors(runner, bad, match):
    with pytest.raises(ValueError, match=match):
        runner.infer(bad)


@pytest.mark.parametrize("name", [POLICY, POLICY_DATA])
def test_tampered_artifact_is_refused(artifact, tmp_path, name):
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    data = bytearray((bad / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match"):
        PolicyRunner(bad)


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_a_large_embedding_is_mapped_not_copied(tmp_path):
    """A swap must not allocate and zero a large table's size in fresh memory: ONNX Runtime maps
    policy.onnx.data (page cache) and gathers from it in place. (Matrix weights it repacks for
    its GEMM are copied once, and the mapping of those pages is released.)"""
    own = tmp_path / "v1"
    export_tiny_artifact(own, vocab=4096)  # a 4096 x 32 float32 token table: 512 KiB
    runner = PolicyRunner(own, seed=0)
    mapped = [line for line in pathlib.Path("/proc/self/maps").read_text().splitlines()
              if line.endswith(str(own / POLICY_DATA))]
    assert mapped and np.all(np.isfinite(runner.infer(obs()).actions))


def test_unknown_backend_suggests_the_nearest(artifact):
    with pytest.raises(ValueError, match="did you mean 'ort'"):
        PolicyRunner(artifact, backend="otr")


def test_ort_never_falls_back_silently(artifact, runner):
    opts = {"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        load_backend("ort", artifact, runner.manifest, **opts)
    b = load_backend("ort", artifact, runner.manifest, allow_fallback=True, **opts)
    assert b.info()["fallback"] is True and b.info()["providers"] == ["CPUExecutionProvider"]


class _RefitOrt:
    """An ONNX Runtime backend with the ``derive`` hook a TensorRT engine has (refit into a copy
    of the running engine): the dispatch in PolicyRunner is what is under test here; the
    TensorRT refit itself needs a GPU (tests/runtime/test_engine_cache.py, marked)."""

    refittable = True

    def __init__(self, **options):
        from runtime.backends.ort_backend import OrtBackend
        self._ort = OrtBackend(**options)
        self.derived_from = None

    def load(self, artifact_dir, manifest):
        self._ort.load(artifact_dir, manifest)

    def infer(self, feeds):
        return self._ort.infer(feeds)

    def info(self):
        return dict(self._ort.info(), name="refit-ort")

    def derive(self, artifact_dir, manifest):
        if not self.refittable:
            return None
        twin = _RefitOrt()
        twin.load(artifact_dir, manifest)
        twin.derived_from = self
        return twin


def test_a_new_version_derives_its_backend_from_the_serving_one_when_it_can(artifact, tmp_path,
                                                                            monkeypatch):
    from runtime import backends
    monkeypatch.setitem(backends.BACKENDS, "refit-ort", f"{__name__}:_RefitOrt")
    v2 = tmp_path / "v2"
    export_tiny_artifact(v2, version=2)
    serving = PolicyRunner(artifact, backend="refit-ort")
    assert not serving.derived
    new = PolicyRunner(v2, backend="refit-ort", base=serving)
    assert new.derived and new.backend.derived_from is serving.backend
    assert new.info()["derived"] and new.version == 2
    assert new.backend is not serving.backend  # the serving engine stays intact for rollback
    serving.backend.refittable = False  # refit impossible: a fresh build instead
    rebuilt = PolicyRunner(v2, backend="refit-ort", base=serving)
    assert not rebuilt.derived and rebuilt.backend.derived_from is None
    other = PolicyRunner(v2, backend="ort", base=serving)  # another backend: never derived
    assert not other.derived
    x = obs()
    np.testing.assert_allclose(new.infer(x).mean, other.infer(x).mean, rtol=1e-5, atol=1e-6)


def test_the_weight_identity_covers_external_data_under_any_name(artifact, tmp_path):
    """A team's own export may name its external data anything: changing only those weights
    must change the identity (recorded with every chunk, keyed by the TensorRT engine cache and
    the in-memory rollback)."""
    onnx = pytest.importorskip("onnx")
    from learner.signing import sign_artifact
    from runtime.artifact import MANIFEST, file_entry
    from tests.doubles import signing_key_for_tests

    def repack(out, flip: bool):
        shutil.copytree(artifact, out)
        (out / POLICY_DATA).rename(out / "weights.bin")
        if flip:
            data = bytearray((out / "weights.bin").read_bytes())
            data[100] ^= 0x01  # one weight, slightly different
            (out / "weights.bin").write_bytes(bytes(data))
        graph = onnx.load(str(out / POLICY), load_external_data=False)
        for t in graph.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = "weights.bin"
        (out / POLICY).write_bytes(graph.SerializeToString())
        manifest = json.loads((out / MANIFEST).read_text())
        manifest["files"] = {n: file_entry(out / n) for n in (POLICY, "weights.bin")}
        manifest["signature"] = None
        (out / MANIFEST).write_text(json.dumps(manifest))
        sign_artifact(out, signing_key_for_tests())
        return PolicyRunner(out, seed=0)

    a, b = repack(tmp_path / "a", False), repack(tmp_path / "b", True)
    files = load_manifest(tmp_path / "a").files
    assert files[POLICY]["sha256"] == load_manifest(tmp_path / "b").files[POLICY]["sha256"]
    assert a.weight_sha256 != b.weight_sha256
    assert a.weight_sha256 == _on_disk(tmp_path / "a") == policy_digest(
        {n: i["sha256"] for n, i in files.items()} | {MANIFEST: "0" * 64, "verifier.onnx": "1" * 64})
    np.testing.assert_allclose(a.infer(obs()).mean, PolicyRunner(artifact, seed=0).infer(obs()).mean)
    only = {POLICY: "ab" * 32, MANIFEST: "cd" * 32}
    assert policy_digest(only) == "ab" * 32  # inline weights: the graph's own sha256, as before
