"""The learner's signing key: ed25519 keys on disk and signatures on artifact manifests.

The private key is a PKCS#8 PEM file written with mode 0600 (temporary name, fsync, rename);
the public key (``*.pub``, SubjectPublicKeyInfo PEM) is what robots are configured with
(``tether robot --trusted-key``). What is signed, and how robots check it, is in
``runtime/signature.py``.

``tether keys generate --out DIR``   a new key pair in DIR (signing_key.pem, signing_key.pub)
``tether keys sign --key PEM ARTIFACT``  sign an artifact in place (e.g. a policy a team
                                       exported itself, or the pretrained one for a test bench)
``tether keys id PUB``                 print a public key's id
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import os
import pathlib
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtime.artifact import MANIFEST, Manifest, fsync_dir, verify_artifact, write_atomic
from runtime.signature import ALG, canonical_bytes, key_id

log = logging.getLogger("tether.learner.signing")

PRIVATE_NAME = "signing_key.pem"
PUBLIC_NAME = "signing_key.pub"


class SigningKey:
    """An ed25519 private key with its id; signs manifests."""

    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public_raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw)
        self.key_id = key_id(self.public_raw)

    @classmethod
    def generate(cls) -> "SigningKey":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SigningKey":
        path = pathlib.Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the signing key {path}: {e.strerror}; create one with "
                             f"`tether keys generate --out DIR`") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path} is not an unencrypted PEM private key ({e}); create one "
                             f"with `tether keys generate --out DIR`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} holds a {type(key).__name__}; the learner signs with "
                             f"ed25519 keys (`tether keys generate`)")
        mode = path.stat().st_mode & 0o077
        if mode:
            log.warning("signing key %s is readable by group/others (mode %o); chmod 600 it",
                        path, path.stat().st_mode & 0o777)
        return cls(key)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())

    def public_pem(self) -> bytes:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def save(self, private_path: str | os.PathLike, public_path: str | os.PathLike | None = None,
             overwrite: bool = False) -> None:
        """Write the private key (0600, atomically) and the public key next to it."""
        private_path = pathlib.Path(private_path)
        public_path = pathlib.Path(public_path) if public_path else private_path.with_suffix(".pub")
        if not overwrite and private_path.exists():
            raise FileExistsError(f"{private_path} exists; refusing to replace a signing key "
                                  f"(robots trust its public key). Remove it first if you mean it")
        private_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = private_path.with_name(f".{private_path.name}.tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # umask cannot widen it; an old tmp file gets narrowed
            os.write(fd, self.private_pem())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, private_path)
        fsync_dir(private_path.parent)
        write_atomic(public_path, self.public_pem())

    def sign(self, manifest: dict) -> dict:
        """The signature entry for a manifest (given as its parsed JSON object)."""
        sig = self._private.sign(canonical_bytes(manifest))
        return {"alg": ALG, "key_id": self.key_id, "sig": base64.b64encode(sig).decode("ascii")}


def load_or_create(private_path: str | os.PathLike) -> tuple[SigningKey, bool]:
    """(key, created): load the key, or make a new pair (private 0600 + ``.pub``) on first use."""
    private_path = pathlib.Path(private_path)
    if private_path.exists():
        return SigningKey.load(private_path), False
    key = SigningKey.generate()
    key.save(private_path)
    return key, True


def signed_manifest_bytes(manifest: Manifest | dict, key: SigningKey) -> bytes:
    """manifest.json bytes carrying ``key``'s signature over the rest of the manifest."""
    text = manifest.to_json() if isinstance(manifest, Manifest) else json.dumps(manifest)
    d = json.loads(text)  # sign exactly what a robot will parse back from the file
    d["signature"] = key.sign(d)
    return json.dumps(d, indent=2, sort_keys=True).encode("utf-8")


def sign_artifact(directory: str | os.PathLike, key: SigningKey) -> Manifest:
    """Check the artifact's files, then rewrite its manifest signed by ``key`` (atomically)."""
    directory = pathlib.Path(directory)
    manifest = verify_artifact(directory)
    data = signed_manifest_bytes(dataclasses.replace(manifest, signature=None), key)
    write_atomic(directory / MANIFEST, data)
    return Manifest.from_json(data)


def is_signed_by(manifest: Manifest, key: SigningKey) -> bool:
    """Whether the manifest carries a valid signature of ``key`` (checked, not just the id)."""
    from runtime.signature import SignatureError, Trust, check_manifest_bytes
    if not manifest.signature or manifest.signature.get("key_id") != key.key_id:
        return False
    try:
        check_manifest_bytes(manifest.to_json().encode(),
                             Trust(((key.key_id, key.public_raw),)))
    except SignatureError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tether keys", description="ed25519 keys that sign the "
                                "learner's policy artifacts (robots trust the .pub file)")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="create a key pair")
    g.add_argument("--out", required=True, help=f"directory for {PRIVATE_NAME} and {PUBLIC_NAME}")
    s = sub.add_parser("sign", help="sign a policy artifact in place")
    s.add_argument("--key", required=True, help="private key (PEM)")
    s.add_argument("artifact", help="artifact directory (manifest.json + files)")
    i = sub.add_parser("id", help="print the key id of a public or private key file")
    i.add_argument("path")
    a = p.parse_args(argv)
    try:
        if a.cmd == "generate":
            out = pathlib.Path(a.out)
            key = SigningKey.generate()
            key.save(out / PRIVATE_NAME, out / PUBLIC_NAME)
            print(f"key {key.key_id}: private {out / PRIVATE_NAME} (mode 600, keep it on the "
                  f"learner), public {out / PUBLIC_NAME} (give it to robots: --trusted-key)")
        elif a.cmd == "sign":
            manifest = sign_artifact(a.artifact, SigningKey.load(a.key))
            print(f"signed {a.artifact} (version {manifest.version}) with key "
                  f"{manifest.signature['key_id']}")
        else:
            from runtime.signature import read_public_key
            path = pathlib.Path(a.path)
            try:
                print(key_id(read_public_key(path)))
            except ValueError:
                print(SigningKey.load(path).key_id)
    except (ValueError, OSError) as e:
        print(f"tether keys: {e}", file=sys.stderr)
        return 1
    return 0
