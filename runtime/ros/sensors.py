"""Sensor input of the ROS 2 node: decode messages, keep the newest of each, and decide whether
they make one usable observation or the robot must hold (and why).

Works on rclpy messages and on the cyclonedds classes of ``runtime/ros/msgs.py`` alike: only
field names are used. Times are seconds on the ROS clock (header stamps); a zero stamp means
"unstamped" and the receive time stands in for it.
"""
from __future__ import annotations

import array
import dataclasses
import threading

import numpy as np

from robots.base import Observation


def stamp_s(stamp) -> float:
    return float(stamp.sec) + 1e-9 * float(stamp.nanosec)


def to_stamp(t: float) -> tuple[int, int]:
    sec = int(np.floor(t))
    return sec, min(int(round((t - sec) * 1e9)), 999_999_999)


def _bytes(data) -> np.ndarray:
    if isinstance(data, (bytes, bytearray, memoryview, array.array)):
        return np.frombuffer(data, np.uint8)
    return np.asarray(data, np.uint8)


_CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1, "8UC1": 1, "8UC3": 3}


def decode_image(msg) -> np.ndarray:
    """sensor_msgs/Image -> HxWxC uint8 RGB (or HxWx1 mono)."""
    enc = msg.encoding
    if enc not in _CHANNELS:
        raise ValueError(f"image encoding {enc!r} is not supported; publish one of "
                         f"{sorted(_CHANNELS)}")
    h, w, c = int(msg.height), int(msg.width), _CHANNELS[enc]
    flat = _bytes(msg.data)
    step = int(msg.step) or w * c
    if flat.size < h * step or step < w * c:
        raise ValueError(f"image {w}x{h} {enc}: {flat.size} bytes with step {step} is too short")
    img = flat[:h * step].reshape(h, step)[:, :w * c].reshape(h, w, c)
    if enc.startswith("bgr"):
        img = img[:, :, [2, 1, 0] + ([3] if c == 4 else [])]
    return img[:, :, :3] if c == 4 else img


def decode_compressed(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (jpeg/png) -> HxWx3 uint8 RGB. Needs Pillow."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("compressed images need Pillow: pip install pillow, or set "
                          "image_transport: raw") from e
    import io
    with Image.open(io.BytesIO(_bytes(msg.data).tobytes())) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def fit_image(img: np.ndarray, height: int, width: int, channels: int) -> np.ndarray:
    """Nearest-neighbour resize and channel match to what the policy was trained on."""
    if img.shape[:2] != (height, width):
        rows = (np.arange(height) * img.shape[0]) // height
        cols = (np.arange(width) * img.shape[1]) // width
        img = img[rows][:, cols]
    if img.shape[2] != channels:
        img = np.repeat(img[:, :, :1], channels, axis=2) if img.shape[2] == 1 else img[:, :, :channels]
    return np.ascontiguousarray(img)


@dataclasses.dataclass(frozen=True)
class Reading:
    stamp: float       # header stamp, or the receive time when unstamped
    value: object


class SensorCache:
    """The newest joint state, image per camera and instruction; thread-safe (transport
    callbacks write, the control thread reads)."""

    def __init__(self, joints: tuple[str, ...], cameras: dict[str, tuple[int, int, int]],
                 max_age_s: float, max_skew_s: float, instruction: str = ""):
        self.joints, self.cameras = tuple(joints), dict(cameras)
        self.max_age_s, self.max_skew_s = max_age_s, max_skew_s
        self._lock = threading.Lock()
        self._joints: Reading | None = None
        self._images: dict[str, Reading] = {}
        self._instruction = instruction
        self._bad: dict[str, str] = {}   # source -> why its last message was unusable
        self.received = {"joint_states": 0, **{c: 0 for c in cameras}}

    def _stamp(self, header, received: float) -> float:
        t = stamp_s(header.stamp)
        return t if t > 0 else received

    def on_joint_state(self, msg, received: float) -> None:
        index = {n: i for i, n in enumerate(msg.name)}
        missing = [j for j in self.joints if j not in index]
        with self._lock:
            self.received["joint_states"] += 1
            if missing or len(msg.position) < len(msg.name):
                self._bad["joint_states"] = (f"joint_states lacks positions of {missing} "
                                             f"(has {list(msg.name)})")
                return
            pos = np.asarray([msg.position[index[j]] for j in self.joints], np.float32)
            if not np.all(np.isfinite(pos)):  # a NaN reading must not become a command
                self._bad["joint_states"] = (f"joint_states not finite: "
                                             f"{dict(zip(self.joints, pos.tolist()))}")
                return
            self._bad.pop("joint_states", None)
            self._joints = Reading(self._stamp(msg.header, received), pos)

    def on_image(self, camera: str, msg, received: float, compressed: bool = False) -> None:
        try:
            img = decode_compressed(msg) if compressed else decode_image(msg)
            img = fit_image(img, *self.cameras[camera])
        except (ValueError, ImportError) as e:
            with self._lock:
                self._bad[camera] = f"camera {camera}: {e}"
            return
        with self._lock:
            self.received[camera] += 1
            self._bad.pop(camera, None)
            self._images[camera] = Reading(self._stamp(msg.header, received), img)

    def on_instruction(self, msg) -> None:
        with self._lock:
            self._instruction = str(msg.data)

    def hold_reason(self, now: float) -> str | None:
        """None when a usable observation exists at ``now``; else why the robot must hold."""
        with self._lock:
            if self._bad:
                return "; ".join(self._bad.values())
            readings = {"joint_states": self._joints, **{c: self._images.get(c) for c in self.cameras}}
            instruction = self._instruction
        waiting = [name for name, r in readings.items() if r is None]
        if waiting:
            return f"waiting for {', '.join(waiting)}"
        if not instruction:
            return "no instruction: publish one or set the instruction parameter"
        for name, r in readings.items():
            age = now - r.stamp
            if age > self.max_age_s:
                return f"{name} stale: {age:.3f} s old > max_age_s {self.max_age_s:g}"
        stamps = {name: r.stamp for name, r in readings.items()}
        newest, oldest = max(stamps, key=stamps.get), min(stamps, key=stamps.get)
        skew = stamps[newest] - stamps[oldest]
        if skew > self.max_skew_s:
            return (f"cameras and joint states out of sync: {oldest} is {skew:.3f} s behind "
                    f"{newest} > max_skew_s {self.max_skew_s:g}")
        return None

    def observation(self) -> Observation:
        with self._lock:
            j, images, instruction = self._joints, dict(self._images), self._instruction
        return Observation(images={c: r.value for c, r in images.items()}, state=j.value.copy(),
                           instruction=instruction, timestamp=j.stamp)


class TeleopInput:
    """An operator's joint position targets (sensor_msgs/JointState on ``teleop_topic``, e.g.
    from a leader arm or a teleoperation tool): while a message is fresher than ``timeout_s``
    the operator has the robot and its command is sent instead of the policy's; the node
    records those ticks as human interventions. A message without every joint, or with a
    non-finite position, is ignored (and counted): it cannot be a command."""

    def __init__(self, joints: tuple[str, ...], timeout_s: float):
        self.joints, self.timeout_s = tuple(joints), float(timeout_s)
        self._lock = threading.Lock()
        self._last: Reading | None = None
        self.received = self.refused = 0

    def on_joint_state(self, msg, received: float) -> None:
        index = {n: i for i, n in enumerate(msg.name)}
        with self._lock:
            self.received += 1
            if any(j not in index for j in self.joints) or len(msg.position) < len(msg.name):
                self.refused += 1
                return
            pos = np.asarray([msg.position[index[j]] for j in self.joints], np.float32)
            if not np.all(np.isfinite(pos)):
                self.refused += 1
                return
            # the receive time, not the header stamp: a takeover lasts while messages arrive
            self._last = Reading(received, pos)

    def command(self, now: float) -> np.ndarray | None:
        """The operator's command at ``now``, or None when no operator is driving."""
        with self._lock:
            last = self._last
        if last is None or now - last.stamp > self.timeout_s:
            return None
        return last.value.copy()
