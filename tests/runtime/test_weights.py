"""The weight subscriber against a learner double serving real exported artifacts on loopback.

Every test runs twice: fetching in a thread of the subscriber's process, and in a child process
of its own (runtime/fetch_process.py, the robots' default), which must behave the same."""
import sys
import threading

import pytest

from runtime.artifact import MANIFEST, POLICY, POLICY_DATA, verify_artifact
from runtime.fetch_process import ChannelSpec
from runtime.signature import Trust
from runtime.weights import WeightSubscriber
from tether.wire import tether_pb2 as pb

from tests.doubles import public_key_for_tests, signing_key_for_tests
from tests.runtime.learner_double import LearnerDouble, serve

NORM = {"state_mean": [0.0] * 4, "state_std": [1.0] * 4,
        "action_mean": [0.0] * 4, "action_std": [1.0] * 4}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from learner.export import export_artifact
    from learner.model import ReferenceVLA, VLAConfig
    from learner.signing import sign_artifact
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("published")
    model = ReferenceVLA(VLAConfig())
    out = {}
    for v in range(1, 6):
        export_artifact(model, root / f"v{v}", version=v, parent_version=v - 1,
                        normalization=NORM, robot="sawyer_metaworld", control_rate_hz=10.0)
        sign_artifact(root / f"v{v}", signing_key_for_tests())
        out[v] = root / f"v{v}"
    return out


FETCH_IN = "thread"


@pytest.fixture(autouse=True, params=["thread", "process"])
def fetch_in(request, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "FETCH_IN", request.param)
    return request.param


@pytest.fixture
def learner():
    double = LearnerDouble(chunk_bytes=64 * 1024)
    server, port = serve(double)
    yield double, f"127.0.0.1:{port}"
    server.stop(0)


class Installed:
    """The node's side: records every artifact handed over; can refuse one."""

    def __init__(self, refuse=()):
        self.calls = []
        self.refuse = set(refuse)
        self.lock = threading.Lock()

    def __call__(self, path, manifest):
        with self.lock:
            self.calls.append((manifest.version, path))
        if manifest.version in self.refuse:
            raise RuntimeError("parity check failed: outputs differ by 0.3")

    @property
    def versions(self):
        return [v for v, _ in self.calls]


def _subscriber(addr, tmp_path, installed, current=0, trust=None, **kw):
    trust = trust or Trust.load([public_key_for_tests()])
    if FETCH_IN == "process":
        kw.setdefault("fetch_process", ChannelSpec(addr))
    return WeightSubscriber(addr, "r1", tmp_path / "staging", installed, current_version=current,
                            backoff_cap_s=0.1, trust=trust, **kw).start()


def test_fetches_verifies_and_hands_over(tmp_path, learner, artifacts):
    double, addr = learner
    double.publish(1, artifacts[1])
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed)
    try:
        assert sub.wait_for_version(1, 20.0)
    finally:
        sub.stop()
    [(v, path)] = installed.calls
    assert v == 1 and path == tmp_path / "staging" / "v1"
    assert verify_artifact(path).version == 1
    for name in (POLICY, POLICY_DATA):  # the graph, and its large tensors as external data
        assert (path / name).read_bytes() == (artifacts[1] / name).read_bytes()
    assert sub.fetched == 1 and sub.refused == 0 and "installed version 1" in sub.last_event
    assert [(n, o) for _, n, o in double.fetches] == [(MANIFEST, 0), (POLICY, 0), (POLICY_DATA, 0)]


def test_resumes_a_file_after_the_stream_breaks(tmp_path, learner, artifacts):
    double, addr = learner
    double.break_at[(1, POLICY_DATA)] = 300_000
    double.publish(1, artifacts[1])
    sub = _subscriber(addr, tmp_path, Installed())
    try:
        assert sub.wait_for_version(1, 20.0)
    finally:
        sub.stop()
    assert [(n, o) for _, n, o in double.fetches if n == POLICY_DATA] == \
        [(POLICY_DATA, 0), (POLICY_DATA, 300_000)]
    assert sub.resumed_bytes == 300_000
    assert verify_artifact(tmp_path / "staging" / "v1").version == 1


@pytest.mark.parametrize("name", [POLICY, POLICY_DATA])
def test_tampered_bytes_are_refused_and_the_current_version_kept(tmp_path, learner, artifacts,
                                                                  name):
    double, addr = learner
    good = bytearray((artifacts[2] / name).read_bytes())
    good[1000] ^= 0xFF
    double.tamper[(2, name)] = bytes(good)
    double.publish(2, artifacts[2])
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed, current=1)
    try:
        for _ in range(200):
            if sub.refused:
                break
            sub.wait_for_version(99, 0.05)
        assert sub.refused == 1 and sub.current_version == 1 and installed.calls == []
        assert "tampered" in sub.last_event and "keeping version 1" in sub.last_event
        assert not list((tmp_path / "staging").iterdir())  # nothing of v2 left behind
        double.publish(3, artifacts[3])                      # a newer good version still installs
        assert sub.wait_for_version(3, 20.0)
    finally:
        sub.stop()
    assert installed.versions == [3]


def test_on_artifact_refusal_keeps_current_version(tmp_path, learner, artifacts):
    double, addr = learner
    double.publish(1, artifacts[1])
    installed = Installed(refuse={2})
    sub = _subscriber(addr, tmp_path, installed)
    try:
        assert sub.wait_for_version(1, 20.0)
        double.publish(2, artifacts[2])
        for _ in range(200):
            if sub.refused:
                break
            sub.wait_for_version(99, 0.05)
        assert sub.current_version == 1 and "parity check failed" in sub.last_event
        assert not (tmp_path / "staging" / "v2").exists()
        double.break_subscriptions()  # the re-announced refused version is not fetched again
        double.publish(3, artifacts[3])
        assert sub.wait_for_version(3, 20.0)
    finally:
        sub.stop()
    assert installed.versions == [1, 2, 3] and sub.refused == 1 and sub.reconnects >= 1


def test_latest_wins_during_a_slow_fetch(tmp_path, learner, artifacts):
    double, addr = learner
    double.chunk_bytes, double.chunk_delay_s = 16 * 1024, 0.02  # ~1.4 s per policy.onnx
    double.publish(1, artifacts[1])
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed)
    try:
        for _ in range(200):
            if any(n == "policy.onnx" for _, n, _ in double.fetches):
                break
            sub.wait_for_version(99, 0.02)
        double.publish(2, artifacts[2])
        assert sub.wait_for_version(2, 20.0)
    finally:
        sub.stop()
    assert installed.versions == [2]
    assert "v1.partial" not in {p.name for p in (tmp_path / "staging").iterdir()}


def test_keeps_only_the_last_three_staged_versions(tmp_path, learner, artifacts):
    double, addr = learner
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed)
    try:
        for v in range(1, 6):
            double.publish(v, artifacts[v])
            assert sub.wait_for_version(v, 20.0)
    finally:
        sub.stop()
    assert installed.versions == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in (tmp_path / "staging").iterdir()) == ["v3", "v4", "v5"]


@pytest.mark.parametrize("name", ["../evil.onnx", "sub/policy.onnx", ".."])
def test_refuses_announced_names_that_are_not_plain(tmp_path, learner, artifacts, name):
    double, addr = learner
    double.publish(1, artifacts[1])
    real = double.announcement
    def evil(version):
        ann = real(version)
        ann.files.append(pb.FileInfo(name=name, sha256="0" * 64, size=4))
        return ann
    double.announcement = evil
    sub = _subscriber(addr, tmp_path, Installed())
    try:
        for _ in range(200):
            if sub.refused:
                break
            sub.wait_for_version(99, 0.02)
    finally:
        sub.stop()
    assert sub.refused == 1 and "not a plain file name" in sub.last_event
    assert double.fetches == [] and not (tmp_path / "evil.onnx").exists()


def test_refuses_when_announcement_and_manifest_disagree(tmp_path, learner, artifacts):
    double, addr = learner
    double.publish(1, artifacts[1])
    real = double.announcement
    def lying(version):
        ann = real(version)
        ann.files[1].sha256 = "f" * 64  # policy.onnx: not what the manifest lists
        return ann
    double.announcement = lying
    sub = _subscriber(addr, tmp_path, Installed())
    try:
        for _ in range(200):
            if sub.refused:
                break
            sub.wait_for_version(99, 0.02)
    finally:
        sub.stop()
    assert sub.refused == 1 and "do not match the manifest" in sub.last_event
    assert [n for _, n, _ in double.fetches] == [MANIFEST]  # refused before the big download


def test_both_planes_against_the_real_learner(tmp_path):
    """Recorder -> spool -> stream into the real store; registry publish -> subscriber."""
    pytest.importorskip("torch")
    import numpy as np
    from learner.model import ReferenceVLA, VLAConfig
    from learner.registry import Registry
    from learner.service import serve as serve_learner
    from learner.store import ExperienceStore
    from runtime.recorder import Recorder
    from runtime.spool import Spool
    from runtime.stream import ExperienceClient
    from tests.runtime.test_recorder import _chunk, _tick

    store = ExperienceStore(tmp_path / "store.db")
    registry = Registry(tmp_path / "registry", signing_key=signing_key_for_tests())
    server, port = serve_learner("127.0.0.1:0", store, registry, max_workers=8)
    addr = f"127.0.0.1:{port}"
    spool = Spool(tmp_path / "spool", "r1")
    rec = Recorder(spool, "r1", "reach-v3", batch_records=2)
    client = ExperienceClient(addr, spool, "r1").start()
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed)
    try:
        rng = np.random.default_rng(0)
        rec.start_episode()
        for i in range(5):
            rec.on_tick(_tick(i, _chunk(i // 2, i, rng), i % 2, rng, success=i == 4))
        rec.close()
        assert client.drain(20.0) and client.errors == 0
        assert store.count() == 3 and client.records_stored == 3
        assert [r.seq for _, r in store.read()] == sorted(r.seq for _, r in store.read())
        registry.publish(ReferenceVLA(VLAConfig()), NORM, robot="sawyer_metaworld",
                         control_rate_hz=10.0)
        assert sub.wait_for_version(1, 20.0)
    finally:
        sub.stop()
        client.stop()
        registry.close()
        server.stop(0)
        store.close()
    assert installed.versions == [1] and sub.refused == 0


# -- signatures -------------------------------------------------------------------------------
def _variant(src, dst, change=None, key=None):
    """A copy of a published artifact whose manifest is changed and/or (re)signed."""
    import json
    import shutil
    shutil.copytree(src, dst)
    d = json.loads((dst / MANIFEST).read_text())
    d["signature"] = None
    if change:
        change(d)
    if key is not None:
        d["signature"] = key.sign(d)
    (dst / MANIFEST).write_text(json.dumps(d, indent=2, sort_keys=True))
    return dst


def _wait_until(sub, done) -> bool:
    """Poll ``done()`` for up to ~10 s, letting the subscriber's stream run meanwhile."""
    for _ in range(400):
        if done():
            return True
        sub.wait_for_version(99, 0.025)
    return False


def _wait_refused(sub, n=1):
    return _wait_until(sub, lambda: sub.refused >= n)


def test_unsigned_is_refused_before_the_big_download(tmp_path, learner, artifacts):
    double, addr = learner
    double.publish(2, _variant(artifacts[2], tmp_path / "unsigned"))
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed, current=1)
    try:
        assert _wait_refused(sub)
    finally:
        sub.stop()
    assert "unsigned" in sub.last_event and "keeping version 1" in sub.last_event
    assert [n for _, n, _ in double.fetches] == [MANIFEST] and installed.calls == []
    assert sub.current_version == 1 and not list((tmp_path / "staging").iterdir())


def test_allow_unsigned_accepts_it(tmp_path, learner, artifacts):
    double, addr = learner
    double.publish(2, _variant(artifacts[2], tmp_path / "unsigned"))
    sub = _subscriber(addr, tmp_path, Installed(), current=1, trust=Trust(allow_unsigned=True))
    try:
        assert sub.wait_for_version(2, 20.0)
    finally:
        sub.stop()


@pytest.mark.parametrize("attack", ["unknown key", "re-signed", "tampered manifest"])
def test_foreign_or_tampered_signatures_are_refused(tmp_path, learner, artifacts, attack):
    from learner.signing import SigningKey
    double, addr = learner
    trusted, attacker = signing_key_for_tests(), SigningKey.generate()

    def bigger_actions(d):
        d["normalization"]["action_std"] = [5.0] * 4
    if attack == "unknown key":
        art = _variant(artifacts[2], tmp_path / "a", key=attacker)
    elif attack == "re-signed":  # changed, signed by the attacker under the trusted key's id
        art = _variant(artifacts[2], tmp_path / "a", bigger_actions, key=attacker)
        import json
        d = json.loads((art / MANIFEST).read_text())
        d["signature"]["key_id"] = trusted.key_id
        (art / MANIFEST).write_text(json.dumps(d))
    else:  # changed after the learner signed it
        art = _variant(artifacts[2], tmp_path / "a", key=trusted)
        import json
        d = json.loads((art / MANIFEST).read_text())
        bigger_actions(d)
        (art / MANIFEST).write_text(json.dumps(d))
    double.publish(2, art)
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed, current=1)
    try:
        assert _wait_refused(sub)
        double.publish(3, artifacts[3])   # the learner's next good version still installs
        assert sub.wait_for_version(3, 20.0)
    finally:
        sub.stop()
    expected = "does not trust" if attack == "unknown key" else "does not match the manifest"
    assert any(expected in e and "refused version 2" in e for e in sub.events), list(sub.events)
    assert installed.versions == [3] and sub.refused == 1
    assert ("policy.onnx" not in {n for v, n, _ in double.fetches if v == 2})


def test_truncated_file_is_refused(tmp_path, learner, artifacts):
    double, addr = learner
    data = (artifacts[2] / "policy.onnx").read_bytes()
    double.tamper[(2, "policy.onnx")] = data[: len(data) // 3]
    double.publish(2, artifacts[2])
    sub = _subscriber(addr, tmp_path, Installed(), current=1)
    try:
        assert _wait_refused(sub)
    finally:
        sub.stop()
    assert "truncated" in sub.last_event and sub.current_version == 1
    assert not list((tmp_path / "staging").iterdir())


# -- rollback ---------------------------------------------------------------------------------
def test_rollback_swaps_back_from_memory_and_never_takes_the_version_again(tmp_path, learner,
                                                                           artifacts):
    double, addr = learner
    double.publish(1, artifacts[1])
    installed = Installed()
    held = []

    def on_rollback(version, files):  # the node still holds v1 loaded
        held.append((version, files["policy.onnx"]))
        return True
    sub = _subscriber(addr, tmp_path, installed, on_rollback=on_rollback)
    try:
        assert sub.wait_for_version(1, 20.0)
        double.publish(2, artifacts[2])
        assert sub.wait_for_version(2, 20.0)
        fetches = len(double.fetches)
        double.roll_back_to(1)
        _wait_until(sub, lambda: sub.current_version == 1)
        assert sub.current_version == 1 and sub.rollbacks == 1
        assert len(double.fetches) == fetches        # nothing fetched to go back
        double.publish(2, artifacts[2])              # announced again: ignored for good
        double.publish(3, artifacts[3])
        assert sub.wait_for_version(3, 20.0)
    finally:
        sub.stop()
    sha1 = verify_artifact(artifacts[1]).files["policy.onnx"]["sha256"]
    assert held == [(1, sha1)] and installed.versions == [1, 2, 3]
    assert sub.status()["rolled_back"] == [2] and "rolled back to version 1" in "".join(sub.events)


def test_rollback_without_memory_uses_the_staged_copy(tmp_path, learner, artifacts):
    double, addr = learner
    double.publish(1, artifacts[1])
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed)
    try:
        assert sub.wait_for_version(1, 20.0)
        double.publish(2, artifacts[2])
        assert sub.wait_for_version(2, 20.0)
        fetches = len(double.fetches)
        double.roll_back_to(1)
        _wait_until(sub, lambda: sub.current_version == 1)
    finally:
        sub.stop()
    assert sub.current_version == 1 and installed.versions == [1, 2, 1]
    assert installed.calls[-1][1] == tmp_path / "staging" / "v1"
    assert len(double.fetches) == fetches  # the staged v1 was verified and reused


def test_rollback_during_the_canary_fetch_abandons_it(tmp_path, learner, artifacts):
    double, addr = learner
    double.chunk_bytes, double.chunk_delay_s = 16 * 1024, 0.02
    installed = Installed()
    sub = _subscriber(addr, tmp_path, installed, current=1)
    try:
        double.publish(2, artifacts[2])
        for _ in range(200):
            if any(n == "policy.onnx" for _, n, _ in double.fetches):
                break
            sub.wait_for_version(99, 0.02)
        double.artifacts[1] = str(artifacts[1])
        double.roll_back_to(1)
        assert not sub.wait_for_version(2, 2.0)
    finally:
        sub.stop()
    assert installed.calls == [] and sub.current_version == 1
    assert 2 in sub.status()["rolled_back"]
