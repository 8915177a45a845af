"""The policy artifact: a directory with ``policy.onnx``, optional ``policy.onnx.data`` and
``verifier.onnx``, and ``manifest.json``. See DESIGN.md (Contracts: Policy artifact).

``policy.onnx.data`` holds the graph's large tensors as ONNX external data (each tensor's
``location`` is that file name, its offset page-aligned). ONNX Runtime memory-maps such a file
instead of copying it: a new version loads without allocating and zeroing its weights' size in
fresh memory (what made a fleet-wide swap CPU-bound), and only the pages a run touches are read
(an embedding table's unused rows never are). It is also how graphs over protobuf's 2 GB limit
are stored. An artifact may keep every tensor inline (no ``.data`` file): both load the same.

Manifest keys (format ``tether.policy/1``)::

    version, parent_version          monotonic integers (parent 0 = none)
    files {name: {sha256, size}}     every file of the artifact but the manifest
    signature                        {alg: "ed25519", key_id, sig}: the learner's signature over
                                     the rest of the manifest (runtime/signature.py); null if unsigned
    inputs  {cameras [{name, height, width, channels}], state_dim,
             tokenizer {kind, max_len}}
    outputs {horizon, action_dim, distribution: "gaussian", features,
             row_correlation}             rows' noise correlation (runtime/distributions.py;
                                          absent = 0)
    accepts_prefix                   the graph takes ``prefix`` [B,H,A] and ``prefix_len`` [B]
    normalization {state_mean, state_std, action_mean, action_std}
    control_rate_hz, robot, created
    extra                            producer-specific data (e.g. the reference VLA's config)

ONNX graph contract (batch dimension B is dynamic)::

    inputs:  image_<camera> float32 [B,C,H,W] in [0,1]; state float32 [B,S] (normalized);
             tokens int64 [B,L]; prefix float32 [B,H,A] (normalized); prefix_len int64 [B]
    outputs: mean float32 [B,H,A]; log_std float32 [B,H,A]; features float32 [B,F]
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib

FORMAT = "tether.policy/1"
MANIFEST = "manifest.json"
MAX_ARTIFACT_FILE_BYTES = 512 * 1024 * 1024
POLICY = "policy.onnx"
POLICY_DATA = "policy.onnx.data"
VERIFIER = "verifier.onnx"


class ArtifactError(ValueError):
    """An artifact is malformed, incomplete or does not match its manifest."""


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclasses.dataclass(frozen=True)
class Manifest:
    version: int
    parent_version: int
    files: dict
    inputs: dict
    outputs: dict
    accepts_prefix: bool
    normalization: dict
    control_rate_hz: float
    robot: str
    created: str = ""
    signature: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    format: str = FORMAT

    def __post_init__(self):
        if self.format != FORMAT:
            raise ArtifactError(f"manifest format {self.format!r} is not {FORMAT!r}")
        if self.version < 0 or self.parent_version < 0:
            raise ArtifactError(f"manifest versions must be >= 0, got {self.version}/{self.parent_version}")
        if "policy.onnx" not in self.files:
            raise ArtifactError("manifest lists no policy.onnx under files")
        for name in self.files:
            if "/" in name or "\\" in name or name in ("", ".", "..") or name == MANIFEST:
                raise ArtifactError(f"manifest file name {name!r} is not a plain file name")
        for key in ("horizon", "action_dim"):
            if int(self.outputs.get(key, 0)) <= 0:
                raise ArtifactError(f"manifest outputs.{key} must be > 0, got {self.outputs.get(key)}")
        rho = self.outputs.get("row_correlation", 0.0)
        if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not 0 <= rho < 1:
            raise ArtifactError(f"manifest outputs.row_correlation must be a number in [0, 1), "
                                f"got {rho!r}")
        if int(self.inputs.get("state_dim", -1)) < 0:
            raise ArtifactError("manifest inputs.state_dim missing")
        if self.signature is not None and not (
                isinstance(self.signature, dict)
                and all(isinstance(self.signature.get(k), str) for k in ("alg", "key_id", "sig"))):
            raise ArtifactError(f"manifest signature must be null or {{alg, key_id, sig}} "
                                f"strings, got {str(self.signature)[:80]!r}")

    @property
    def horizon(self) -> int:
        return int(self.outputs["horizon"])

    @property
    def action_dim(self) -> int:
        return int(self.outputs["action_dim"])

    @property
    def row_correlation(self) -> float:
        return float(self.outputs.get("row_correlation", 0.0))

    @property
    def cameras(self) -> list[dict]:
        return list(self.inputs.get("cameras", []))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Manifest":
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"manifest is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ArtifactError("manifest must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = {f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING} - set(d)
        if missing:
            raise ArtifactError(f"manifest misses keys {sorted(missing)}")
        return cls(**{k: v for k, v in d.items() if k in known})


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename, fsync the directory."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_manifest(directory: str | os.PathLike) -> Manifest:
    path = pathlib.Path(directory) / MANIFEST
    if not path.exists():
        raise ArtifactError(f"{path}: no manifest; a policy artifact needs {MANIFEST}")
    return Manifest.from_json(path.read_bytes())


def verify_artifact(directory: str | os.PathLike) -> Manifest:
    """Load the manifest and check every listed file's size and sha256. Raises ArtifactError."""
    directory = pathlib.Path(directory)
    manifest = load_manifest(directory)
    for name, info in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{directory}: {name} listed in the manifest is missing")
        size = path.stat().st_size
        if size != int(info["size"]):
            raise ArtifactError(f"{path}: {size} bytes, manifest says {info['size']}")
        digest = sha256_file(path)
        if digest != info["sha256"]:
            raise ArtifactError(f"{path}: sha256 {digest[:12]}… does not match the manifest's "
                                f"{info['sha256'][:12]}…; the artifact is corrupt or tampered")
    return manifest


def policy_digest(sha256s: dict[str, str]) -> str:
    """The policy's weight identity from {file name: sha256} (the manifest's files; the
    manifest itself and ``verifier.onnx`` are left out): ``policy.onnx``'s sha256 when it is the
    only file, else one sha256 over every file's name and digest. An exported graph may name its
    external data anything, and the graph alone does not change when only those weights do."""
    names = sorted(n for n in sha256s if n not in (MANIFEST, VERIFIER))
    if names == [POLICY]:
        return sha256s[POLICY]
    if POLICY not in names:
        raise ArtifactError(f"no {POLICY} among the files {names}")
    return sha256_bytes("\n".join(f"{n}:{sha256s[n]}" for n in names).encode())


def file_entry(path: pathlib.Path) -> dict:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}
