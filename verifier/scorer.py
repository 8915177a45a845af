"""The learned chunk scorer, inference side: ``verifier.onnx`` from a policy artifact, run with
ONNX Runtime (imported when a scorer is loaded, never at module import).

Graph contract (batch B dynamic; see learner/verifier_model.py): inputs ``features`` [B,F],
``state`` [B,S] (normalized), ``mean`` [B,H,A] and ``actions`` [B,H,A] (normalized);
outputs ``p_safe`` [B] (calibrated), ``advantage`` [B], ``logit`` [B].
"""
from __future__ import annotations

import logging
import pathlib
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

class CandidateScorer(Protocol):
    """Scores K candidate chunks of one observation in one call.

    ``score(features [F], state [S] robot units, mean [H,A], candidates [K,H,A])`` returns
    ``(p_safe [K] in [0, 1], advantage [K])``; ``threshold`` is the calibrated P(safe) a
    candidate needs to pass."""
    threshold: float

    def score(self, features: np.ndarray, state: np.ndarray, mean: np.ndarray,
              candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class OnnxScorer:
    def __init__(self, path: str | pathlib.Path, threshold: float, intra_op_num_threads: int = 1,
                 state_mean=None, state_std=None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("the learned verifier needs onnxruntime: pip install onnxruntime") from e
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"verifier threshold must be in [0, 1], got {threshold}; fix the "
                             f"manifest's verifier.threshold")
        self.path = pathlib.Path(path)
        self.threshold = float(threshold)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(intra_op_num_threads)
        self._session = ort.InferenceSession(str(self.path), opts,
                                             providers=["CPUExecutionProvider"])
        shapes = {i.name: i.shape for i in self._session.get_inputs()}
        missing = {"features", "state", "mean", "actions"} - set(shapes)
        if missing:
            raise ValueError(f"{self.path}: verifier graph lacks inputs {sorted(missing)}; "
                             f"re-export it with learner.verifier_model")
        self.features = int(shapes["features"][1])
        # the graph takes the policy's normalized state; robots hand in robot units
        self._state_mean = None if state_mean is None else np.asarray(state_mean, np.float32)
        self._state_std = None if state_std is None else np.asarray(state_std, np.float32)

    @classmethod
    def from_artifact(cls, artifact_dir: str | pathlib.Path, manifest) -> "OnnxScorer | None":
        """The artifact's scorer, or None when it ships none (``manifest.extra['verifier']``)
        or ships one that cannot be used: the scorer is optional and the envelope checks
        every command regardless, so a broken scorer must not make the robot refuse the
        policy version (a refused version leaves the robot behind the learner's staleness
        gate, holding before every episode)."""
        entry = (manifest.extra or {}).get("verifier")
        if not entry or entry.get("file") not in manifest.files:
            return None
        norm = manifest.normalization or {}
        try:
            return cls(pathlib.Path(artifact_dir) / entry["file"], float(entry["threshold"]),
                       state_mean=norm.get("state_mean"), state_std=norm.get("state_std"))
        except Exception as e:  # noqa: BLE001 (any failure: run this version unverified)
            log.error("verifier: v%s ships a scorer that cannot be used (%s: %s); this version "
                      "runs with the verifier off (the envelope still checks every command); "
                      "fix the learner's scorer export", getattr(manifest, "version", "?"),
                      type(e).__name__, e)
            return None

    def score(self, features, state, mean, candidates):
        cand = np.asarray(candidates, np.float32)
        k = cand.shape[0]
        f = np.broadcast_to(np.asarray(features, np.float32).reshape(1, -1), (k, self.features))
        s = np.asarray(state, np.float32).reshape(1, -1)
        if self._state_mean is not None:
            s = (s - self._state_mean) / self._state_std
        m = np.asarray(mean, np.float32)[None]
        feeds = {"features": np.ascontiguousarray(f),
                 "state": np.ascontiguousarray(np.broadcast_to(s, (k, s.shape[1]))),
                 "mean": np.ascontiguousarray(np.broadcast_to(m, cand.shape)), "actions": cand}
        p, adv = self._session.run(["p_safe", "advantage"], feeds)
        return p.astype(np.float64), adv.astype(np.float64)
