"""ed25519 keys and signed artifacts: the learner signs, the robot's check refuses everything
that is not exactly what a trusted key signed."""
import json
import os
import pathlib
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest

from learner.registry import Registry
from learner.signing import SigningKey, load_or_create, main as keys_main, sign_artifact
from runtime.artifact import MANIFEST, ArtifactError, load_manifest
from runtime.signature import SignatureError, Trust, canonical_bytes, key_id, verify_trusted
from tests.learner.helpers import make_artifact

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    artifact, ckpt, _ = make_artifact(tmp_path_factory.mktemp("signing"))
    return artifact, ckpt


@pytest.fixture
def keys(tmp_path):
    good = SigningKey.generate()
    good.save(tmp_path / "keys" / "good.pem")
    other = SigningKey.generate()
    other.save(tmp_path / "keys" / "other.pem")
    return good, other, Trust.load([tmp_path / "keys" / "good.pub"])


@pytest.fixture
def signed(exported, keys, tmp_path):
    out = tmp_path / "artifact"
    shutil.copytree(exported[0], out)
    sign_artifact(out, keys[0])
    return out


def _edit_manifest(directory, change):
    d = json.loads((directory / MANIFEST).read_text())
    change(d)
    (directory / MANIFEST).write_text(json.dumps(d, indent=2, sort_keys=True))


def test_key_files_private_0600_and_public_loads(tmp_path):
    key, created = load_or_create(tmp_path / "data" / "signing_key.pem")
    assert created
    private, public = tmp_path / "data" / "signing_key.pem", tmp_path / "data" / "signing_key.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    again, created = load_or_create(private)
    assert not created and again.key_id == key.key_id
    assert Trust.load([public]).key_ids == [key.key_id] == [key_id(key.public_raw)]
    assert not list((tmp_path / "data").glob(".*tmp*"))  # written atomically, nothing left over
    with pytest.raises(FileExistsError, match="refusing to replace"):
        SigningKey.generate().save(private)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        SigningKey.load(public)
    junk = tmp_path / "junk.pub"
    junk.write_bytes(b"junk")
    with pytest.raises(SignatureError, match="not a PEM public key"):
        Trust.load([junk])
    with pytest.raises(SignatureError, match="cannot read the trusted key"):
        Trust.load([tmp_path / "missing.pub"])


def test_signed_artifact_verifies_and_signature_covers_the_manifest(signed, keys):
    good, _, trust = keys
    manifest = verify_trusted(signed, trust)
    assert manifest.signature["alg"] == "ed25519" and manifest.signature["key_id"] == good.key_id
    d = json.loads((signed / MANIFEST).read_text())
    body = canonical_bytes(d)
    assert b'"signature"' not in body and body == canonical_bytes(
        {k: v for k, v in d.items() if k != "signature"})
    assert body.startswith(b'{"accepts_prefix":') and b", " not in body  # sorted and compact


def test_unsigned_is_refused_unless_allowed(exported, keys):
    _, _, trust = keys
    with pytest.raises(SignatureError, match="unsigned.*--allow-unsigned"):
        verify_trusted(exported[0], trust)
    assert verify_trusted(exported[0], Trust(allow_unsigned=True)).signature is None


def test_unknown_key_is_refused(signed, tmp_path, keys):
    _, other, _ = keys
    trust_other = Trust.load([tmp_path / "keys" / "other.pub"])
    with pytest.raises(SignatureError, match="does not trust.*--trusted-key"):
        verify_trusted(signed, trust_other)
    with pytest.raises(SignatureError, match="does not trust"):
        verify_trusted(signed, Trust())  # no keys at all: nothing is trusted


def test_resigned_by_another_key_is_refused(signed, keys):
    good, other, trust = keys
    # an attacker changes the manifest and signs it with their key under the trusted key id
    def forge(d):
        d["normalization"]["action_std"] = [9.0] * len(d["normalization"]["action_std"])
        d["signature"] = {**other.sign(d), "key_id": good.key_id}
    _edit_manifest(signed, forge)
    with pytest.raises(SignatureError, match="does not match the manifest.*tampered"):
        verify_trusted(signed, trust)
    # ... or honestly under their own id: unknown key
    _edit_manifest(signed, lambda d: d.update(signature=other.sign(d)))
    with pytest.raises(SignatureError, match="does not trust"):
        verify_trusted(signed, trust)


def test_tampered_manifest_is_refused_even_when_unsigned_is_allowed(signed, keys):
    _, _, trust = keys
    _edit_manifest(signed, lambda d: d.update(control_rate_hz=250.0))
    for t in (trust, Trust(trust.keys, allow_unsigned=True)):
        with pytest.raises(SignatureError, match="does not match the manifest"):
            verify_trusted(signed, t)


def test_tampered_or_truncated_file_is_refused(signed, keys):
    _, _, trust = keys
    policy = signed / "policy.onnx"
    data = bytearray(policy.read_bytes())
    data[len(data) // 2] ^= 0x01
    policy.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 .* does not match"):
        verify_trusted(signed, trust)
    policy.write_bytes(bytes(data[:1000]))
    with pytest.raises(ArtifactError, match="1000 bytes, manifest says"):
        verify_trusted(signed, trust)


def test_registry_signs_every_version_and_resigns_an_old_registry(exported, keys, tmp_path):
    good, other, trust = keys
    artifact, ckpt = exported
    old = Registry(tmp_path / "reg")                 # a registry from before signing
    old.import_initial(artifact, ckpt)
    assert load_manifest(old.artifact_dir(1)).signature is None
    reg = Registry(tmp_path / "reg", signing_key=good)   # reopened with a key: re-signed
    assert verify_trusted(reg.artifact_dir(1), trust).version == 1
    from learner.model import ReferenceVLA
    from learner.export import config_from_manifest
    model = ReferenceVLA(config_from_manifest(reg.manifest(1)))
    m2 = reg.publish(model)
    assert m2.signature["key_id"] == good.key_id
    assert verify_trusted(reg.artifact_dir(2), trust).version == 2
    assert 2 in reg.committed_at
    rotated = Registry(tmp_path / "reg", signing_key=other)  # a rotated key: re-signed with it
    t_other = Trust.load([tmp_path / "keys" / "other.pub"])
    assert [verify_trusted(rotated.artifact_dir(v), t_other).version for v in (1, 2)] == [1, 2]


def test_import_initial_signs_version_1(exported, keys, tmp_path):
    good, _, trust = keys
    reg = Registry(tmp_path / "reg", signing_key=good)
    m = reg.import_initial(*exported)
    assert m.version == 1 and m.signature["key_id"] == good.key_id
    assert verify_trusted(reg.artifact_dir(1), trust).version == 1


def test_tether_keys_generate_sign_and_id(exported, tmp_path, capsys):
    assert keys_main(["generate", "--out", str(tmp_path / "k")]) == 0
    assert stat.S_IMODE((tmp_path / "k" / "signing_key.pem").stat().st_mode) == 0o600
    assert keys_main(["generate", "--out", str(tmp_path / "k")]) == 1   # never overwrites
    assert "refusing to replace" in capsys.readouterr().err
    art = tmp_path / "art"
    shutil.copytree(exported[0], art)
    assert keys_main(["sign", "--key", str(tmp_path / "k" / "signing_key.pem"), str(art)]) == 0
    assert keys_main(["id", str(tmp_path / "k" / "signing_key.pub")]) == 0
    kid = capsys.readouterr().out.strip().splitlines()[-1]
    trust = Trust.load([tmp_path / "k" / "signing_key.pub"])
    assert trust.key_ids == [kid] and verify_trusted(art, trust).version == 7


def test_tether_learner_creates_its_key_and_signs_version_1(exported, tmp_path):
    """The real `tether learner` process: key pair on first start, a signed v1, rollout status."""
    data = tmp_path / "data"
    cmd = [sys.executable, "-m", "tether.cli", "learner", "--addr", "127.0.0.1:0", "--data",
           str(data), "--init-artifact", str(exported[0]), "--no-train", "--insecure"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.monotonic() + 60
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "learner listening on" in line or time.monotonic() > deadline:
                break
        assert any("learner listening on" in l for l in lines), "".join(lines)
        for _ in range(50):
            if (data / "learner.json").exists():
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, "".join(lines) + out
    assert stat.S_IMODE((data / "signing_key.pem").stat().st_mode) == 0o600
    trust = Trust.load([data / "signing_key.pub"])
    assert verify_trusted(data / "registry" / "versions" / "v000001", trust).version == 1
    assert "signing versions with key " + trust.key_ids[0] in "".join(lines) + out
    status = json.loads((data / "learner.json").read_text())
    assert status["rollout"]["stable"] == 1 and status["rollout"]["config"]["fraction"] == 0.25
    # ingest validation runs in child processes by default, and the status file says so
    assert status["ingest_validators"]["workers"] >= 2
    assert status["ingest_validators"]["running"] == status["ingest_validators"]["workers"]
