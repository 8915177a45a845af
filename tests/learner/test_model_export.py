"""The reference VLA and its ONNX export: the graph contract and numeric parity."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from learner.export import (EXTERNAL_MIN_BYTES, PAGE, config_from_manifest, export_artifact,
                            onnx_bytes, split_weights)
from learner.model import ReferenceVLA, VLAConfig, gaussian_log_prob
from runtime.artifact import POLICY, POLICY_DATA, verify_artifact
from runtime.distributions import gaussian_log_prob as np_log_prob


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = ReferenceVLA(VLAConfig()).eval()
    out = tmp_path_factory.mktemp("artifact")
    manifest = export_artifact(model, out, version=3, parent_version=2,
                               normalization={"state_mean": np.zeros(4), "state_std": np.ones(4)},
                               robot="sawyer_metaworld", control_rate_hz=25.0)
    return model, out, manifest


def _feeds(batch, d):
    rng = np.random.default_rng(1)
    return {"image_front": rng.random((batch, 3, 48, 48), dtype=np.float32),
            "state": rng.normal(size=(batch, 4)).astype(np.float32),
            "tokens": rng.integers(1, 257, size=(batch, 32)),
            "prefix": rng.uniform(-1, 1, size=(batch, 8, 4)).astype(np.float32),
            "prefix_len": np.full(batch, d, np.int64)}


@pytest.mark.parametrize("batch,d", [(1, 0), (3, 3)])
def test_onnx_matches_torch_and_keeps_prefix(exported, batch, d):
    model, out, manifest = exported
    assert verify_artifact(out) == manifest
    sess = ort.InferenceSession(str(out / "policy.onnx"), providers=["CPUExecutionProvider"])
    feeds = _feeds(batch, d)
    mean, log_std, feats = sess.run(["mean", "log_std", "features"], feeds)
    assert mean.shape == (batch, 8, 4) and log_std.shape == (batch, 8, 4) and feats.shape == (batch, 64)
    with torch.no_grad():
        tm, tl, tf = model({"front": torch.from_numpy(feeds["image_front"])},
                           *(torch.from_numpy(feeds[k]) for k in ("state", "tokens", "prefix", "prefix_len")))
    np.testing.assert_allclose(mean, tm.numpy(), atol=1e-5)
    np.testing.assert_allclose(feats, tf.numpy(), atol=1e-4)
    # committed rows are the prefix itself: the new chunk continues the executing one
    np.testing.assert_allclose(mean[:, :d], feeds["prefix"][:, :d], atol=1e-6)
    assert (np.abs(mean[:, d:]) <= 1).all()


def test_manifest_round_trips_model_config(exported):
    model, _, manifest = exported
    assert config_from_manifest(manifest) == model.config
    assert manifest.accepts_prefix and manifest.horizon == 8 and manifest.version == 3


def test_row_correlation_travels_in_the_manifest_to_the_robots_sampling(tmp_path):
    """The learner's VLAConfig.row_correlation is the manifest's, the policy runner's and every
    chunk's the robot records (its behaviour log-prob is the correlated one)."""
    from runtime.policy import PolicyRunner
    model = ReferenceVLA(VLAConfig(row_correlation=0.6)).eval()
    manifest = export_artifact(model, tmp_path / "a", version=1, parent_version=0,
                               normalization={"state_mean": np.zeros(4), "state_std": np.ones(4)},
                               robot="sawyer_metaworld", control_rate_hz=25.0)
    assert manifest.row_correlation == 0.6
    assert config_from_manifest(manifest).row_correlation == 0.6
    runner = PolicyRunner(tmp_path / "a", seed=0)
    assert runner.row_correlation == 0.6
    obs = runner.synthetic_observation()
    out = runner.infer(obs)
    noise = [runner.infer(obs).actions - out.mean for _ in range(400)]
    z = np.stack(noise) / np.exp(out.log_std)                     # [N, H, A]
    assert np.corrcoef(z[:, 2, 0], z[:, 5, 0])[0, 1] == pytest.approx(0.36, abs=0.1)
    with pytest.raises(ValueError, match="row_correlation"):
        VLAConfig(row_correlation=1.0)


@pytest.mark.parametrize("rho", [0.0, 0.7])
def test_torch_and_numpy_log_probs_agree(rho):
    rng = np.random.default_rng(2)
    mean = rng.normal(size=(3, 8, 4)).astype(np.float32)
    log_std = rng.uniform(-2, 0, size=(3, 8, 4)).astype(np.float32)
    acts = rng.normal(size=(3, 8, 4)).astype(np.float32)
    rows = [np.array([3, 4, 5]), np.array([0]), np.array([], np.int64)]  # a batch of spans
    mask = torch.zeros(3, 8)
    for b, r in enumerate(rows):
        mask[b, r] = 1
    t = gaussian_log_prob(torch.from_numpy(mean), torch.from_numpy(log_std),
                          torch.from_numpy(acts), mask, rho)
    for b, r in enumerate(rows):
        ref = np_log_prob(mean[b], log_std[b], acts[b][r], r, rho)
        assert float(t[b]) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_the_keypoint_temperature_is_learned_and_old_checkpoints_load_at_temperature_one():
    from learner.model import SpatialSoftmax

    pool = SpatialSoftmax()
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 4, 4] = 2.0  # one peak in the bottom-right corner over a flat background
    centre_pull = pool(x).detach()
    with torch.no_grad():
        pool.log_temperature.fill_(2.0)
    sharp = pool(x).detach()
    assert (sharp > centre_pull).all() and sharp.max() > 0.99  # onto the peak at (+1, +1)
    model = ReferenceVLA(VLAConfig())
    names = [n for n, _ in model.named_parameters() if n.endswith("log_temperature")]
    assert names == ["encoders.front.pool.log_temperature"]
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("log_temperature")}
    with torch.no_grad():
        model.encoders["front"].pool.log_temperature.fill_(1.5)
    model.load_state_dict(old)  # saved before the temperature existed: strict load still works
    assert float(model.encoders["front"].pool.log_temperature.detach()) == 0.0


def test_large_tensors_go_to_page_aligned_external_data_and_run_the_same(exported, tmp_path):
    import onnx

    model, out, manifest = exported
    assert set(manifest.files) == {POLICY, POLICY_DATA}
    graph = onnx.load(str(out / POLICY), load_external_data=False)
    external = {t.name: {e.key: e.value for e in t.external_data} for t in graph.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}
    inline = [t for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < EXTERNAL_MIN_BYTES for t in inline)
    size = (out / POLICY_DATA).stat().st_size
    for info in external.values():
        assert info["location"] == POLICY_DATA and int(info["offset"]) % PAGE == 0
        assert int(info["offset"]) + int(info["length"]) <= size
    # the same model with every tensor inline (an artifact from before the split) runs the same
    whole = onnx_bytes(model)
    assert split_weights(whole, min_bytes=1 << 40) == (whole, b"")
    feeds = _feeds(2, 1)
    split = ort.InferenceSession(str(out / POLICY), providers=["CPUExecutionProvider"])
    joined = ort.InferenceSession(whole, providers=["CPUExecutionProvider"])
    for a, b in zip(split.run(None, feeds), joined.run(None, feeds)):
        np.testing.assert_array_equal(a, b)
