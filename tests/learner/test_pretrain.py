"""BC pretraining on a tiny budget: a valid artifact, a resumable state_dict, the cache."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from learner.model import ReferenceVLA
from learner.pretrain import (PretrainConfig, ensure_pretrained, evaluate,
                              load_pretrained_model, main)
from runtime.artifact import verify_artifact
from runtime.tokenizer import tokenize

TINY = dict(episodes_per_task=1, steps=3, batch_size=8, eval_episodes=1, max_steps=30)


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    cache = tmp_path_factory.mktemp("pretrained")
    logs = []
    artifact = ensure_pretrained(["reach-v3"], cache, seed=0, log=logs.append, **TINY)
    return cache, artifact, logs


def test_artifact_verifies_and_runs_in_onnxruntime(cached):
    _, artifact, _ = cached
    m = verify_artifact(artifact)
    assert (m.version, m.parent_version, m.robot) == (1, 0, "sawyer_metaworld")
    assert m.control_rate_hz == 25.0 and m.accepts_prefix
    norm = m.normalization
    assert norm["action_mean"] == [0.0] * 4 and norm["action_std"] == [1.0] * 4
    assert min(norm["state_std"]) >= 1e-2
    sess = ort.InferenceSession(str(artifact / "policy.onnx"), providers=["CPUExecutionProvider"])
    h, a = m.horizon, m.action_dim
    feeds = {"image_front": np.random.rand(2, 3, 48, 48).astype(np.float32),
             "state": np.zeros((2, 4), np.float32),
             "tokens": np.stack([tokenize("reach the goal position", m.inputs["tokenizer"])] * 2),
             "prefix": np.full((2, h, a), 0.5, np.float32),
             "prefix_len": np.array([0, 2], np.int64)}
    mean, log_std, feat = sess.run(None, feeds)
    assert mean.shape == (2, h, a) and log_std.shape == (2, h, a) and np.all(np.isfinite(mean))
    np.testing.assert_allclose(mean[1, :2], 0.5)  # committed prefix rows pass through


def test_state_dict_is_saved_outside_the_artifact(cached):
    cache, artifact, _ = cached
    entry = artifact.parent
    assert "model.pt" not in verify_artifact(artifact).files
    assert not (artifact / "model.pt").exists()
    state = torch.load(entry / "model.pt", weights_only=True)
    model = load_pretrained_model(entry)
    assert isinstance(model, ReferenceVLA)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert entry.parent == cache and (entry / "DONE").exists()


def test_cache_hit_returns_without_training(cached):
    cache, artifact, _ = cached
    logs = []
    again = ensure_pretrained(["reach-v3"], cache, seed=0, log=logs.append, **TINY)
    assert again == artifact and logs == []  # nothing was collected or trained


def test_cache_key_depends_on_settings():
    base = PretrainConfig(tasks=("reach-v3",), **TINY)
    assert base.key() == PretrainConfig(tasks=("reach-v3",), **TINY).key()
    assert base.key() != PretrainConfig(tasks=("reach-v3",), **{**TINY, "steps": 4}).key()
    assert base.key() != PretrainConfig(tasks=("push-v3",), **TINY).key()
    # evaluation settings do not change the trained policy
    assert base.key() == PretrainConfig(tasks=("reach-v3",), **{**TINY, "eval_episodes": 5}).key()


def test_broken_cached_artifact_is_rebuilt(tmp_path):
    logs = []
    artifact = ensure_pretrained(["reach-v3"], tmp_path, log=logs.append, **TINY)
    (artifact / "policy.onnx").write_bytes(b"tampered")
    logs.clear()
    again = ensure_pretrained(["reach-v3"], tmp_path, log=logs.append, **TINY)
    assert any("broken" in line for line in logs)
    verify_artifact(again)


def test_evaluate_artifact_and_model_agree_on_format(cached):
    cache, artifact, _ = cached
    rates = evaluate(artifact, ["reach-v3"], episodes=1, seed=0, max_steps=8)
    assert set(rates) == {"reach-v3"} and 0.0 <= rates["reach-v3"] <= 1.0
    with pytest.raises(ValueError, match="norm"):
        evaluate(load_pretrained_model(artifact.parent), ["reach-v3"], episodes=1, seed=0)


def test_main_prints_artifact_and_rejects_unknown_task(cached, capsys):
    cache, artifact, _ = cached
    assert main(["--tasks", "reach-v3", "--cache-dir", str(cache), "--episodes-per-task", "1",
                 "--steps", "3", "--eval-episodes", "1", "--batch-size", "8",
                 "--max-steps", "30"]) == 0
    assert str(artifact) in capsys.readouterr().out
    assert main(["--tasks", "reach-v9", "--cache-dir", str(cache)]) == 2
    assert "did you mean 'reach-v3'" in capsys.readouterr().err
