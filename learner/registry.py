"""The weight registry and publisher: monotonic versions on disk that survive restarts.

Layout under ``root``::

    versions/v000001/{policy.onnx, manifest.json}   the artifacts robots fetch
    checkpoints/v000001.pt                           {"model": state_dict, "optimizer": ...};
                                                     learner-only, never shipped
    LATEST                                           the newest complete version, as text

A version directory is built under a temporary name, fsynced and renamed, so it exists either
complete or not at all; a leftover temporary or an incomplete version directory (a crash
mid-write) is removed when the registry opens. The checkpoint is written before the rename:
a visible version always has its checkpoint.

Given a ``signing_key`` (learner/signing.py), every version is signed before it becomes visible
(the manifest carries the ed25519 signature; robots refuse anything else), and versions found
unsigned or signed by another key when the registry opens (a registry from before signing, a
rotated key) are re-signed in place, so robots configured with the current key accept them.

Retention: with ``keep_versions`` N > 0, each publish removes the versions (artifact and
checkpoint) older than the newest N, except version 1 (the pretrained policy, the last resort
to go back to) and the versions pinned by their users (``pin``: the rollout's stable and
canary versions). A removed directory is first renamed to a temporary name, so a crash leaves
it either whole or gone. N = 0 keeps every version.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import os
import pathlib
import re
import shutil
import threading
import time

import torch

from learner.export import export_artifact
from runtime.artifact import (MANIFEST, ArtifactError, Manifest, file_entry, fsync_dir,
                              load_manifest, sha256_file, verify_artifact, write_atomic)
from runtime.signature import SignatureError, Trust, check_manifest_bytes

log = logging.getLogger("tether.learner.registry")
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


def version_name(v: int) -> str:
    return f"v{v:06d}"


class Registry:
    def __init__(self, root: str | pathlib.Path, signing_key=None, keep_versions: int = 0):
        if keep_versions < 0:
            raise ValueError(f"keep_versions must be >= 0 (0 keeps every version), got {keep_versions}")
        self.root = pathlib.Path(root)
        self.keep_versions = int(keep_versions)
        self._pins: dict[str, frozenset[int]] = {}
        self.pruned = 0  # versions removed by retention in this process
        self.signing_key = signing_key  # learner.signing.SigningKey; None: versions stay unsigned
        # monotonic time each version became visible in this process (rollout latency benches)
        self.committed_at: dict[int, float] = {}
        self.versions_dir = self.root / "versions"
        self.checkpoints_dir = self.root / "checkpoints"
        for d in (self.root, self.versions_dir, self.checkpoints_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._cond = threading.Condition()
        self._publish_lock = threading.Lock()  # one publish at a time; readers never wait on it
        self._closed = False
        self.published = 0  # versions published by this process
        self._min_version = 0  # staleness gate announced to robots (0 = none); see set_min_version
        self._generation = 0   # bumped on anything subscribers must look at again
        self._latest = self._recover()

    # -- opening ---------------------------------------------------------------------------
    def _recover(self) -> int:
        """Drop leftovers of a crash and return the newest complete version (0 if none)."""
        latest = 0
        for entry in sorted(self.versions_dir.iterdir()):
            m = _VERSION_DIR.match(entry.name)
            if m is None:
                if entry.name.startswith(".tmp-"):
                    shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                manifest = verify_artifact(entry)
                if manifest.version != int(m.group(1)):
                    raise ArtifactError(f"manifest version {manifest.version} in {entry.name}")
            except (ArtifactError, OSError, KeyError, TypeError, ValueError):
                shutil.rmtree(entry, ignore_errors=True)  # incomplete: never announced, safe to drop
                continue
            if self.signing_key is not None:
                self._ensure_signed(entry)
            latest = max(latest, manifest.version)
        for tmp in self.checkpoints_dir.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
        fsync_dir(self.versions_dir)
        if latest:
            self._write_latest(latest)
        return latest

    def _ensure_signed(self, directory: pathlib.Path) -> None:
        key = self.signing_key
        data = (directory / MANIFEST).read_bytes()
        try:
            check_manifest_bytes(data, Trust(((key.key_id, key.public_raw),)))
            return
        except SignatureError:
            was = (load_manifest(directory).signature or {}).get("key_id")
        self._sign_dir(directory)
        log.warning("registry: re-signed %s with key %s (it was %s)", directory.name, key.key_id,
                    f"signed by key {was}" if was else "unsigned")

    def _sign_dir(self, directory: pathlib.Path) -> Manifest:
        """Rewrite the directory's manifest signed (a no-op returning it without a key)."""
        if self.signing_key is None:
            return load_manifest(directory)
        from learner.signing import sign_artifact
        return sign_artifact(directory, self.signing_key)

    def _write_latest(self, v: int) -> None:
        write_atomic(self.root / "LATEST", f"{v}\n".encode())

    # -- queries ---------------------------------------------------------------------------
    def latest(self) -> int:
        with self._cond:
            return self._latest

    def artifact_dir(self, v: int) -> pathlib.Path:
        path = self.versions_dir / version_name(int(v))
        if v <= 0 or v > self.latest() or not path.is_dir():
            raise KeyError(f"version {v} is not in the registry (latest is {self.latest()})")
        return path

    def manifest(self, v: int | None = None) -> Manifest:
        return load_manifest(self.artifact_dir(self.latest() if v is None else v))

    def files(self, v: int) -> list[tuple[str, str, int]]:
        """[(name, sha256, size)] of version v, manifest.json first."""
        d = self.artifact_dir(v)
        manifest = load_manifest(d)
        out = [(MANIFEST, sha256_file(d / MANIFEST), (d / MANIFEST).stat().st_size)]
        out += [(name, info["sha256"], int(info["size"])) for name, info in sorted(manifest.files.items())]
        return out

    def checkpoint_path(self, v: int) -> pathlib.Path:
        return self.checkpoints_dir / f"{version_name(v)}.pt"

    def versions(self) -> list[int]:
        """The versions on disk, oldest first (retention removes old ones)."""
        found = (_VERSION_DIR.match(e.name) for e in self.versions_dir.iterdir())
        return sorted(v for v in (int(m.group(1)) for m in found if m) if v <= self.latest())

    def load_checkpoint(self, v: int | None = None) -> dict | None:
        """{"model": state_dict, "optimizer": state or None} of version v, or None if absent."""
        path = self.checkpoint_path(self.latest() if v is None else v)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    @property
    def min_version(self) -> int:
        with self._cond:
            return self._min_version

    def set_min_version(self, v: int) -> None:
        """The staleness gate: robots must not start an episode on a version below ``v``.

        Set by the trainer (staleness 0: robots wait for every new version); subscriber streams
        re-announce when it changes."""
        with self._cond:
            if int(v) != self._min_version:
                self._min_version = int(v)
                self._generation += 1
                self._cond.notify_all()

    def notify_subscribers(self) -> None:
        """Wake every subscriber stream to look at its assignment again (a canary decision)."""
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait_for_generation(self, seen: int, timeout: float | None) -> int:
        """Block until a publish, a min_version change or ``notify_subscribers`` after
        generation ``seen`` (or timeout / close); returns the current generation."""
        with self._cond:
            self._cond.wait_for(lambda: self._generation != seen or self._closed, timeout)
            return self._generation

    def wait_for_change(self, seen: tuple[int, int], timeout: float | None) -> tuple[int, int]:
        """Block until (latest, min_version) differs from ``seen`` (or timeout / close)."""
        with self._cond:
            self._cond.wait_for(lambda: (self._latest, self._min_version) != tuple(seen)
                                or self._closed, timeout)
            return self._latest, self._min_version

    def wait_for_newer(self, v: int, timeout: float | None) -> int:
        """Block until a version newer than v exists (or timeout / close); return the newest.

        Latest-wins: a slow subscriber skips the versions published while it was busy.
        """
        with self._cond:
            self._cond.wait_for(lambda: self._latest > v or self._closed, timeout)
            return self._latest

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Wake every waiter (subscriber streams end)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # -- retention -------------------------------------------------------------------------
    def pin(self, owner: str, versions) -> None:
        """Keep ``versions`` whatever their age, on behalf of ``owner``, replacing what
        ``owner`` pinned before (the rollout pins its stable and canary versions)."""
        with self._cond:
            self._pins[owner] = frozenset(int(v) for v in versions if v)

    def kept(self) -> set[int]:
        """The versions retention keeps now (every version when ``keep_versions`` is 0)."""
        latest = self.latest()
        if self.keep_versions == 0:
            return set(range(1, latest + 1))
        with self._cond:
            pinned = set().union(*self._pins.values())
        return {1, *range(max(1, latest - self.keep_versions + 1), latest + 1), *pinned}

    def prune(self) -> list[int]:
        """Remove the versions retention no longer keeps (their artifacts and checkpoints) and
        return them; publish calls it. A no-op with ``keep_versions`` 0."""
        if self.keep_versions == 0:
            return []
        with self._publish_lock:
            keep = self.kept()
            gone = [v for v in self.versions() if v not in keep]
            for v in gone:
                # out of sight at once (a fetch asks for it: NOT_FOUND), then deleted; a
                # crash in between leaves a .tmp- directory that opening the registry removes
                tmp = self.versions_dir / f".tmp-pruned-{version_name(v)}"
                os.rename(self.versions_dir / version_name(v), tmp)
                fsync_dir(self.versions_dir)
                self.checkpoint_path(v).unlink(missing_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)
            # checkpoints whose version is gone (a crash between the rename and the unlink)
            orphans = [c for c in self.checkpoints_dir.glob("v*.pt")
                       if (m := _VERSION_DIR.match(c.stem)) and int(m.group(1)) not in keep]
            for ckpt in orphans:
                ckpt.unlink(missing_ok=True)
            if gone or orphans:
                fsync_dir(self.checkpoints_dir)
        if gone:
            self.pruned += len(gone)
            log.info("registry: removed %d old version(s) (v%d-v%d); keeping the newest %d, "
                     "v1 and the pinned", len(gone), gone[0], gone[-1], self.keep_versions)
        return gone

    # -- writing ---------------------------------------------------------------------------
    def _save_checkpoint(self, v: int, model_state: dict | None, optimizer_state: dict | None,
                         trainer_state: dict | None = None) -> None:
        if model_state is None:
            return
        buf = io.BytesIO()
        # trainer_state: tensors and plain containers only (it is loaded with weights_only=True)
        torch.save({"model": model_state, "optimizer": optimizer_state, "trainer": trainer_state}, buf)
        write_atomic(self.checkpoint_path(v), buf.getvalue())

    def _commit(self, tmp: pathlib.Path, v: int) -> None:
        fsync_dir(tmp)
        os.rename(tmp, self.versions_dir / version_name(v))
        fsync_dir(self.versions_dir)
        self._write_latest(v)
        with self._cond:
            self._latest = v
            self.committed_at[v] = time.monotonic()
            self._generation += 1
            self._cond.notify_all()

    def _tmp_dir(self, v: int) -> pathlib.Path:
        tmp = self.versions_dir / f".tmp-{version_name(v)}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def import_initial(self, artifact_dir: str | pathlib.Path,
                       state_dict_path: str | pathlib.Path | None = None) -> Manifest:
        """Register a pretrained artifact as version 1 if the registry is empty (else no-op).

        The manifest is rewritten as version 1 / parent 0 with recomputed file entries and
        signed anew (the signed content, the version, changed).
        """
        with self._publish_lock:
            if self.latest() > 0:
                return self.manifest()
            src = pathlib.Path(artifact_dir)
            source = verify_artifact(src)
            model_state = None
            if state_dict_path is not None:
                loaded = torch.load(state_dict_path, map_location="cpu", weights_only=True)
                # pretrain may save a bare state_dict or a checkpoint dict with a "model" entry
                if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
                    loaded = loaded["model"]
                if not isinstance(loaded, dict):
                    raise ValueError(f"{state_dict_path}: not a torch state_dict "
                                     f"(got {type(loaded).__name__}); pass pretrain's model.pt")
                model_state = loaded
            tmp = self._tmp_dir(1)
            files = {}
            for name in source.files:
                shutil.copyfile(src / name, tmp / name)
                with open(tmp / name, "rb+") as f:
                    os.fsync(f.fileno())
                files[name] = file_entry(tmp / name)
            manifest = dataclasses.replace(source, version=1, parent_version=0, files=files,
                                           signature=None)
            write_atomic(tmp / MANIFEST, manifest.to_json().encode())
            self._sign_dir(tmp)
            self._save_checkpoint(1, model_state, None)
            self._commit(tmp, 1)
            return load_manifest(self.artifact_dir(1))

    def publish(self, model: torch.nn.Module, normalization: dict | None = None, *,
                robot: str | None = None, control_rate_hz: float | None = None,
                optimizer_state: dict | None = None, verifier=None,
                trainer_state: dict | None = None) -> Manifest:
        """Export ``model`` as version latest + 1 (parent = latest) and announce it;
        ``verifier`` (a trained scorer) ships as ``verifier.onnx`` in the same artifact.

        normalization / robot / control rate default to the latest version's.
        """
        with self._publish_lock:
            parent = self.latest()
            if parent == 0 and (normalization is None or robot is None or control_rate_hz is None):
                raise ValueError("the registry is empty: pass normalization, robot and "
                                 "control_rate_hz, or import_initial() a pretrained artifact first")
            prev = self.manifest(parent) if parent else None
            v = parent + 1
            tmp = self._tmp_dir(v)
            manifest = export_artifact(
                model, tmp, version=v, parent_version=parent,
                normalization=prev.normalization if normalization is None else normalization,
                robot=prev.robot if robot is None else robot,
                control_rate_hz=prev.control_rate_hz if control_rate_hz is None else control_rate_hz,
                verifier=verifier)
            manifest = self._sign_dir(tmp)
            state = {k: t.detach().cpu().clone() for k, t in model.state_dict().items()}
            self._save_checkpoint(v, state, optimizer_state, trainer_state)
            self._commit(tmp, v)
            self.published += 1
        self.prune()
        return manifest
