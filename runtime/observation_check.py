"""Is an observation fit to command the robot from? The control loop asks every tick
(runtime/control.py ``observation_check``) and holds, that same tick, when it is not.

A sensor fault must never reach the policy: a NaN joint reading becomes NaN actions (or, once
normalized, arbitrary ones), a resized camera feeds the network pixels it was never trained on,
an old picture of the world plans motions for where the robot no longer is. Each reason names
its kind before the first colon (the loop counts holds per kind) and says what to fix.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from robots.base import Observation


class ObservationCheck:
    """``check(obs) -> None`` (usable) or why not. ``cameras``: name -> (H, W, C) the policy
    expects; ``state_dim``: entries of the state vector; ``max_age_s``: oldest usable
    observation on ``now``'s clock (None: age not checked)."""

    def __init__(self, cameras: dict[str, tuple[int, int, int]], state_dim: int,
                 max_age_s: float | None = None, now: Callable[[], float] | None = None):
        if max_age_s is not None and (max_age_s <= 0 or now is None):
            raise ValueError(f"ObservationCheck max_age_s must be > 0 and needs a clock, got "
                             f"{max_age_s}")
        self.cameras = dict(cameras)
        self.state_dim = int(state_dim)
        self.max_age_s = max_age_s
        self.now = now

    @classmethod
    def for_manifest(cls, manifest, max_age_s: float | None = None, now=None) -> "ObservationCheck":
        cams = {c["name"]: (int(c["height"]), int(c["width"]), int(c.get("channels", 3)))
                for c in manifest.cameras}
        return cls(cams, int(manifest.inputs["state_dim"]), max_age_s, now)

    def __call__(self, obs: Observation) -> str | None:
        state = np.asarray(obs.state)
        if state.size != self.state_dim:
            return (f"state size: {state.size} entries, the policy takes {self.state_dim}; "
                    f"check the robot description's state_names")
        if not np.all(np.isfinite(state)):
            bad = [i for i, x in enumerate(state.reshape(-1).tolist()) if not np.isfinite(x)]
            return (f"state not finite: entries {bad[:8]} are NaN/inf; a sensor or the driver "
                    f"returned garbage")
        for name, want in self.cameras.items():
            img = obs.images.get(name)
            if img is None:
                return (f"camera missing: no image from {name!r} (got {sorted(obs.images)}); "
                        f"the camera stopped delivering")
            if img.shape != want or img.dtype != np.uint8:
                return (f"image size: camera {name!r} sent {img.dtype} {tuple(img.shape)}, the "
                        f"policy takes uint8 HxWxC {want}; fix the camera resolution")
        if self.max_age_s is not None:
            age = self.now() - float(obs.timestamp)
            if not age <= self.max_age_s:  # also catches a NaN timestamp
                return (f"stale observation: {age:.3f} s old > max_obs_age_s {self.max_age_s:g} "
                        f"(--max-obs-age)")
        return None
