"""``tether certs``: the fleet's certificate authority and one certificate per identity, for
mutual TLS between robots and the learner (learner/auth.py, runtime/tls.py).

``tether certs init --out CA_DIR``                     a new fleet CA: ca.pem, ca.key (0600)
``tether certs robot ROBOT_ID --ca CA_DIR --out DIR``  a robot's client certificate
``tether certs learner --ca CA_DIR --out DIR [--host H ...]``  the learner's server certificate
``tether certs operator NAME --ca CA_DIR --out DIR``   a person's or tool's client certificate
                                                       (GetStats and artifact fetches only)

Every issued folder holds ``cert.pem``, ``key.pem`` (0600) and a copy of the CA's ``ca.pem``:
everything its holder needs (``--tls-cert DIR/cert.pem --tls-key DIR/key.pem --tls-ca
DIR/ca.pem``). The identity is the URI SAN ``spiffe://tether/<role>/<name>`` (the CN repeats
the name); the learner reads it from the TLS session, never from a message.

Keys are ECDSA P-256 (what every gRPC TLS stack accepts); private keys are written to a
temporary name with mode 0600, fsynced and renamed. Nothing is overwritten without ``--force``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import os
import pathlib
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from learner.auth import LEARNER, OPERATOR, ROBOT, check_name, identity_uri
from runtime.artifact import fsync_dir, write_atomic

CA_CERT, CA_KEY = "ca.pem", "ca.key"
CERT, KEY = "cert.pem", "key.pem"
CA_DAYS = 3650
LEAF_DAYS = 825
CLOCK_SKEW = datetime.timedelta(minutes=5)  # robots whose clocks run a little behind still accept
DEFAULT_HOSTS = ("localhost", "127.0.0.1")


@dataclasses.dataclass(frozen=True)
class Issued:
    """Where an identity's files were written."""
    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path
    identity: str

    def flags(self) -> str:
        return f"--tls-cert {self.cert} --tls-key {self.key} --tls-ca {self.ca}"


def write_private_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey) -> None:
    """PKCS#8 PEM, mode 0600 from creation (umask cannot widen it), atomically."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an old tmp file with wider bits gets narrowed too
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _refuse_existing(paths, force: bool, why: str) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{', '.join(existing)} already exist; refusing to overwrite "
                              f"them ({why}); pass --force if you mean it")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def init_ca(out: str | os.PathLike, *, name: str = "Tether fleet CA", days: int = CA_DAYS,
            force: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
    """A self-signed CA that may sign leaf certificates only (path length 0): (ca.pem, ca.key)."""
    out = pathlib.Path(out)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    _refuse_existing((cert_path, key_path), force, "a new CA invalidates every certificate the "
                     "old one signed")
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tether"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - CLOCK_SKEW)
            .not_valid_after(_now() + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    write_private_key(key_path, key)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def load_ca(ca_dir: str | os.PathLike) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_dir = pathlib.Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as e:
        raise ValueError(f"{e.filename} is missing; --ca must be a folder made by "
                         f"`tether certs init --out DIR`") from None
    except ValueError as e:
        raise ValueError(f"{ca_dir} does not hold a readable CA ({e}); make one with "
                         f"`tether certs init`") from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise ValueError(f"{ca_dir / CA_KEY} is not the key of {ca_dir / CA_CERT}")
    return cert, key


def _san(role: str, name: str, hosts) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity_uri(role, name))]
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:@"):
                raise ValueError(f"--host {host!r} is neither an IP address nor a DNS name")
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def issue(ca_dir: str | os.PathLike, role: str, name: str, out: str | os.PathLike, *,
          hosts=(), days: int = LEAF_DAYS, force: bool = False) -> Issued:
    """Sign a certificate for ``role``/``name`` with the CA in ``ca_dir``; write cert.pem,
    key.pem (0600) and ca.pem into ``out``. ``hosts``: the learner's DNS names / IPs (the names
    robots dial); ignored for client roles."""
    if role not in (ROBOT, OPERATOR, LEARNER):
        raise ValueError(f"role {role!r} unknown; use {ROBOT}, {OPERATOR} or {LEARNER}")
    check_name(name)
    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    out = pathlib.Path(out)
    ca_dir = pathlib.Path(ca_dir)
    cert_path, key_path, ca_copy = out / CERT, out / KEY, out / CA_CERT
    same_dir = ca_copy.resolve() == (ca_dir / CA_CERT).resolve()
    _refuse_existing((cert_path, key_path) + (() if same_dir else (ca_copy,)), force,
                     "an identity's files are issued once; use another --out")
    ca_cert, ca_key = load_ca(ca_dir)
    if ca_cert.not_valid_after_utc < _now():
        raise ValueError(f"the CA in {ca_dir} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
                         f"make a new one (`tether certs init`) and re-issue every certificate")
    server = role == LEARNER
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tether"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    not_after = min(_now() + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False,
                                         crl_sign=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(_san(role, name, hosts if server else ()), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    write_private_key(key_path, key)
    write_atomic(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    if not same_dir:
        write_atomic(ca_copy, ca_cert.public_bytes(serialization.Encoding.PEM))
    return Issued(cert_path, key_path, ca_copy, identity_uri(role, name))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tether certs", description="The fleet CA and mutual-TLS "
                                "certificates for robots, the learner and operators.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s, with_ca=True):
        if with_ca:
            s.add_argument("--ca", required=True, help="the CA folder (`tether certs init`)")
        s.add_argument("--out", required=True, help="folder to write into")
        s.add_argument("--days", type=int, default=LEAF_DAYS if with_ca else CA_DAYS,
                       help="validity in days")
        s.add_argument("--force", action="store_true", help="overwrite existing files")

    common(sub.add_parser("init", help=f"create a fleet CA ({CA_CERT}, {CA_KEY})"), with_ca=False)
    r = sub.add_parser("robot", help="issue a robot's client certificate")
    r.add_argument("name", metavar="ROBOT_ID", help="the robot id its experience carries")
    common(r)
    s = sub.add_parser("learner", help="issue the learner's server certificate")
    s.add_argument("--host", action="append", default=[], metavar="HOST",
                   help=f"DNS name or IP robots dial, repeatable (default and always: "
                        f"{', '.join(DEFAULT_HOSTS)})")
    s.add_argument("--name", default="learner", help="the learner's name (CN and URI SAN)")
    common(s)
    o = sub.add_parser("operator", help="issue a client certificate for a person or tool "
                                        "(GetStats, artifact fetches; never pushes experience)")
    o.add_argument("name", metavar="NAME")
    common(o)
    a = p.parse_args(argv)
    try:
        if a.cmd == "init":
            cert, key = init_ca(a.out, days=a.days, force=a.force)
            print(f"fleet CA: {cert} (give it to every robot and the learner), {key} (mode 600: "
                  f"keep it offline; it can mint any identity)")
            return 0
        hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, *a.host])) if a.cmd == "learner" else ()
        issued = issue(a.ca, a.cmd, a.name, a.out, hosts=hosts, days=a.days, force=a.force)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"tether certs: {e}", file=sys.stderr)
        return 1
    what = f" for {', '.join(hosts)}" if hosts else ""
    print(f"{issued.identity}{what}: {issued.flags()}")
    return 0
