"""Simulated cameras, registered by name and chosen by config. Each is a small class with
``render(env, obs) -> HxWx3 uint8`` for one Meta-World env and its current 39-d observation.

``fast`` (default): a synthetic camera in pure numpy that draws the simulator state, not
pixels from a renderer. The frame is two panels sharing the x axis: a top-down view (upper
2/3, rows = y) and a front view (lower 1/3, rows = z), so every entity's 3-D position is a
pixel position, which is what the policy's spatial-softmax encoder can read out (it keeps
positions and drops intensities). Entities are Gaussian blobs: hand red, object green, goal
blue in the top view; complementary colours (cyan, magenta, yellow) in the front view so a
colour-opponent filter tells the panels apart. The hand's blob grows as the gripper opens.

``mujoco``: MuJoCo's own renderer through the env's ``rgb_array`` mode (off-screen via OSMesa
on machines without a GPU display). The env must be created with ``render_mode="rgb_array"``;
``MetaWorldRobot`` does that when this camera is chosen.
"""
from __future__ import annotations

import difflib
import os

import numpy as np

# Scene extent drawn by the fast camera, in metres (Meta-World's table top and above).
X_RANGE = (-0.45, 0.45)
Y_RANGE = (0.3, 1.0)
Z_RANGE = (0.0, 0.4)
BLOB_SIGMA_PX = 1.0
TOP_FRACTION = 2 / 3

_TOP_COLOURS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)  # hand, object, goal
_FRONT_COLOURS = 1.0 - _TOP_COLOURS


def _axis(n: int, lo: float, hi: float) -> np.ndarray:
    """Metric coordinate of each pixel centre along one axis."""
    return lo + (np.arange(n, dtype=np.float32) + 0.5) * (hi - lo) / n


class FastCamera:
    """Synthetic two-panel camera; ~0.1 ms per 48x48 frame."""

    name = "fast"

    def __init__(self, height: int = 48, width: int = 48):
        if height < 12 or width < 12:
            raise ValueError(f"fast camera needs at least 12x12 pixels, got {height}x{width}")
        self.height, self.width = height, width
        self.top_rows = int(round(height * TOP_FRACTION))
        self.front_rows = height - self.top_rows
        self._xs = _axis(width, *X_RANGE)
        # rows grow downwards: far (large y) and high (large z) are drawn at the top
        self._ys = _axis(self.top_rows, *Y_RANGE)[::-1].copy()
        self._zs = _axis(self.front_rows, *Z_RANGE)[::-1].copy()
        self._px = {"x": (X_RANGE[1] - X_RANGE[0]) / width,
                    "y": (Y_RANGE[1] - Y_RANGE[0]) / self.top_rows,
                    "z": (Z_RANGE[1] - Z_RANGE[0]) / self.front_rows}
        self._frame = np.empty((height, width, 3), np.float32)

    def _blob(self, coords: np.ndarray, centre: float, axis: str, scale: float) -> np.ndarray:
        sigma = BLOB_SIGMA_PX * scale * self._px[axis]
        return np.exp(-0.5 * ((coords - centre) / sigma) ** 2)

    def render(self, env, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, np.float32)
        points = (obs[0:3], obs[4:7], obs[-3:])
        grip = float(np.clip(obs[3], 0.0, 1.0))
        frame = self._frame
        frame.fill(0.0)
        top, front = frame[: self.top_rows], frame[self.top_rows:]
        front[0, :, :] = 0.25  # a faint horizon line: the border between the panels
        for i, (x, y, z) in enumerate(points):
            scale = 1.0 + 0.6 * grip if i == 0 else 1.0
            gx = self._blob(self._xs, x, "x", scale)
            top_blob = np.outer(self._blob(self._ys, y, "y", scale), gx)[..., None]
            front_blob = np.outer(self._blob(self._zs, z, "z", scale), gx)[..., None]
            np.maximum(top, top_blob * _TOP_COLOURS[i], out=top)
            np.maximum(front, front_blob * _FRONT_COLOURS[i], out=front)
        return (frame * 255.0 + 0.5).astype(np.uint8)


class MujocoCamera:
    """MuJoCo's renderer (the env's rgb_array mode), resized to the camera spec."""

    name = "mujoco"
    needs_render_mode = True

    def __init__(self, height: int = 48, width: int = 48):
        self.height, self.width = height, width
        os.environ.setdefault("MUJOCO_GL", "osmesa")  # before mujoco's GL context is made

    def render(self, env, obs: np.ndarray) -> np.ndarray:
        try:
            frame = env.render()
        except Exception as e:  # GL backends fail with many exception types
            raise RuntimeError(
                f"the mujoco camera could not render ({type(e).__name__}: {e}); on a machine "
                f"without a display install OSMesa (`apt-get install libosmesa6`) and set "
                f"MUJOCO_GL=osmesa, or use camera='fast'") from e
        if frame is None:
            raise RuntimeError("the mujoco camera needs an env made with render_mode='rgb_array'")
        frame = np.asarray(frame, np.uint8)
        if frame.shape[:2] != (self.height, self.width):
            rows = np.arange(self.height) * frame.shape[0] // self.height
            cols = np.arange(self.width) * frame.shape[1] // self.width
            frame = frame[rows][:, cols]
        return np.ascontiguousarray(frame[..., :3])


CAMERAS = {"fast": FastCamera, "mujoco": MujocoCamera}


def make_camera(name: str, height: int = 48, width: int = 48):
    if name not in CAMERAS:
        near = difflib.get_close_matches(name, CAMERAS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown camera {name!r}{hint} (known: {sorted(CAMERAS)})")
    return CAMERAS[name](height=height, width=width)
