"""Backends over one artifact: torch (CPU) matches ONNX Runtime; provider checks refuse a silent
CPU fallback; unknown backends suggest the nearest name. GPU-only paths skip with a reason."""
import numpy as np
import pytest

from runtime.backends import load_backend
from runtime.policy import PolicyRunner
from tests.doubles import export_tiny_artifact


def tiny_artifact(tmp_path):
    d = tmp_path / "art"
    export_tiny_artifact(d, version=1)
    return d


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    pytest.importorskip("torch")
    return tiny_artifact(tmp_path_factory.mktemp("backends"))


def test_torch_backend_matches_ort(artifact):
    pytest.importorskip("onnx")
    ort, th = PolicyRunner(artifact, temperature=0), PolicyRunner(artifact, "torch", temperature=0)
    obs = ort.synthetic_observation()
    prefix = np.random.default_rng(0).normal(size=(ort.horizon, ort.action_dim)).astype(np.float32)
    for n in (0, ort.horizon // 2):
        a, b = ort.infer(obs, prefix, n), th.infer(obs, prefix, n)
        np.testing.assert_allclose(a.mean, b.mean, atol=1e-5)
        np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    th.check()
    assert th.info()["backend"]["name"] == "torch"
    assert set(th.latency_stats()) == {"preprocess", "infer", "postprocess", "total"}


def test_asking_for_a_gpu_provider_without_one_is_an_error(artifact):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    m = PolicyRunner(artifact).manifest
    with pytest.raises(RuntimeError, match="allow_fallback"):
        load_backend("ort", artifact, m, providers=["CUDAExecutionProvider"])
    b = load_backend("ort", artifact, m, providers=["CUDAExecutionProvider",
                                                    "CPUExecutionProvider"], allow_fallback=True)
    assert b.info()["fallback"] and b.info()["providers"] == ["CPUExecutionProvider"]


def test_unknown_backend_names_the_nearest(artifact):
    with pytest.raises(ValueError, match="did you mean 'tensorrt'"):
        load_backend("tensorrtt", artifact, None)


def test_torch_backend_refuses_cuda_graphs_on_cpu():
    pytest.importorskip("torch")
    from runtime.backends.torch_backend import TorchBackend

    with pytest.raises(ValueError, match="CUDA device"):
        TorchBackend(device="cpu", cuda_graph=True)


def _cuda_or_skip():
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with a CUDA build of torch (torch sees no CUDA device)")


@pytest.mark.gpu
@pytest.mark.parametrize("options", [{}, {"cuda_graph": True}], ids=["eager", "cuda_graph"])
def test_torch_cuda_backend_matches_ort_cpu(artifact, options):
    """The GPU path gives the CPU reference's numbers (within fp32 GPU tolerance), and a CUDA
    graph replays the new inputs every call rather than the captured ones."""
    _cuda_or_skip()
    m = PolicyRunner(artifact).manifest
    ref = load_backend("ort", artifact, m)
    gpu = load_backend("torch", artifact, m, device="cuda", **options)
    base = PolicyRunner(artifact)
    rng = np.random.default_rng(1)
    for n in range(3):
        feeds = base.feeds(base.synthetic_observation())
        feeds = {k: (v + rng.normal(0, 0.1, v.shape).astype(v.dtype)) if v.dtype == np.float32
                 else v for k, v in feeds.items()}
        a, b = ref.infer(feeds), gpu.infer(feeds)
        for key in a:
            np.testing.assert_allclose(a[key], b[key], atol=2e-3, rtol=2e-3, err_msg=key)
    assert gpu.info()["device"].startswith("cuda")
