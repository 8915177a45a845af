"""Fault 4, bad weights: a real learner (gRPC service, signing registry) publishes broken
versions to a real robot node commanding a Meta-World robot.

In turn, each published through the registry like any version (so each is validly signed,
except where the bytes are damaged after signing): corrupt bytes, ONNX outputs whose shapes do
not match the manifest, a manifest whose action size does not match the robot, NaN-producing
weights, a policy that outputs infinities, and a graph too slow for the control rate. Then a
good version. Checked: each bad version is refused with an event naming the reason; the robot
stays on version 1 meanwhile, never stops its control loop, and only ever receives finite
commands inside its action bounds; the good version is installed at the end.
"""
import threading
import time

import numpy as np
import pytest

from tests.doubles import public_key_for_tests, signing_key_for_tests
from tests.faults.report import record, size

torch = pytest.importorskip("torch")
from learner.export import config_from_manifest  # noqa: E402
from learner.model import ReferenceVLA  # noqa: E402
from learner.registry import Registry  # noqa: E402

LATENCY_BUDGET_S = 0.04  # the tiny policy takes ~2 ms; the slow graph ~0.1-0.5 s


class CorruptingRegistry(Registry):
    """Damages policy.onnx after signing, before the version becomes visible: what a robot sees
    from a bad disk, a broken copy or tampering on the learner's side."""
    corrupt_next = False

    def _commit(self, tmp, v):
        if self.corrupt_next:
            path = tmp / "policy.onnx"
            data = bytearray(path.read_bytes())
            for i in range(len(data) // 3, len(data) // 3 + 64):
                data[i] ^= 0xA5
            path.write_bytes(bytes(data))
            self.corrupt_next = False
        super()._commit(tmp, v)


class InfOutputs(ReferenceVLA):
    def forward(self, images, state, tokens, prefix, prefix_len):
        mean, log_std, features = super().forward(images, state, tokens, prefix, prefix_len)
        return mean + float("inf"), log_std, features


class WrongShapes(ReferenceVLA):
    """Its ONNX outputs [B, H, A-1] while its manifest (from its config) says [B, H, A]."""

    def forward(self, images, state, tokens, prefix, prefix_len):
        mean, log_std, features = super().forward(images, state, tokens, prefix, prefix_len)
        return mean[:, :, :-1], log_std[:, :, :-1], features


class Slow(ReferenceVLA):
    """48 dependent 512x512 matmuls on the input: ~13 GFLOP per inference, not foldable."""

    def __init__(self, config):
        super().__init__(config)
        self.register_buffer("w", torch.randn(512, 512) / 512 ** 0.5)

    def forward(self, images, state, tokens, prefix, prefix_len):
        mean, log_std, features = super().forward(images, state, tokens, prefix, prefix_len)
        z = self.w + state[:, :1].mean() * 1e-6
        for _ in range(48):
            z = torch.tanh(z @ self.w)
        return mean + 1e-12 * z.mean(), log_std, features


class Recording:
    """The robot, recording every command it receives."""

    def __init__(self, robot):
        self.robot, self.sent = robot, []

    def __getattr__(self, name):
        return getattr(self.robot, name)

    def send_action(self, action):
        self.sent.append(np.array(action, np.float32))
        return self.robot.send_action(action)


def _bad_versions(config, norm):
    """(kind, publish(registry) -> version, what the refusal says) for each fault."""
    def model(cls=ReferenceVLA, cfg=config):
        torch.manual_seed(1)
        return cls(cfg)

    def corrupt(reg):
        reg.corrupt_next = True
        return reg.publish(model()).version

    def nan(reg):
        m = model()
        with torch.no_grad():
            m.mean_head.weight.fill_(float("nan"))
        return reg.publish(m).version

    def action_dim(reg):
        import dataclasses
        n3 = dict(norm, action_mean=[0.0] * 3, action_std=[0.5] * 3)
        return reg.publish(model(cfg=dataclasses.replace(config, action_dim=3)), n3).version

    return [("corrupt_bytes", corrupt, "corrupt or tampered"),
            ("wrong_output_shapes", lambda reg: reg.publish(model(WrongShapes)).version,
             "has shape"),
            ("wrong_action_dim", action_dim, "takes 4"),
            ("nan_weights", nan, "not finite"),
            ("inf_outputs", lambda reg: reg.publish(model(InfOutputs)).version, "not finite"),
            ("too_slow", lambda reg: reg.publish(model(Slow)).version, "too slow")]


def _wait(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.timeout(900)
def test_bad_weights_are_refused_and_the_robot_keeps_its_good_version(tiny_artifact, tmp_path):
    pytest.importorskip("metaworld")
    from learner.service import serve
    from learner.store import ExperienceStore
    from robots.registry import make_robot
    from runtime.node import NodeConfig, RobotNode

    rounds = size(1, 3)
    registry = CorruptingRegistry(tmp_path / "registry", signing_key=signing_key_for_tests())
    v1 = registry.import_initial(tiny_artifact)
    store = ExperienceStore(tmp_path / "experience")
    server, port = serve("127.0.0.1:0", store, registry, max_workers=16)
    robot = Recording(make_robot("metaworld", task="reach-v3", seed=1, camera="fast"))
    node = RobotNode(NodeConfig(robot_id="r-weights", task="reach-v3",
                                artifact=str(registry.artifact_dir(1)),
                                learner=f"127.0.0.1:{port}", insecure=True,
                                spool=str(tmp_path / "spool"), status=str(tmp_path / "status.json"),
                                trusted_keys=(public_key_for_tests(),),
                                latency_budget_s=LATENCY_BUDGET_S, drain_timeout_s=10),
                     robot=robot)
    runner = threading.Thread(target=node.run, kwargs={"seconds": 1800}, daemon=True)
    runner.start()
    sub = node.subscriber
    refusals, published, refuse_s = [], 0, []
    try:
        assert _wait(lambda: node.worker.chunks > 0, 30), "the robot never got a chunk"
        config = config_from_manifest(v1)
        for _ in range(rounds):
            for kind, publish, reason in _bad_versions(config, v1.normalization):
                before, chunks = sub.refused, node.worker.chunks
                t0 = time.monotonic()
                version = publish(registry)
                published += 1
                assert _wait(lambda: sub.refused > before, 60), f"{kind} v{version} not refused"
                refuse_s.append(time.monotonic() - t0)
                event = [e for e in sub.events if f"refused version {version}:" in e]
                assert event and reason in event[-1], f"{kind}: {event or list(sub.events)[-3:]}"
                assert "keeping version 1" in event[-1]
                refusals.append((kind, version, event[-1]))
                assert node.worker.policy.version == 1 and sub.current_version == 1
                # the robot kept commanding from v1 while the bad version was checked
                assert _wait(lambda: node.worker.chunks > chunks, 5), f"no chunk during {kind}"
        good = registry.publish(ReferenceVLA(config)).version
        published += 1
        assert _wait(lambda: node.worker.policy.version == good, 60), \
            f"good v{good} not swapped in: {list(sub.events)[-3:]}"
        assert _wait(lambda: good in node.worker.versions(), 10)
    finally:
        node.stop()
        runner.join(60)
        registry.close()
        server.stop(0)
        store.close()
    assert not runner.is_alive(), "the node did not stop"
    status = node.status()
    sent = np.stack(robot.sent)
    low, high = robot.describe().bounds()
    assert np.isfinite(sent).all(), "a non-finite command reached the robot"
    assert ((sent >= low - 1e-6) & (sent <= high + 1e-6)).all(), "a command left the bounds"
    stops = int(node.loop.stopped_by_errors)
    assert stops == 0 and status["inference"]["errors"] == 0
    assert set(status["versions_run"]) == {1, good}, status["versions_run"]
    assert sub.refused == len(refusals) == published - 1
    node_events = " | ".join(status["events"])
    for kind, version, _ in refusals:
        if kind != "corrupt_bytes":  # refused by the subscriber before the node saw it
            assert f"refused v{version}" in node_events, (kind, node_events[-400:])
    record("bad_weights", injected=len(refusals), sent=published, stored=1, lost=0,
           duplicated=0, robot_stops=stops, versions_installed=sorted(status["versions_run"]),
           commands=len(sent), refusals={k: e.split(": ", 1)[1][:160] for k, _, e in refusals},
           refuse_s_max=round(max(refuse_s), 2), ticks=status["control"]["ticks"],
           stall_ticks=status["control"]["stall_ticks"],
           deadline_misses=status["control"]["deadline_misses"])
