"""Who may call the learner: mutual TLS identities and per-method rules (DESIGN.md, Security).

Every client presents a certificate signed by the fleet CA (``tether certs``, learner/certs.py);
a client without one, or with one from another CA, fails the TLS handshake and never reaches a
handler (the client sees UNAVAILABLE). The identity is the certificate's URI SAN
``spiffe://tether/<role>/<name>``, read from the TLS session (``context.auth_context()``),
never from a message:

==============  ===================================================================
role            may call
==============  ===================================================================
robot NAME      PushExperience, StreamExperience (every batch and record must carry
                robot_id NAME), Subscribe (robot_id NAME), FetchArtifact
operator NAME   GetStats, FetchArtifact (people and the learner's own tools; an
                operator never writes experience or joins a rollout)
==============  ===================================================================

Anything else is refused with PERMISSION_DENIED naming both identities, before the method runs:
nothing of a refused call is stored. A method without a rule here is refused too (new methods
must say who may call them). The rules live in one interceptor (``FleetAuth``) so that every
method, present and future, goes through them.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
from typing import Callable, Iterator

import grpc

from runtime.tls import check_key_pair, read_pem

log = logging.getLogger("tether.learner.auth")

TRUST_DOMAIN = "tether"
ROBOT, OPERATOR, LEARNER = "robot", "operator", "learner"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
SERVICE = "/tether.v1.Learner/"


def check_name(name: str) -> str:
    """Identity names are robot ids: 1-64 of letters, digits, '.', '_', '-' (not first)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"identity name {name!r} is not allowed: use 1-64 letters, digits, "
                         f"'.', '_' or '-', starting with a letter or digit")
    return name


def identity_uri(role: str, name: str) -> str:
    return f"{_PREFIX}{role}/{check_name(name)}"


@dataclasses.dataclass(frozen=True)
class Identity:
    role: str
    name: str

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}"


def parse_identity(uri: str) -> Identity | None:
    """``spiffe://tether/<role>/<name>`` -> Identity; None for anything else."""
    if not uri.startswith(_PREFIX):
        return None
    role, _, name = uri[len(_PREFIX):].partition("/")
    if role not in (ROBOT, OPERATOR, LEARNER) or not _NAME.match(name):
        return None
    return Identity(role, name)


def peer_identity(context) -> Identity | None:
    """The caller's identity from its TLS certificate, or None (plaintext, or a certificate
    naming no tether identity, or more than one)."""
    uris = context.auth_context().get("peer_uri", ())
    found = {i for i in (parse_identity(u.decode("utf-8", "replace")) for u in uris) if i}
    return found.pop() if len(found) == 1 else None


# -- server credentials ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServerTls:
    """The learner's certificate and key, and the fleet CA whose certificates it accepts."""
    cert: str
    key: str
    ca: str

    def __post_init__(self):
        for name in ("cert", "key", "ca"):
            if not getattr(self, name):
                raise ValueError(f"ServerTls needs {name} (--tls-{name}); make the files with "
                                 f"`tether certs learner`")

    def credentials(self) -> grpc.ServerCredentials:
        """Mutual TLS: clients must present a certificate the fleet CA signed."""
        cert, key, ca = (read_pem(p, flag) for p, flag in
                         ((self.cert, "--tls-cert"), (self.key, "--tls-key"), (self.ca, "--tls-ca")))
        check_key_pair(self.cert, cert, self.key, key)
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                           require_client_auth=True)

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> "ServerTls":
        """A folder written by ``tether certs learner --out DIR``."""
        folder = pathlib.Path(folder)
        return cls(str(folder / "cert.pem"), str(folder / "key.pem"), str(folder / "ca.pem"))


# -- per-method rules -----------------------------------------------------------------------
class Denied(Exception):
    """A request in a stream broke the rules; the interceptor ends the call with it."""


def _id(value: str) -> str:
    """An id from a message, for an error message: it may be of any length."""
    return repr(value) if len(value) <= 80 else f"{value[:80]!r}... ({len(value)} characters)"


def _own_batch(who: Identity, batch) -> str | None:
    if batch.robot_id != who.name:
        return (f"batch {batch.batch_seq} carries robot_id {_id(batch.robot_id)} but the "
                f"certificate is {who}; a robot may only write its own experience")
    for i, r in enumerate(batch.records):
        if r.robot_id != who.name:
            return (f"batch {batch.batch_seq} record {i} carries robot_id {_id(r.robot_id)} but "
                    f"the certificate is {who}; a robot may only write its own experience")
    return None


def _own_subscription(who: Identity, request) -> str | None:
    if request.robot_id != who.name:
        return (f"Subscribe for robot_id {_id(request.robot_id)} but the certificate is {who}; "
                f"a robot subscribes as itself")
    return None


@dataclasses.dataclass(frozen=True)
class Rule:
    roles: frozenset
    check: Callable | None = None  # (identity, request) -> reason it is refused, or None


RULES: dict[str, Rule] = {
    "PushExperience": Rule(frozenset({ROBOT}), _own_batch),
    "StreamExperience": Rule(frozenset({ROBOT}), _own_batch),   # checked per batch
    "Subscribe": Rule(frozenset({ROBOT}), _own_subscription),
    "FetchArtifact": Rule(frozenset({ROBOT, OPERATOR})),
    "GetStats": Rule(frozenset({OPERATOR})),
}


class FleetAuth(grpc.ServerInterceptor):
    """Wraps every handler of the service: identity from the TLS session, then ``RULES``."""

    def __init__(self, rules: dict[str, Rule] | None = None):
        self.rules = RULES if rules is None else rules
        self.denied = 0  # calls refused, for tests and stats

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method
        method = full[len(SERVICE):] if full.startswith(SERVICE) else full
        rule = self.rules.get(method) if full.startswith(SERVICE) else None
        if handler.request_streaming:
            # stream-unary: no such method in the service; its requests would go unchecked
            kind = "stream_stream" if handler.response_streaming else "stream_unary"
            wrap = self._stream if handler.response_streaming else self._unchecked_stream
        else:
            kind = "unary_stream" if handler.response_streaming else "unary_unary"
            wrap = self._unary
        return getattr(grpc, f"{kind}_rpc_method_handler")(
            wrap(getattr(handler, kind), method, rule), handler.request_deserializer,
            handler.response_serializer)

    def _deny(self, context, message: str, code=grpc.StatusCode.PERMISSION_DENIED):
        self.denied += 1
        log.warning("auth: refused %s: %s", context.peer(), message)  # a security event
        context.abort(code, message)

    def _admit(self, context, method: str, rule: Rule | None) -> Identity:
        who = peer_identity(context)
        if who is None:
            self._deny(context, f"{method}: the client certificate names no tether identity (a "
                                f"URI SAN spiffe://tether/<role>/<name>); issue one with `tether "
                                f"certs`", grpc.StatusCode.UNAUTHENTICATED)
        if rule is None:
            self._deny(context, f"{method} has no access rule (learner/auth.py RULES); refused "
                                f"for {who}")
        if who.role not in rule.roles:
            self._deny(context, f"{method} is not allowed for {who}; it needs a "
                                f"{' or '.join(sorted(rule.roles))} certificate")
        return who

    def _unary(self, behaviour, method: str, rule: Rule | None):
        def call(request, context):
            who = self._admit(context, method, rule)
            why = rule.check(who, request) if rule.check is not None else None
            if why:
                self._deny(context, f"{method} refused, nothing stored: {why}")
            return behaviour(request, context)
        return call

    def _unchecked_stream(self, behaviour, method: str, rule: Rule | None):
        def call(requests, context):
            who = self._admit(context, method, rule)
            if rule.check is not None:
                self._deny(context, f"{method}: per-request checks of client streams that answer "
                                    f"once are not implemented (learner/auth.py); refused for {who}")
            return behaviour(requests, context)
        return call

    def _stream(self, behaviour, method: str, rule: Rule | None):
        def call(requests, context):
            who = self._admit(context, method, rule)
            denied: list[str] = []

            def checked() -> Iterator:
                for request in requests:
                    why = rule.check(who, request) if rule.check is not None else None
                    if why:
                        denied.append(f"{method} refused, nothing of this batch stored: {why}")
                        raise Denied(denied[0])  # the handler's reader stops here
                    yield request

            # The handler may read on its own thread and catch what the reader raises; the
            # refusal is delivered here, on the handler's thread, after the acks of the batches
            # before the refused one (stored and acknowledged: the robot need not resend them).
            yield from behaviour(checked(), context)
            if denied:
                self._deny(context, denied[0])
        return call


# -- command line (tether learner) ----------------------------------------------------------
def add_tls_arguments(p) -> None:
    p.add_argument("--tls-cert", help="the learner's certificate (PEM; `tether certs learner`)")
    p.add_argument("--tls-key", help="its private key (PEM)")
    p.add_argument("--tls-ca", help="the fleet CA: robots and operators must present a "
                                    "certificate it signed")
    p.add_argument("--insecure", action="store_true",
                   help="plaintext, no authentication: local development only")


def tls_from_args(args) -> ServerTls | None:
    """The learner's TLS from its flags, checked now; None only with an explicit --insecure."""
    given = {f"--tls-{n}": getattr(args, f"tls_{n}") for n in ("cert", "key", "ca")}
    if args.insecure:
        if any(given.values()):
            raise ValueError("--insecure and --tls-* contradict each other; choose one")
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ValueError(f"no TLS configured (missing {', '.join(missing)}): robots must "
                         f"authenticate. Pass --tls-cert DIR/cert.pem --tls-key DIR/key.pem "
                         f"--tls-ca DIR/ca.pem (make them with `tether certs init` and `tether "
                         f"certs learner`), or --insecure for local development")
    tls = ServerTls(given["--tls-cert"], given["--tls-key"], given["--tls-ca"])
    tls.credentials()  # unreadable or mismatched files fail at start, not at the first call
    return tls
