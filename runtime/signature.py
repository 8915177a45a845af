"""Signed artifacts, the robot's side: which learner keys a robot trusts, and the check that an
artifact was signed by one of them (DESIGN.md, Weights and Security).

What is signed is the canonical form of ``manifest.json`` without its ``signature`` entry (keys
sorted, compact separators, UTF-8). The manifest lists the sha256 and size of every file, so
one ed25519 signature over it covers the whole artifact; ``verify_trusted`` checks both the
signature and the files. The signature entry reads::

    "signature": {"alg": "ed25519", "key_id": "<16 hex: sha256 of the raw public key>",
                  "sig": "<base64 of the 64-byte signature>"}

``cryptography`` is imported inside the functions that need it, so importing this module costs
nothing on the robot's import path.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import os
import pathlib

from runtime.artifact import MANIFEST, ArtifactError, Manifest, verify_artifact

log = logging.getLogger(__name__)

ALG = "ed25519"
RAW_KEY_BYTES = 32
SIG_BYTES = 64
MAX_MANIFEST_BYTES = 1 << 20  # a manifest is a few kB; refuse to parse anything huge


class SignatureError(ArtifactError):
    """The artifact is unsigned, signed by a key the robot does not trust, or does not match its
    signature."""


def canonical_bytes(manifest: dict) -> bytes:
    """The signed bytes: the manifest without ``signature``, keys sorted, compact, UTF-8."""
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def key_id(raw_public_key: bytes) -> str:
    """The fingerprint robots and logs name a key by: 16 hex digits of sha256(raw key)."""
    return hashlib.sha256(raw_public_key).hexdigest()[:16]


def read_public_key(path: str | os.PathLike) -> bytes:
    """The 32 raw bytes of an ed25519 public key file (PEM ``PUBLIC KEY`` or 32 raw bytes)."""
    path = pathlib.Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SignatureError(f"cannot read the trusted key {path}: {e.strerror}; pass the "
                             f"learner's public key file (DATA/signing_key.pub)") from None
    if len(data) == RAW_KEY_BYTES:
        return data
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        raise SignatureError(f"{path} is not a PEM public key or 32 raw bytes; pass the "
                             f"learner's public key (signing_key.pub), not its private "
                             f"key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} holds a {type(key).__name__}, not an ed25519 public key")
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclasses.dataclass(frozen=True)
class Trust:
    """The keys a robot accepts artifacts from (``{key_id: raw public key}``).

    ``allow_unsigned`` is for local development only: unsigned artifacts are then accepted;
    a signed one is still checked against the trusted keys when there are any."""
    keys: tuple[tuple[str, bytes], ...] = ()
    allow_unsigned: bool = False

    def __post_init__(self):
        for kid, raw in self.keys:
            if len(raw) != RAW_KEY_BYTES or key_id(raw) != kid:
                raise ValueError(f"Trust: key {kid!r} is not a 32-byte ed25519 key with that id")

    @classmethod
    def load(cls, paths=(), allow_unsigned: bool = False) -> "Trust":
        keys = {}
        for p in paths:
            raw = read_public_key(p)
            keys[key_id(raw)] = raw
        return cls(tuple(sorted(keys.items())), bool(allow_unsigned))

    @property
    def key_ids(self) -> list[str]:
        return [k for k, _ in self.keys]

    def describe(self) -> str:
        if not self.keys:
            return "no trusted keys" + (" (unsigned artifacts allowed)" if self.allow_unsigned
                                        else "")
        extra = "; unsigned artifacts allowed" if self.allow_unsigned else ""
        return f"trusted keys {', '.join(self.key_ids)}{extra}"


def check_manifest_bytes(data: bytes, trust: Trust, where: str = MANIFEST) -> dict:
    """Check the signature of a manifest file's bytes; returns the parsed JSON object.

    Raises SignatureError saying what is wrong and what to do."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise SignatureError(f"{where} is {len(data)} bytes (limit {MAX_MANIFEST_BYTES})")
    try:
        d = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SignatureError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise SignatureError(f"{where} is not a JSON object")
    sig = d.get("signature")
    if sig is None:
        if trust.allow_unsigned:
            return d
        raise SignatureError(f"{where} is unsigned; this robot accepts only artifacts signed by "
                             f"the learner ({trust.describe()}). Sign it (tether keys sign) or, "
                             f"for local development only, run with --allow-unsigned")
    if not isinstance(sig, dict) or sig.get("alg") != ALG:
        raise SignatureError(f"{where} has signature {str(sig)[:80]!r}; expected "
                             f"{{'alg': '{ALG}', 'key_id': ..., 'sig': ...}}")
    kid = sig.get("key_id")
    keys = dict(trust.keys)
    if kid not in keys:
        if not keys and trust.allow_unsigned:
            log.warning("%s: signed by key %s, but no trusted keys are configured: signature "
                        "not checked (--allow-unsigned)", where, kid)
            return d
        raise SignatureError(f"{where} is signed by key {kid!r}, which this robot does not "
                             f"trust ({trust.describe()}); add the learner's public key with "
                             f"--trusted-key")
    try:
        signature = base64.b64decode(str(sig.get("sig", "")), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{where}: signature is not base64") from None
    try:
        body = canonical_bytes(d)
    except ValueError as e:  # NaN / infinity: not canonical JSON
        raise SignatureError(f"{where} cannot be put in canonical form: {e}") from None
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    try:
        if len(signature) != SIG_BYTES:
            raise InvalidSignature()
        Ed25519PublicKey.from_public_bytes(keys[kid]).verify(signature, body)
    except InvalidSignature:
        raise SignatureError(f"{where}: the ed25519 signature of key {kid} does not match the "
                             f"manifest; the artifact was tampered with or re-signed") from None
    return d


def verify_trusted(directory: str | os.PathLike, trust: Trust) -> Manifest:
    """Signature of the manifest, then every file's size and sha256 (``verify_artifact``).

    Raises SignatureError (signature) or ArtifactError (files); returns the manifest."""
    directory = pathlib.Path(directory)
    path = directory / MANIFEST
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read the manifest ({e.strerror}); a policy "
                            f"artifact needs {MANIFEST}") from None
    check_manifest_bytes(data, trust, str(path))
    manifest = verify_artifact(directory)
    if Manifest.from_json(data) != manifest:  # the manifest changed between the two reads
        raise SignatureError(f"{path} changed while it was being verified")
    return manifest
