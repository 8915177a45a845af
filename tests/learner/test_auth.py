"""Mutual TLS on real loopback gRPC with real certificates (learner/auth.py, runtime/tls.py):
who can connect, and that a robot can write only its own experience."""
import threading

import grpc
import pytest

from learner import certs
from learner.auth import (LEARNER, OPERATOR, ROBOT, Identity, ServerTls, parse_identity,
                          tls_from_args)
from learner.registry import Registry
from learner.service import serve
from learner.store import ExperienceStore
from runtime.artifact import MANIFEST, sha256_file
from runtime.fetch_process import ChannelSpec
from runtime.signature import Trust
from runtime.spool import Spool
from runtime.stream import ExperienceClient
from runtime.tls import TlsConfig, TlsError
from runtime.weights import WeightSubscriber
from tests.doubles import public_key_for_tests, signing_key_for_tests
from tests.learner.helpers import simple_record
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

TIMEOUT = 10


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A fleet CA with its identities, and a rogue CA that issued look-alikes."""
    root = tmp_path_factory.mktemp("pki")
    certs.init_ca(root / "ca")
    certs.init_ca(root / "rogue-ca")
    ids = {name: certs.issue(root / "ca", role, name, root / name, hosts=certs.DEFAULT_HOSTS)
           for role, name in ((ROBOT, "r1"), (ROBOT, "r2"), (OPERATOR, "ops"), (LEARNER, "learner"))}
    ids["rogue-r1"] = certs.issue(root / "rogue-ca", ROBOT, "r1", root / "rogue-r1")
    ids["rogue-learner"] = certs.issue(root / "rogue-ca", LEARNER, "learner", root / "rogue-learner",
                                       hosts=certs.DEFAULT_HOSTS)
    # a learner certificate for a name only: robots dialling 127.0.0.1 must override the name
    ids["named-learner"] = certs.issue(root / "ca", LEARNER, "learner", root / "named-learner",
                                       hosts=("learner.fleet.example",))
    return ids


def server_tls(issued) -> ServerTls:
    return ServerTls(str(issued.cert), str(issued.key), str(issued.ca))


def client_tls(issued, ca=None, server_name=None) -> TlsConfig:
    return TlsConfig(str(issued.cert), str(issued.key), str(ca or issued.ca), server_name)


class Learner:
    def __init__(self, root, pretrained, tls: ServerTls):
        artifact, ckpt, _ = pretrained
        self.store = ExperienceStore(root / "exp.sqlite")
        self.registry = Registry(root / "reg", signing_key=signing_key_for_tests())
        self.registry.import_initial(artifact, ckpt)
        self.server, port = serve("127.0.0.1:0", self.store, self.registry, tls=tls)
        self.addr = f"127.0.0.1:{port}"
        self.channels = []

    def stub(self, channel_factory=None, tls: TlsConfig | None = None, addr=None):
        factory = channel_factory or tls.channel_factory()
        channel = factory(addr or self.addr)
        self.channels.append(channel)
        return pb_grpc.LearnerStub(channel)

    def close(self):
        for c in self.channels:
            c.close()
        self.registry.close()
        self.server.stop(grace=1).wait()
        self.store.close()


@pytest.fixture
def learner(tmp_path, pki, pretrained):
    lrn = Learner(tmp_path, pretrained, server_tls(pki["learner"]))
    yield lrn
    lrn.close()


def batch(robot, batch_seq=0, seqs=(0, 1), record_robot=None):
    return pb.ExperienceBatch(robot_id=robot, batch_seq=batch_seq, records=[
        simple_record(robot=record_robot or robot, episode=f"e{batch_seq}", seq=s) for s in seqs])


def denied(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def test_a_robot_pushes_its_own_experience_and_an_operator_reads_stats(learner, pki):
    r1 = learner.stub(tls=client_tls(pki["r1"]))
    ack = r1.PushExperience(batch("r1"), timeout=TIMEOUT)
    assert (ack.robot_id, ack.stored, ack.duplicates) == ("r1", 2, 0)
    # dialled by name too: the learner's certificate lists localhost
    ack = learner.stub(tls=client_tls(pki["r1"]),
                       addr=learner.addr.replace("127.0.0.1", "localhost")).PushExperience(
        batch("r1", 1, (2,)), timeout=TIMEOUT)
    assert ack.stored == 1
    stats = learner.stub(tls=client_tls(pki["ops"])).GetStats(pb.StatsRequest(), timeout=TIMEOUT)
    assert stats.records_stored == 3 and [r.robot_id for r in stats.robots] == ["r1"]


def test_a_robot_cannot_write_another_robots_experience(learner, pki):
    r2 = learner.stub(tls=client_tls(pki["r2"]))
    e = denied(lambda: r2.PushExperience(batch("r1"), timeout=TIMEOUT))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'r1'" in e.details() and "robot 'r2'" in e.details(), e.details()
    # its own batch id with a record of another robot inside
    e = denied(lambda: r2.PushExperience(batch("r2", record_robot="r1"), timeout=TIMEOUT))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "record 0" in e.details()
    assert learner.store.count() == 0  # nothing of either was stored
    assert r2.PushExperience(batch("r2"), timeout=TIMEOUT).stored == 2  # its own: fine


def test_a_stream_is_refused_at_the_first_batch_of_another_robot(learner, pki):
    r1 = learner.stub(tls=client_tls(pki["r1"]))
    batches = [batch("r1", 0, (0, 1)), batch("r1", 1, (2, 3)), batch("r2", 2, (0,)),
               batch("r1", 3, (4,))]
    acks = []
    e = denied(lambda: acks.extend(r1.StreamExperience(iter(batches), timeout=TIMEOUT)))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED, e.details()
    assert "batch 2" in e.details() and "'r2'" in e.details()
    # the batches before it were stored and acknowledged; it and everything after it were not
    assert [(a.batch_seq, a.stored) for a in acks] == [(0, 2), (1, 2)]
    assert learner.store.count() == 4
    assert set(learner.store.stats()) == {"r1"}


def test_roles_limit_what_each_identity_may_call(learner, pki):
    ops = learner.stub(tls=client_tls(pki["ops"]))
    for call in (lambda: ops.PushExperience(batch("ops"), timeout=TIMEOUT),
                 lambda: next(ops.Subscribe(pb.SubscribeRequest(robot_id="ops"), timeout=TIMEOUT))):
        e = denied(call)
        assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "operator 'ops'" in e.details()
    r1 = learner.stub(tls=client_tls(pki["r1"]))
    e = denied(lambda: r1.GetStats(pb.StatsRequest(), timeout=TIMEOUT))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "operator" in e.details()
    # a robot subscribes only as itself (the rollout assigns versions per robot id)
    e = denied(lambda: next(r1.Subscribe(pb.SubscribeRequest(robot_id="r2"), timeout=TIMEOUT)))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "'r2'" in e.details()
    # an operator may download a version
    chunk = next(ops.FetchArtifact(pb.FetchRequest(version=1, name=MANIFEST), timeout=TIMEOUT))
    assert chunk.data.startswith(b"{")
    assert learner.store.count() == 0


@pytest.mark.parametrize("client", ["plaintext", "no certificate", "certificate of another CA",
                                    "the learner's server certificate"])
def test_clients_without_a_fleet_certificate_cannot_connect(learner, pki, client):
    real_ca = pki["r1"].ca.read_bytes()
    if client == "plaintext":
        factory = grpc.insecure_channel
    elif client == "no certificate":
        creds = grpc.ssl_channel_credentials(root_certificates=real_ca)
        factory = lambda addr: grpc.secure_channel(addr, creds)  # noqa: E731
    elif client == "certificate of another CA":  # a look-alike robot r1
        factory = client_tls(pki["rogue-r1"], ca=pki["r1"].ca).channel_factory()
    else:  # signed by the fleet CA, but for serving only (EKU serverAuth)
        factory = client_tls(pki["learner"]).channel_factory()
    stub = learner.stub(factory)
    e = denied(lambda: stub.PushExperience(batch("r1"), timeout=5))
    # refused by the TLS handshake: no handler ran, the client sees UNAVAILABLE
    assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
    assert learner.store.count() == 0


def test_a_fleet_certificate_without_a_tether_identity_is_unauthenticated(learner, pki, tmp_path):
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    ca_cert, ca_key = certs.load_ca(pki["r1"].ca.parent.parent / "ca")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "r1")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.write_private_key(tmp_path / "key.pem", key)
    stub = learner.stub(tls=TlsConfig(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"),
                                      str(pki["r1"].ca)))
    e = denied(lambda: stub.PushExperience(batch("r1"), timeout=TIMEOUT))  # CN r1 is not enough
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED and "spiffe://tether" in e.details()
    assert learner.store.count() == 0


def test_a_robot_refuses_a_learner_its_fleet_ca_did_not_sign(tmp_path, pki, pretrained):
    # the impostor accepts fleet robots (it trusts the fleet CA); the robot checks it back
    rogue = pki["rogue-learner"]
    impostor = Learner(tmp_path, pretrained,
                       ServerTls(str(rogue.cert), str(rogue.key), str(pki["r1"].ca)))
    try:
        stub = impostor.stub(tls=client_tls(pki["r1"]))
        e = denied(lambda: stub.PushExperience(batch("r1"), timeout=5))
        assert e.code() == grpc.StatusCode.UNAVAILABLE
        assert impostor.store.count() == 0
    finally:
        impostor.close()


def test_the_learner_name_checked_can_be_overridden(tmp_path, pki, pretrained):
    """A learner certificate for learner.fleet.example only, dialled at 127.0.0.1."""
    lrn = Learner(tmp_path, pretrained, server_tls(pki["named-learner"]))
    try:
        plain = lrn.stub(tls=client_tls(pki["r1"]))
        assert denied(lambda: plain.PushExperience(batch("r1"), timeout=5)).code() == \
            grpc.StatusCode.UNAVAILABLE
        named = lrn.stub(tls=client_tls(pki["r1"], server_name="learner.fleet.example"))
        assert named.PushExperience(batch("r1"), timeout=TIMEOUT).stored == 2
    finally:
        lrn.close()


@pytest.mark.parametrize("fetch_in", ["thread", "process"])
def test_the_robot_side_clients_work_over_mutual_tls(learner, pki, tmp_path, fetch_in):
    """The real robot path: the spool's experience client and the weight subscriber (Subscribe
    and the chunked FetchArtifact, in a thread or in the fetch process of its own) with the
    robot's certificate."""
    tls = client_tls(pki["r1"])
    factory = tls.channel_factory()
    fetch = {} if fetch_in == "thread" else {
        "fetch_process": ChannelSpec(learner.addr, tls.cert, tls.key, tls.ca)}
    spool = Spool(tmp_path / "spool", "r1")
    for i in range(3):
        spool.append([simple_record(robot="r1", episode="e", seq=2 * i + k) for k in range(2)])
    client = ExperienceClient(learner.addr, spool, "r1", channel_factory=factory).start()
    installed = threading.Event()
    got = {}

    def on_artifact(path, manifest):
        got.update(path=path, version=manifest.version)
        installed.set()

    sub = WeightSubscriber(learner.addr, "r1", tmp_path / "weights", on_artifact,
                           channel_factory=factory, trust=Trust.load([public_key_for_tests()]),
                           **fetch).start()
    try:
        assert client.drain(timeout=20), client.stats()
        assert installed.wait(20), sub.status()
    finally:
        client.stop()
        sub.stop()
    assert learner.store.count() == 6 and client.errors == 0
    assert got["version"] == 1
    for name, sha, _ in learner.registry.files(1):
        assert sha256_file(got["path"] / name) == sha


def test_bad_tls_files_fail_at_start_with_a_clear_message(pki, tmp_path):
    with pytest.raises(ValueError, match="is not the private key"):
        ServerTls(str(pki["learner"].cert), str(pki["r1"].key), str(pki["learner"].ca)).credentials()
    with pytest.raises(TlsError, match="--tls-ca .*missing"):
        TlsConfig(str(pki["r1"].cert), str(pki["r1"].key), str(tmp_path / "missing")).credentials()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TlsError, match="not a PEM file"):
        TlsConfig(str(tmp_path / "junk.pem"), str(pki["r1"].key), str(pki["r1"].ca)).credentials()


def test_the_learner_requires_tls_or_an_explicit_insecure(pki):
    import argparse
    from learner.auth import add_tls_arguments
    p = argparse.ArgumentParser()
    add_tls_arguments(p)
    with pytest.raises(ValueError, match="no TLS configured.*--insecure"):
        tls_from_args(p.parse_args([]))
    with pytest.raises(ValueError, match="missing --tls-key, --tls-ca"):
        tls_from_args(p.parse_args(["--tls-cert", str(pki["learner"].cert)]))
    with pytest.raises(ValueError, match="contradict"):
        tls_from_args(p.parse_args(["--insecure", "--tls-ca", str(pki["learner"].ca)]))
    assert tls_from_args(p.parse_args(["--insecure"])) is None
    d = pki["learner"]
    tls = tls_from_args(p.parse_args(["--tls-cert", str(d.cert), "--tls-key", str(d.key),
                                      "--tls-ca", str(d.ca)]))
    assert tls == ServerTls(str(d.cert), str(d.key), str(d.ca))


def test_identities_are_read_only_from_tether_uris():
    assert parse_identity("spiffe://tether/robot/robot-0") == Identity(ROBOT, "robot-0")
    assert parse_identity("spiffe://tether/operator/ops") == Identity(OPERATOR, "ops")
    for uri in ("spiffe://other/robot/r1", "spiffe://tether/admin/r1", "spiffe://tether/robot/",
                "spiffe://tether/robot/../r1", "spiffe://tether/robot/r1/x", "https://tether/robot/r1"):
        assert parse_identity(uri) is None, uri
