"""Simulated cameras: the fast synthetic camera's content and the MuJoCo renderer."""
import os

import numpy as np
import pytest

from sim.camera import CAMERAS, FastCamera, make_camera


def _obs(hand=(0.0, 0.6, 0.2), grip=1.0, obj=(0.1, 0.7, 0.02), goal=(-0.1, 0.85, 0.25)):
    obs = np.zeros(39, np.float32)
    obs[0:3], obs[3], obs[4:7], obs[-3:] = hand, grip, obj, goal
    return obs


def _peak(img, colour, rows):
    """(row, col) of the pixel in ``rows`` that best matches a pure ``colour``."""
    part = img[rows].astype(np.float32)
    score = part @ (2 * np.asarray(colour, np.float32) - 1)
    r, c = np.unravel_index(np.argmax(score), score.shape)
    return r + rows.start, c


def test_fast_frame_shape_and_entities_visible():
    cam = FastCamera(48, 48)
    img = cam.render(None, _obs())
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    top = slice(0, cam.top_rows)
    for colour in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):  # hand, object, goal in the top view
        r, c = _peak(img, colour, top)
        assert img[r, c, int(np.argmax(colour))] > 150


def test_fast_entities_move_with_the_hand_in_3d():
    cam = FastCamera(48, 48)
    top, front = slice(0, cam.top_rows), slice(cam.top_rows, 48)
    a = cam.render(None, _obs(hand=(0.0, 0.6, 0.1)))
    b = cam.render(None, _obs(hand=(0.2, 0.8, 0.3)))
    (ra, ca), (rb, cb) = _peak(a, [1, 0, 0], top), _peak(b, [1, 0, 0], top)
    assert cb > ca + 5 and rb < ra - 5  # +x is right, +y is up in the top view
    (fa, _), (fb, _) = _peak(a, [0, 1, 1], front), _peak(b, [0, 1, 1], front)
    assert fb < fa - 3  # higher hand is drawn higher in the front view
    # the goal did not move
    assert _peak(a, [0, 0, 1], top) == _peak(b, [0, 0, 1], top)


def test_fast_gripper_opening_changes_the_hand_blob():
    cam = FastCamera(48, 48)
    open_, closed = cam.render(None, _obs(grip=1.0)), cam.render(None, _obs(grip=0.0))
    assert (open_[..., 0] > 60).sum() > (closed[..., 0] > 60).sum()


def test_unknown_camera_suggests_nearest():
    assert set(CAMERAS) == {"fast", "mujoco"}
    with pytest.raises(ValueError, match="did you mean 'fast'"):
        make_camera("fats")


def _osmesa_missing() -> bool:
    import ctypes.util
    return os.environ.get("MUJOCO_GL", "osmesa") == "osmesa" and not ctypes.util.find_library("OSMesa")


@pytest.mark.skipif(_osmesa_missing(), reason="MuJoCo off-screen rendering needs OSMesa: "
                    "apt-get install libosmesa6 and MUJOCO_GL=osmesa")
def test_mujoco_camera_renders_a_real_frame():
    from sim.metaworld_robot import MetaWorldRobot

    r = MetaWorldRobot("reach-v3", seed=0, camera="mujoco")
    try:
        img = r.reset().images["front"]
        assert img.shape == (48, 48, 3) and img.dtype == np.uint8
        assert img.std() > 5  # a scene, not a blank frame
    finally:
        r.close()
