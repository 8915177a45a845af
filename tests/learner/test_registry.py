"""The registry: monotonic versions across restarts, crash leftovers ignored, latest-wins waits."""
import json
import threading
import time

import pytest
import torch

from learner.model import ReferenceVLA, VLAConfig
from learner.registry import Registry
from runtime.artifact import MANIFEST, sha256_file, verify_artifact


def test_import_publish_reopen_monotonic(tmp_path, pretrained):
    artifact, ckpt, model = pretrained
    reg = Registry(tmp_path / "reg")
    assert reg.latest() == 0
    m1 = reg.import_initial(artifact, ckpt)
    assert (m1.version, m1.parent_version) == (1, 0)
    assert verify_artifact(reg.artifact_dir(1)) == m1
    assert m1.normalization == json.loads((artifact / MANIFEST).read_text())["normalization"]
    state = reg.load_checkpoint(1)["model"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert reg.import_initial(artifact, ckpt).version == 1  # not empty: a no-op

    m2 = reg.publish(model, optimizer_state=None)
    assert (m2.version, m2.parent_version, m2.robot) == (2, 1, "sawyer_metaworld")
    files = reg.files(2)
    assert files[0][0] == MANIFEST and files[0][1] == sha256_file(reg.artifact_dir(2) / MANIFEST)
    assert [f[0] for f in files[1:]] == ["policy.onnx", "policy.onnx.data"]

    # a crash mid-publish: a temporary dir and an incomplete version dir are left behind
    (reg.versions_dir / ".tmp-v000003-1-2").mkdir()
    (reg.versions_dir / "v000003").mkdir()
    (reg.versions_dir / "v000003" / "policy.onnx").write_bytes(b"half")
    again = Registry(tmp_path / "reg")
    assert again.latest() == 2
    assert (tmp_path / "reg" / "LATEST").read_text().strip() == "2"
    assert sorted(p.name for p in again.versions_dir.iterdir()) == ["v000001", "v000002"]
    assert again.publish(model).version == 3
    assert Registry(tmp_path / "reg").latest() == 3
    with pytest.raises(KeyError):
        again.artifact_dir(4)


def test_wait_for_newer_is_latest_wins(tmp_path, pretrained):
    artifact, ckpt, model = pretrained
    reg = Registry(tmp_path / "reg")
    reg.import_initial(artifact, ckpt)
    t0 = time.monotonic()
    assert reg.wait_for_newer(1, timeout=0.2) == 1
    assert time.monotonic() - t0 >= 0.15
    reg.publish(model)
    reg.publish(model)
    assert reg.wait_for_newer(1, timeout=5) == 3  # skips 2
    got = []
    waiter = threading.Thread(target=lambda: got.append(reg.wait_for_newer(3, timeout=10)))
    waiter.start()
    reg.close()
    waiter.join(5)
    assert got == [3]


def test_empty_registry_publish_needs_metadata(tmp_path):
    reg = Registry(tmp_path / "reg")
    with pytest.raises(ValueError, match="import_initial"):
        reg.publish(ReferenceVLA(VLAConfig()))
