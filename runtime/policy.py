"""The policy runner: one verified artifact, one backend, observations in, sampled chunks out.

Feeds follow the ONNX graph contract in runtime/artifact.py. Actions come out in the policy's
normalized action space; ``to_command``/``from_command`` map to and from robot commands with the
manifest's normalization statistics.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time

import numpy as np

from robots.base import Observation
from runtime import distributions
from runtime.artifact import Manifest, policy_digest, verify_artifact
from runtime.backends import load_backend
from runtime.status import LatencyWindow
from runtime.tokenizer import tokenize

STAGES = ("preprocess", "infer", "postprocess")


@dataclasses.dataclass(frozen=True)
class PolicyOutput:
    """One inference: ``mean``/``log_std``/``actions`` [H, A] normalized, ``features`` [F]."""
    mean: np.ndarray
    log_std: np.ndarray
    actions: np.ndarray
    features: np.ndarray
    latency_s: float


class PolicyRunner:
    """Runs one policy artifact. ``infer`` is called from one thread at a time."""

    def __init__(self, artifact_dir: str | os.PathLike, backend: str = "ort", seed: int = 0,
                 temperature: float = 1.0, backend_options: dict | None = None,
                 window: int = 256, verified: Manifest | None = None,
                 base: "PolicyRunner | None" = None):
        """``verified``: the artifact's manifest, its files' sha256 just checked by the caller
        (the weight subscriber hashes as it fetches; runtime/signature.py): not hashed again.
        ``base``: the runner serving now. A backend that can take another version's weights
        into a copy of its engine (``derive``: TensorRT refit) does so instead of a build."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = the mean action), got {temperature}")
        self.artifact_dir = pathlib.Path(artifact_dir)
        self.manifest = verified if verified is not None else verify_artifact(self.artifact_dir)
        m = self.manifest
        self.row_correlation = m.row_correlation  # of the sampled rows' noise (distributions.py)
        # recorded with every chunk: computed once (the manifest never changes)
        self._weight_sha256 = policy_digest({n: str(i["sha256"]) for n, i in m.files.items()})
        self.backend_name = backend
        derive = (getattr(base.backend, "derive", None)
                  if base is not None and base.backend_name == backend else None)
        derived = derive(self.artifact_dir, m) if derive is not None else None
        self.derived = derived is not None  # reported in info(): refit rather than build
        self.backend = derived or load_backend(backend, self.artifact_dir, m,
                                               **(backend_options or {}))
        # ``temperature`` scales the sampling spread: the outputs' log_std are the policy's plus
        # log(temperature), what the actions are drawn from. 0 gives the mean actions; their
        # chunks keep the policy's own log_std (a deterministic robot has no behaviour density)
        self.temperature = float(temperature)
        self._scale = 1.0 if self.temperature > 0 else 0.0
        self._rng = np.random.default_rng(seed)
        norm = m.normalization
        self._state_mean = np.asarray(norm.get("state_mean", np.zeros(m.inputs["state_dim"])),
                                      np.float32)
        self._state_std = np.asarray(norm.get("state_std", np.ones(m.inputs["state_dim"])),
                                     np.float32)
        self._action_mean = np.asarray(norm.get("action_mean", np.zeros(m.action_dim)), np.float32)
        self._action_std = np.asarray(norm.get("action_std", np.ones(m.action_dim)), np.float32)
        if np.any(self._state_std <= 0) or np.any(self._action_std <= 0):
            raise ValueError(f"{self.artifact_dir}: manifest normalization has a std <= 0; "
                             f"re-export the artifact with positive std statistics")
        self.latency = {s: LatencyWindow(window) for s in STAGES + ("total",)}
        # read once: feeds() runs for every chunk
        self._cameras = [(c["name"], (int(c["height"]), int(c["width"]), int(c.get("channels", 3))))
                         for c in m.cameras]
        self._state_dim = int(m.inputs["state_dim"])
        self._tokens: tuple[str, np.ndarray] | None = None  # the last instruction, tokenized

    # -- identity ----------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int(self.manifest.version)

    @property
    def weight_sha256(self) -> str:
        return self._weight_sha256

    @property
    def horizon(self) -> int:
        return self.manifest.horizon

    @property
    def action_dim(self) -> int:
        return self.manifest.action_dim

    @property
    def accepts_prefix(self) -> bool:
        return bool(self.manifest.accepts_prefix)

    # -- normalization -----------------------------------------------------------------------
    def to_command(self, a_n: np.ndarray) -> np.ndarray:
        return (np.asarray(a_n, np.float32) * self._action_std + self._action_mean).astype(np.float32)

    def from_command(self, cmd: np.ndarray) -> np.ndarray:
        return ((np.asarray(cmd, np.float32) - self._action_mean) / self._action_std).astype(np.float32)

    # -- inference ---------------------------------------------------------------------------
    def feeds(self, obs: Observation, prefix: np.ndarray | None = None,
              prefix_len: int = 0) -> dict[str, np.ndarray]:
        """The graph inputs for one observation; raises ValueError naming what is wrong."""
        feeds: dict[str, np.ndarray] = {}
        for name, want in self._cameras:
            if name not in obs.images:
                raise ValueError(f"observation has no image from camera {name!r} (has "
                                 f"{sorted(obs.images)}); the policy needs every manifest camera")
            img = np.asarray(obs.images[name])
            if img.shape != want:
                raise ValueError(f"camera {name!r} image has shape {img.shape}, the policy "
                                 f"expects HxWxC {want}; fix the camera resolution")
            if img.dtype != np.uint8:
                raise ValueError(f"camera {name!r} image dtype is {img.dtype}, expected uint8")
            feeds[f"image_{name}"] = (img.transpose(2, 0, 1)[None].astype(np.float32) / 255.0)
        state = np.asarray(obs.state, np.float32).reshape(-1)
        if state.shape[0] != self._state_dim:
            raise ValueError(f"observation state has {state.shape[0]} entries, the policy "
                             f"expects state_dim {self._state_dim}")
        if not np.all(np.isfinite(state)):
            raise ValueError(f"observation state is not finite: {state.tolist()}; the robot's "
                             f"sensors returned NaN/inf")
        feeds["state"] = ((state - self._state_mean) / self._state_std)[None].astype(np.float32)
        cached = self._tokens
        if cached is None or cached[0] != obs.instruction:  # it changes once per task, if ever
            cached = self._tokens = (obs.instruction, tokenize(obs.instruction,
                                                               self.manifest.inputs["tokenizer"])[None])
        feeds["tokens"] = cached[1].copy()
        h, a = self.horizon, self.action_dim
        full = np.zeros((1, h, a), np.float32)
        n = int(prefix_len) if self.accepts_prefix else 0
        if n < 0 or n > h:
            raise ValueError(f"prefix_len must be in [0, {h}], got {prefix_len}")
        if n:
            p = np.asarray(prefix, np.float32)
            if p.ndim != 2 or p.shape[1] != a or p.shape[0] < n:
                raise ValueError(f"prefix has shape {p.shape}, need at least [{n}, {a}]")
            full[0, :n] = p[:n]
        feeds["prefix"] = full
        feeds["prefix_len"] = np.array([n], np.int64)
        return feeds

    def infer(self, obs: Observation, prefix: np.ndarray | None = None,
              prefix_len: int = 0) -> PolicyOutput:
        t0 = time.perf_counter()
        feeds = self.feeds(obs, prefix, prefix_len)
        t1 = time.perf_counter()
        out = self.backend.infer(feeds)
        t2 = time.perf_counter()
        mean = np.asarray(out["mean"], np.float32)[0]
        log_std = np.asarray(out["log_std"], np.float32)[0]
        features = np.asarray(out["features"], np.float32)[0]
        if self.temperature > 0 and self.temperature != 1.0:
            # the spread the actions are drawn with: the behaviour log-prob the recorder computes
            # and the verifier's spread check take it from here, so they match the sampling
            log_std = log_std + np.float32(math.log(self.temperature))
        actions = distributions.sample(mean, log_std, self._rng, self._scale,
                                       self.row_correlation)
        t3 = time.perf_counter()
        for stage, dt in zip(STAGES + ("total",), (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            self.latency[stage].add(dt)
        return PolicyOutput(mean, log_std, actions, features, t3 - t0)

    def candidates(self, out: PolicyOutput, k: int) -> np.ndarray:
        """``k`` fresh chunks [k, H, A] from the Gaussian of one inference (no second forward
        pass): the verifier's candidates."""
        return np.stack([distributions.sample(out.mean, out.log_std, self._rng, self._scale,
                                              self.row_correlation)
                         for _ in range(int(k))])

    def synthetic_observation(self) -> Observation:
        m = self.manifest
        images = {c["name"]: np.full((int(c["height"]), int(c["width"]),
                                      int(c.get("channels", 3))), 127, np.uint8)
                  for c in m.cameras}
        return Observation(images=images, state=self._state_mean.copy(),
                           instruction="warm up", timestamp=0.0)

    def warmup(self, n: int = 3) -> None:
        obs = self.synthetic_observation()
        for _ in range(max(0, n)):
            self.infer(obs)

    def check(self) -> None:
        """Finite outputs of the right shapes on a synthetic observation, with and without a
        prefix; raises RuntimeError otherwise. Run before a new version may be swapped in."""
        obs = self.synthetic_observation()
        h, a = self.horizon, self.action_dim
        for n in sorted({0, h // 2 if self.accepts_prefix else 0}):
            out = self.infer(obs, np.zeros((h, a), np.float32), n)
            for name in ("mean", "log_std", "actions"):
                arr = getattr(out, name)
                if arr.shape != (h, a):
                    raise RuntimeError(f"policy v{self.version}: {name} has shape {arr.shape}, "
                                       f"manifest says [{h}, {a}]")
                if not np.all(np.isfinite(arr)):
                    raise RuntimeError(f"policy v{self.version}: {name} is not finite")
            if not np.all(np.isfinite(out.features)):
                raise RuntimeError(f"policy v{self.version}: features are not finite")

    def latency_stats(self) -> dict:
        return {stage: w.summary_ms() for stage, w in self.latency.items()}

    def info(self) -> dict:
        return {"version": self.version, "weight_sha256": self.weight_sha256,
                "backend": self.backend.info(), "derived": self.derived,
                "latency": self.latency_stats()}
