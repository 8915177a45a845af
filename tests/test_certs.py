"""``tether certs`` (learner/certs.py): the fleet CA and its certificates, on real files; and the
robot's TLS flags (``tether robot``)."""
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from learner import certs


def load(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def ca(tmp_path):
    old = os.umask(0)  # a permissive umask must not widen the private keys
    try:
        certs.init_ca(tmp_path / "ca")
    finally:
        os.umask(old)
    return tmp_path / "ca"


def test_init_makes_a_ca_that_signs_leaves_only(ca):
    cert = load(ca / "ca.pem")
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert mode(ca / "ca.key") == 0o600
    assert not [p for p in ca.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_a_robot_certificate_names_the_robot_and_is_signed_by_the_ca(ca, tmp_path):
    issued = certs.issue(ca, "robot", "robot-7", tmp_path / "r7")
    cert = load(issued.cert)
    cert.verify_directly_issued_by(load(ca / "ca.pem"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "robot-7"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == \
        ["spiffe://tether/robot/robot-7"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert mode(issued.key) == 0o600 and issued.ca.read_bytes() == (ca / "ca.pem").read_bytes()
    assert cert.not_valid_after_utc <= load(ca / "ca.pem").not_valid_after_utc


def test_the_learner_certificate_lists_the_hosts_robots_dial(ca, tmp_path):
    issued = certs.issue(ca, "learner", "learner", tmp_path / "l",
                         hosts=("localhost", "127.0.0.1", "learner.example.com", "10.1.2.3"))
    cert = load(issued.cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "learner.example.com"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == \
        [ExtendedKeyUsageOID.SERVER_AUTH]
    with pytest.raises(ValueError, match="neither an IP address nor a DNS name"):
        certs.issue(ca, "learner", "learner", tmp_path / "bad", hosts=("a host",))


def test_nothing_is_overwritten_without_force(ca, tmp_path):
    key_before = (ca / "ca.key").read_bytes()
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        certs.init_ca(ca)
    assert (ca / "ca.key").read_bytes() == key_before
    first = certs.issue(ca, "robot", "r1", tmp_path / "r1")
    cert_before = first.cert.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        certs.issue(ca, "robot", "r1", tmp_path / "r1")
    assert first.cert.read_bytes() == cert_before
    again = certs.issue(ca, "robot", "r1", tmp_path / "r1", force=True)
    assert again.cert.read_bytes() != cert_before and mode(again.key) == 0o600


@pytest.mark.parametrize("name", ["", "../r1", "a/b", "-r", "r 1", "x" * 65, "r\n1"])
def test_identity_names_are_plain(ca, tmp_path, name):
    with pytest.raises(ValueError, match="not allowed"):
        certs.issue(ca, "robot", name, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_missing_or_mismatched_ca_is_named(ca, tmp_path):
    with pytest.raises(ValueError, match="tether certs init"):
        certs.issue(tmp_path / "nowhere", "robot", "r1", tmp_path / "r1")
    certs.init_ca(tmp_path / "other")
    (ca / "ca.key").write_bytes((tmp_path / "other" / "ca.key").read_bytes())
    with pytest.raises(ValueError, match="is not the key of"):
        certs.issue(ca, "robot", "r1", tmp_path / "r1")


def test_the_command_line(tmp_path):
    def tether(*args):
        return subprocess.run([sys.executable, "-m", "tether.cli", "certs", *args],
                              capture_output=True, text=True, timeout=60)
    r = tether("init", "--out", str(tmp_path / "ca"))
    assert r.returncode == 0 and "ca.key" in r.stdout, r.stderr
    r = tether("robot", "robot-0", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "r0"))
    assert r.returncode == 0 and "spiffe://tether/robot/robot-0" in r.stdout
    assert f"--tls-key {tmp_path / 'r0' / 'key.pem'}" in r.stdout  # the flags to pass on
    r = tether("robot", "robot-0", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "r0"))
    assert r.returncode == 1 and "refusing to overwrite" in r.stderr
    r = tether("learner", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "l"),
               "--host", "10.0.0.9")
    assert r.returncode == 0 and "127.0.0.1" in r.stdout and "10.0.0.9" in r.stdout
    assert mode(tmp_path / "l" / "key.pem") == 0o600


def test_tether_robot_needs_tls_or_an_explicit_insecure_to_reach_a_learner(tmp_path, capsys):
    from runtime.node import parse_args
    base = ["--robot-id", "r", "--task", "t", "--artifact", "a", "--learner", "127.0.0.1:1"]
    with pytest.raises(SystemExit) as e:
        parse_args(base)
    assert e.value.code == 2 and "--insecure" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(base + ["--tls-cert", "c.pem"])
    assert "missing --tls-key --tls-ca" in capsys.readouterr().err
    assert parse_args(base + ["--insecure"]).insecure
    config = parse_args(base + ["--tls-cert", "c", "--tls-key", "k", "--tls-ca", "ca"])
    assert (config.tls_cert, config.tls_key, config.tls_ca, config.insecure) == ("c", "k", "ca", False)
    assert parse_args(base[:-2]).learner is None  # offline: neither is needed
