"""TensorRT engine-cache logic and the backends' parity/provider checks, on the CPU."""
import os
import pathlib

import numpy as np
import pytest

from runtime.engine_cache import (EngineCache, EngineKey, parity, shape_profile, structure_digest,
                                  swap_plan)

SHA = "a" * 64
PROFILE = (("state", (1, 4), (1, 4), (4, 4)),)


def key(**kw):
    base = dict(trt_version="10.9", gpu_name="NVIDIA H100", compute_capability="9.0",
                precision="fp16", shape_profile=PROFILE, onnx_sha256=SHA)
    return EngineKey(**{**base, **kw})


@pytest.mark.parametrize("change", [dict(trt_version="10.10"), dict(gpu_name="NVIDIA L4"),
                                    dict(compute_capability="8.9"), dict(precision="bf16"),
                                    dict(onnx_sha256="b" * 64), dict(refittable=False),
                                    dict(shape_profile=(("state", (1, 4), (2, 4), (4, 4)),))])
def test_every_part_of_the_key_changes_the_file(change):
    assert key().filename != key(**change).filename
    assert key().filename == key().filename


def test_key_is_validated():
    with pytest.raises(ValueError, match="precision"):
        key(precision="int3")
    with pytest.raises(ValueError, match="sha256"):
        key(onnx_sha256="abc")


def test_store_load_roundtrip_and_corruption_is_a_miss(tmp_path):
    cache = EngineCache(tmp_path)
    k = key()
    assert cache.load(k) is None
    path = cache.store(k, b"engine-bytes")
    assert cache.load(k) == b"engine-bytes"
    assert not list(tmp_path.glob("*.tmp*"))
    path.write_bytes(b"torn")  # a crash mid-copy or tampering
    assert cache.load(k) is None and not path.exists()


def test_prune_keeps_the_most_recently_used(tmp_path):
    cache = EngineCache(tmp_path, keep=2)
    keys = [key(onnx_sha256=c * 64) for c in "abc"]
    for i, k in enumerate(keys[:2]):
        cache.store(k, b"x%d" % i)
        os.utime(cache.path(k), (1000 + i, 1000 + i))
    cache.load(keys[0])  # used: newest now
    cache.store(keys[2], b"x2")
    assert cache.load(keys[1]) is None
    assert cache.load(keys[0]) == b"x0" and cache.load(keys[2]) == b"x2"
    assert len(cache.entries()) == 2 and len(list(tmp_path.glob("*.json"))) == 2


def test_timing_cache_is_shared_per_trt_and_gpu(tmp_path):
    cache = EngineCache(tmp_path)
    assert cache.timing_cache_path(key()) == cache.timing_cache_path(key(precision="bf16"))
    assert cache.timing_cache_path(key()) != cache.timing_cache_path(key(gpu_name="L4"))


def test_parity_tolerance_follows_precision():
    ref = {"mean": np.ones((1, 4, 2)), "log_std": np.zeros((1, 4, 2)), "features": np.ones((1, 3))}
    near = {k: v + 5e-3 for k, v in ref.items()}
    assert parity(near, ref, "fp16").ok
    report = parity(near, ref, "fp32")
    assert not report.ok and "tolerance" in report.reason
    assert not parity({**ref, "mean": np.full((1, 4, 2), np.nan)}, ref, "bf16").ok
    assert not parity({**ref, "mean": np.ones((1, 3, 2))}, ref, "fp16").ok
    assert not parity({"mean": ref["mean"]}, ref, "fp16").ok


def test_swap_plan_refits_only_same_structure_refittable_engines():
    assert swap_plan(True, "s1", "s1") == "refit"
    assert swap_plan(True, "s1", "s2") == "rebuild"
    assert swap_plan(False, "s1", "s1") == "rebuild"


def test_structure_digest_ignores_weight_values_only():
    onnx = pytest.importorskip("onnx")
    from onnx import helper, numpy_helper

    def model(w, name="y"):
        init = numpy_helper.from_array(np.asarray(w, np.float32), "w")
        node = helper.make_node("Add", ["x", "w"], [name])
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [2])],
                              [helper.make_tensor_value_info(name, 1, [2])], [init])
        return helper.make_model(g)
    assert structure_digest(model([1, 2])) == structure_digest(model([3, 4]))
    assert structure_digest(model([1, 2])) != structure_digest(model([1, 2, 3]))
    assert structure_digest(model([1, 2])) != structure_digest(model([1, 2], name="z"))


def test_shape_profile_covers_every_graph_input(artifact_manifest):
    prof = dict((n, (lo, opt, hi)) for n, lo, opt, hi in shape_profile(artifact_manifest, 4, 2))
    assert set(prof) == {"image_front", "state", "tokens", "prefix", "prefix_len"}
    assert prof["prefix"] == ((1, 8, 4), (2, 8, 4), (4, 8, 4)) and prof["prefix_len"][2] == (4,)
    with pytest.raises(ValueError):
        shape_profile(artifact_manifest, 1, 2)


@pytest.fixture
def artifact_manifest():
    from types import SimpleNamespace
    return SimpleNamespace(horizon=8, action_dim=4, cameras=[{"name": "front", "height": 48,
                                                              "width": 48, "channels": 3}],
                           inputs={"state_dim": 4, "tokenizer": {"max_len": 32}})


def _has_gpu():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU with TensorRT and CUDA torch")
def test_tensorrt_engine_builds_caches_and_matches_ort(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from tests.runtime.test_backends import tiny_artifact
    from runtime.policy import PolicyRunner

    art = tiny_artifact(tmp_path)
    p = PolicyRunner(art, backend="tensorrt", backend_options={"cache_dir": str(tmp_path / "e")})
    assert p.backend.last_parity.ok and len(list((tmp_path / "e").glob("*.engine"))) == 1
    assert p.backend.refit(art, p.manifest)
