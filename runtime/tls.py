"""Mutual TLS to the learner: the robot's certificate and key, and the fleet CA that signed the
learner's (``tether certs``). ``TlsConfig(...).channel_factory()`` is what ExperienceClient and
WeightSubscriber take as ``channel_factory``.

The robot checks that the learner's certificate was signed by the fleet CA and names the host
it dials (``localhost``/``127.0.0.1`` and the ``--host`` names given to ``tether certs learner``);
``server_name`` overrides the name checked, for a learner reached by an address its certificate
does not list (a tunnel, a NAT). A handshake that fails (wrong CA, a certificate the learner
does not accept, a name mismatch, a plaintext learner) shows up on the robot as UNAVAILABLE,
retried with backoff like any outage; the learner's log says why it refused.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import stat
from typing import Callable

import grpc

from runtime.stream import CHANNEL_OPTIONS

log = logging.getLogger(__name__)


class TlsError(ValueError):
    """The robot's TLS files are missing, unreadable or inconsistent."""


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    cert: str                       # this robot's certificate (PEM)
    key: str                        # its private key (PEM, mode 600)
    ca: str                         # the fleet CA certificate (PEM)
    server_name: str | None = None  # name to check in the learner's certificate (default: host)

    def __post_init__(self):
        for name in ("cert", "key", "ca"):
            if not getattr(self, name):
                raise TlsError(f"TlsConfig needs {name} (--tls-{name}); make the files with "
                                 f"`tether certs`")

    @classmethod
    def from_dir(cls, folder: str | os.PathLike, server_name: str | None = None) -> "TlsConfig":
        """A folder written by ``tether certs robot|operator NAME --out DIR``."""
        folder = pathlib.Path(folder)
        return cls(str(folder / "cert.pem"), str(folder / "key.pem"), str(folder / "ca.pem"),
                   server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        cert, key, ca = (read_pem(p, flag) for p, flag in
                         ((self.cert, "--tls-cert"), (self.key, "--tls-key"), (self.ca, "--tls-ca")))
        check_key_pair(self.cert, cert, self.key, key)
        _warn_if_readable(self.key)
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                            certificate_chain=cert)

    def channel_factory(self, extra_options: tuple = ()) -> Callable[[str], grpc.Channel]:
        """Reads the files now (a missing or unreadable file fails here, not on first use).
        ``extra_options``: gRPC channel arguments on top of the common ones."""
        creds = self.credentials()
        options = list(CHANNEL_OPTIONS) + list(extra_options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))

        def secure_channel(addr: str) -> grpc.Channel:
            return grpc.secure_channel(addr, creds, options=options)
        return secure_channel


def read_pem(path: str, flag: str) -> bytes:
    try:
        data = pathlib.Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"{flag} {path}: {e.strerror}; make it with `tether certs`") from None
    if b"-----BEGIN " not in data:
        raise TlsError(f"{flag} {path} is not a PEM file (made by `tether certs`?)")
    return data


def check_key_pair(cert_path: str, cert: bytes, key_path: str, key: bytes) -> None:
    """A key that is not the certificate's fails inside the TLS stack, on every connection
    attempt, with no useful message: say it once, at start."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise TlsError(f"cannot load {cert_path} / {key_path}: {e}") from None
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(*der) != private.public_key().public_bytes(*der):
        raise TlsError(f"{key_path} is not the private key of {cert_path}")


def _warn_if_readable(path: str) -> None:
    try:
        mode = pathlib.Path(path).stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("tls: private key %s is readable by group/others (mode %o); chmod 600 it",
                    path, mode & 0o777)
