"""Test doubles shared by the test suite. Keep this API stable: other test folders import it.

``PointMassRobot``   a Robot: a point end effector moved by delta commands, one camera.
``FakePolicy``       a ChunkPolicy (runtime/inference.py) with scripted chunks and latency.
``export_tiny_artifact``  a real exported ReferenceVLA artifact (needs torch: tests only),
                     signed with the test key.
``signing_key_for_tests`` / ``public_key_for_tests``  the fixed test key pair (a robot trusts the latter:
                     ``NodeConfig(trusted_keys=(public_key_for_tests(),))``).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
import tempfile
import threading
import time

import numpy as np

from robots.base import Observation, StepResult
from robots.description import RobotDescription, load_description


class PointMassRobot:
    """End effector at ``state[0:3]`` moved by ``ee_scale * cmd[0:3]`` per command; gripper
    opening ``state[3]`` follows the gripper command. Success: within ``goal_tol`` of ``goal``.
    ``sent`` keeps every command received (to check that nothing unsafe reached the robot);
    ``fail_observe``/``fail_send``: tick numbers at which the call raises."""

    def __init__(self, description: str | RobotDescription = "sawyer_metaworld",
                 start=(0.0, 0.6, 0.2), goal=(0.1, 0.7, 0.2), goal_tol: float = 0.02,
                 max_steps: int = 1000, instruction: str = "reach the goal",
                 fail_observe: tuple[int, ...] = (), fail_send: tuple[int, ...] = (),
                 clock=None):
        self.desc = (description if isinstance(description, RobotDescription)
                     else load_description(description))
        self.start = np.asarray(start, np.float32)
        self.goal = np.asarray(goal, np.float32)
        self.goal_tol = goal_tol
        self.max_steps = max_steps
        self.instruction = instruction
        self.fail_observe, self.fail_send = set(fail_observe), set(fail_send)
        self.clock = clock
        self.sent: list[np.ndarray] = []
        self.resets = 0
        self.observes = 0
        self.sends = 0
        self.closed = False
        self._pos = self.start.copy()
        self._grip = 0.0
        self._steps = 0

    def describe(self) -> RobotDescription:
        return self.desc

    def reset(self) -> Observation:
        self.resets += 1
        self._pos, self._grip, self._steps = self.start.copy(), 0.0, 0
        return self._observation()

    def _observation(self) -> Observation:
        images = {c.name: np.zeros((c.height, c.width, c.channels), np.uint8)
                  for c in self.desc.cameras}
        state = np.zeros(self.desc.state_dim, np.float32)
        state[:3], state[3] = self._pos, self._grip
        t = self.clock.now() if self.clock is not None else time.monotonic()
        return Observation(images=images, state=state, instruction=self.instruction, timestamp=t)

    def observe(self) -> Observation:
        self.observes += 1
        if self.observes in self.fail_observe:
            raise RuntimeError(f"point mass: scripted observe failure #{self.observes}")
        return self._observation()

    def send_action(self, action: np.ndarray) -> StepResult:
        self.sends += 1
        if self.sends in self.fail_send:
            raise RuntimeError(f"point mass: scripted send failure #{self.sends}")
        a = np.asarray(action, np.float32).copy()
        self.sent.append(a)
        self._pos = self._pos + self.desc.ee_scale * a[:3]
        self._grip = float(a[3]) if len(a) > 3 else 0.0
        self._steps += 1
        dist = float(np.linalg.norm(self._pos - self.goal))
        success = dist < self.goal_tol
        return StepResult(reward=-dist, terminated=success,
                          truncated=not success and self._steps >= self.max_steps,
                          success=success, sent=a)

    def close(self) -> None:
        self.closed = True


@dataclasses.dataclass(frozen=True)
class FakeOutput:
    mean: np.ndarray
    log_std: np.ndarray
    actions: np.ndarray
    features: np.ndarray
    latency_s: float


class FakePolicy:
    """Scripted chunks: every action of call ``n`` is ``value`` (default: a constant, or a
    callable ``value(n) -> [A]``). ``sleep_s`` really sleeps (threaded tests); virtual-clock
    tests give the worker ``simulated_latency_s`` instead. Records each call's prefix_len."""

    def __init__(self, horizon: int = 8, action_dim: int = 4, version: int = 1,
                 accepts_prefix: bool = True, value=0.5, sleep_s: float = 0.0,
                 nan_on_calls: tuple[int, ...] = ()):
        self.horizon, self.action_dim, self.version = horizon, action_dim, version
        self.accepts_prefix = accepts_prefix
        self.weight_sha256 = f"{version:064x}"
        self.value = value
        self.sleep_s = sleep_s
        self.nan_on_calls = set(nan_on_calls)
        self.calls = 0
        self.prefix_lens: list[int] = []
        self.observations: list[Observation] = []
        self._lock = threading.Lock()

    def infer(self, obs: Observation, prefix=None, prefix_len: int = 0) -> FakeOutput:
        t0 = time.perf_counter()
        with self._lock:
            self.calls += 1
            n = self.calls
            self.prefix_lens.append(int(prefix_len))
            self.observations.append(obs)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        v = self.value(n) if callable(self.value) else self.value
        mean = np.broadcast_to(np.asarray(v, np.float32),
                               (self.horizon, self.action_dim)).astype(np.float32)
        if n in self.nan_on_calls:
            mean = mean.copy()
            mean[0, 0] = np.nan
        log_std = np.full_like(mean, -3.0)
        return FakeOutput(mean, log_std, mean.copy(), np.zeros(4, np.float32),
                          time.perf_counter() - t0)

    def to_command(self, a_n):
        return np.asarray(a_n, np.float32)

    def from_command(self, cmd):
        return np.asarray(cmd, np.float32)


TEST_KEY_SEED = b"tether test signing key, tests only"[:32]


@functools.lru_cache(maxsize=None)
def signing_key_for_tests():
    """A fixed ed25519 key (learner.signing.SigningKey) that signs test artifacts."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from learner.signing import SigningKey
    return SigningKey(Ed25519PrivateKey.from_private_bytes(TEST_KEY_SEED))


@functools.lru_cache(maxsize=None)
def public_key_for_tests() -> str:
    """Path of the test key's public key file (written once per test process)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="tether-test-key-")) / "test_key.pub"
    path.write_bytes(signing_key_for_tests().public_pem())
    return str(path)


def export_tiny_artifact(out_dir: str | pathlib.Path, version: int = 1, seed: int = 0,
                         horizon: int = 8, width: int = 32, features: int = 16,
                         sign: bool = True, vocab: int | None = None):
    """Export a small random ReferenceVLA for the sawyer_metaworld description, signed with the
    test key unless ``sign`` is false. Returns the manifest. Needs torch (the learner side);
    only tests and tools call this."""
    import torch

    from learner.export import export_artifact
    from learner.model import ReferenceVLA, VLAConfig

    torch.manual_seed(seed)
    desc = load_description("sawyer_metaworld")
    cam = desc.cameras[0]
    config = VLAConfig(horizon=horizon, action_dim=desc.action_dim, state_dim=desc.state_dim,
                       cameras=(cam.name,), image_hw=(cam.height, cam.width),
                       channels=cam.channels, width=width, features=features)
    if vocab is not None:
        config = dataclasses.replace(config, vocab=vocab)
    norm = {"state_mean": [0.0, 0.6, 0.2, 0.5], "state_std": [0.2, 0.2, 0.1, 0.5],
            "action_mean": [0.0] * desc.action_dim, "action_std": [0.5] * desc.action_dim}
    manifest = export_artifact(ReferenceVLA(config), out_dir, version=version, parent_version=0,
                               normalization=norm, robot=desc.name,
                               control_rate_hz=desc.control_rate_hz)
    if sign:
        from learner.signing import sign_artifact
        manifest = sign_artifact(out_dir, signing_key_for_tests())
    return manifest
