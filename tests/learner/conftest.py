"""Fixtures shared by the learner tests: a small pretrained artifact (built once per module) and
a registry holding it as version 1 next to an empty store."""
import onnxruntime as ort
import pytest

from learner.registry import Registry
from learner.store import ExperienceStore
from tests.learner.helpers import make_artifact


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """(artifact dir, checkpoint, ...) as ``make_artifact`` returns them."""
    return make_artifact(tmp_path_factory.mktemp("pre"))


@pytest.fixture
def setup(tmp_path, pretrained):
    """(store, registry with v1, v1's manifest, an ONNX Runtime session of v1)."""
    artifact, ckpt, _ = pretrained
    registry = Registry(tmp_path / "reg")
    manifest = registry.import_initial(artifact, ckpt)
    session = ort.InferenceSession(str(registry.artifact_dir(1) / "policy.onnx"),
                                   providers=["CPUExecutionProvider"])
    store = ExperienceStore(tmp_path / "exp.sqlite")
    yield store, registry, manifest, session
    store.close()
