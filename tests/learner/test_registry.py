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


def test_retention_keeps_the_newest_versions_version_1_and_the_pinned(tmp_path, pretrained):
    artifact, ckpt, model = pretrained
    reg = Registry(tmp_path / "reg", keep_versions=3)
    reg.import_initial(artifact, ckpt)
    reg.pin("rollout", {2})
    for _ in range(6):
        reg.publish(model)
    assert reg.latest() == 7 and reg.versions() == [1, 2, 5, 6, 7] and reg.pruned == 2
    assert sorted(p.name for p in reg.checkpoints_dir.iterdir()) == [
        f"v{v:06d}.pt" for v in (1, 2, 5, 6, 7)]
    with pytest.raises(KeyError):
        reg.artifact_dir(3)
    assert reg.load_checkpoint(4) is None
    assert verify_artifact(reg.artifact_dir(2)).version == 2  # pinned: whole and fetchable
    reg.pin("rollout", {6})  # the pin moved on: version 2 goes with the next publish
    reg.publish(model)
    assert reg.versions() == [1, 6, 7, 8]
    again = Registry(tmp_path / "reg", keep_versions=3)  # reopened: nothing lost or renumbered
    assert again.latest() == 8 and again.versions() == [1, 6, 7, 8]
    assert again.publish(model).version == 9 and again.versions() == [1, 7, 8, 9]


def test_retention_finishes_a_removal_a_crash_cut_short(tmp_path, pretrained):
    artifact, ckpt, model = pretrained
    reg = Registry(tmp_path / "reg", keep_versions=2)
    reg.import_initial(artifact, ckpt)
    for _ in range(3):
        reg.publish(model)
    assert reg.versions() == [1, 3, 4]
    # killed between renaming version 3 away and deleting it and its checkpoint
    (reg.versions_dir / "v000003").rename(reg.versions_dir / ".tmp-pruned-v000003")
    again = Registry(tmp_path / "reg", keep_versions=2)
    assert again.latest() == 4 and again.versions() == [1, 4]
    assert not (reg.versions_dir / ".tmp-pruned-v000003").exists()
    assert again.checkpoint_path(3).exists()  # an orphan until the next publish prunes
    again.publish(model)
    assert again.versions() == [1, 4, 5] and not again.checkpoint_path(3).exists()


def test_without_retention_every_version_stays(tmp_path, pretrained):
    artifact, ckpt, model = pretrained
    reg = Registry(tmp_path / "reg")
    reg.import_initial(artifact, ckpt)
    for _ in range(4):
        reg.publish(model)
    assert reg.versions() == [1, 2, 3, 4, 5] and reg.prune() == [] and reg.pruned == 0
    with pytest.raises(ValueError, match="keep_versions"):
        Registry(tmp_path / "other", keep_versions=-1)
