"""Canary rollout over real gRPC: the real learner service, store and registry, and real weight
subscribers (the robots' side). Metrics reach the controller the real way: PushExperience into
the store, which the controller's thread reads."""
import json
import time

import grpc
import pytest

from learner.canary import CanaryConfig, RolloutController, wilson_upper
from learner.export import config_from_manifest
from learner.model import ReferenceVLA
from learner.registry import Registry
from learner.service import serve
from learner.store import ExperienceStore
from runtime.artifact import verify_artifact
from runtime.signature import Trust
from runtime.weights import WeightSubscriber
from tests.doubles import public_key_for_tests, signing_key_for_tests
from tests.learner.helpers import make_artifact, simple_record
from tether.wire import tether_pb2 as pb, tether_pb2_grpc as pb_grpc

ROBOTS = ("r0", "r1", "r2", "r3")


class Fleet:
    """A learner (service + store + registry + rollout) and four subscribed robots."""

    def __init__(self, root, config: CanaryConfig):
        artifact, ckpt, _ = make_artifact(root)
        self.store = ExperienceStore(root / "experience")
        self.registry = Registry(root / "registry", signing_key=signing_key_for_tests())
        self.registry.import_initial(artifact, ckpt)
        self.model = ReferenceVLA(config_from_manifest(self.registry.manifest(1)))
        self.rollout = RolloutController(self.registry, self.store, config).start()
        self.server, port = serve("127.0.0.1:0", self.store, self.registry, max_workers=16,
                                  rollout=self.rollout)
        self.addr = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.addr)
        self.stub = pb_grpc.LearnerStub(self.channel)
        self.installed = {r: [] for r in ROBOTS}
        self.seq = {r: 0 for r in ROBOTS}
        self.batches = 0
        trust = Trust.load([public_key_for_tests()])
        self.robots = {
            r: WeightSubscriber(self.addr, r, root / r, lambda p, m, r=r: self.installed[r].append(
                m.version), current_version=1, backoff_cap_s=0.1, trust=trust).start()
            for r in ROBOTS}
        assert wait(lambda: self.rollout.status()["robots"] == list(ROBOTS))

    def versions(self) -> dict[str, int]:
        return {r: s.current_version for r, s in self.robots.items()}

    def publish(self) -> int:
        return self.registry.publish(self.model).version

    def episodes(self, robot: str, version: int, outcomes, clamped: int = 0) -> None:
        """Complete episodes of 3 chunks each, pushed over gRPC like a robot's stream."""
        records = []
        for i, success in enumerate(outcomes):
            episode = f"{robot}-v{version}-{self.seq[robot]}"
            for k in range(3):
                r = simple_record(robot, episode, self.seq[robot], version=version,
                                  done=k == 2, success=success and k == 2)
                r.verifier.actions_clamped = clamped
                records.append(r)
                self.seq[robot] += 1
        self.batches += 1
        ack = self.stub.PushExperience(pb.ExperienceBatch(robot_id=robot, batch_seq=self.batches,
                                                          records=records), timeout=10)
        assert ack.stored == len(records)

    def close(self) -> None:
        for s in self.robots.values():
            s.stop()
        self.channel.close()
        self.rollout.stop()
        self.registry.close()
        self.server.stop(0)
        self.store.close()


def wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def fleet(tmp_path):
    f = Fleet(tmp_path, CanaryConfig(fraction=0.25, episodes=2, poll_s=0.05))
    yield f
    f.close()


def test_canary_goes_first_then_promotion_then_rollback(fleet, tmp_path):
    # a new version reaches the canary robot only
    v2 = fleet.publish()
    assert wait(lambda: sorted(fleet.versions().values()) == [1, 1, 1, 2])
    [canary] = [r for r, v in fleet.versions().items() if v == 2]
    assert fleet.rollout.status()["canary"]["robots"] == [canary]
    time.sleep(1.0)  # the others really stay on the stable version
    assert sorted(fleet.versions().values()) == [1, 1, 1, 2]
    assert all(fleet.installed[r] == [] for r in ROBOTS if r != canary)
    assert fleet.robots[canary].stage == "canary"

    # good metrics: the stable robots succeed half the time, the canary every time -> promoted
    for r in ROBOTS:
        if r != canary:
            fleet.episodes(r, 1, [True, False])
    fleet.episodes(canary, v2, [True])
    time.sleep(0.5)
    assert fleet.rollout.status()["stage"] == "canary"  # 1 of 2 canary episodes: no verdict yet
    fleet.episodes(canary, v2, [True])
    assert wait(lambda: set(fleet.versions().values()) == {2})
    status = fleet.rollout.status()
    assert status["stable"] == 2 and status["canary"] is None
    assert status["decisions"][-1]["decision"] == "promoted"
    assert all(s.stage == "stable" for s in fleet.robots.values())

    # bad metrics on the next version: it fails and the envelope clamps a lot -> rolled back
    v3 = fleet.publish()
    assert wait(lambda: sorted(fleet.versions().values()) == [2, 2, 2, 3])
    [canary3] = [r for r, v in fleet.versions().items() if v == 3]
    for r in ROBOTS:
        if r != canary3:
            fleet.episodes(r, 2, [True, True])
    fleet.episodes(canary3, v3, [False, False], clamped=4)
    assert wait(lambda: set(fleet.versions().values()) == {2})
    status = fleet.rollout.status()
    assert status["rolled_back"] == [3] and status["stable"] == 2
    decision = status["decisions"][-1]
    assert decision["decision"] == "rolled back" and "success 0/2" in decision["reason"]
    assert fleet.robots[canary3].rollbacks == 1 and fleet.robots[canary3].stage == "stable"
    assert all(3 not in fleet.installed[r] for r in ROBOTS if r != canary3)

    # the rolled back version is never announced again; the next one is tried as a canary
    v4 = fleet.publish()
    assert wait(lambda: max(fleet.versions().values()) == v4)
    assert sorted(fleet.versions().values()) == [2, 2, 2, 4]
    assert all(3 not in fleet.installed[r] for r in ROBOTS if r != canary3)
    saved = json.loads((tmp_path / "registry" / "rollout.json").read_text())
    assert saved["stable"] == 2 and saved["rolled_back"] == [3]
    # ... and the decisions survive a restart of the learner
    again = RolloutController(fleet.registry, fleet.store, CanaryConfig(fraction=0.25))
    assert again.stable == 2 and again.rolled_back == {3}


def test_a_canary_without_episodes_is_rolled_back_after_the_timeout(tmp_path):
    f = Fleet(tmp_path, CanaryConfig(fraction=0.5, episodes=2, timeout_s=1.0, poll_s=0.05))
    try:
        f.publish()
        assert wait(lambda: sorted(f.versions().values()) == [1, 1, 2, 2])
        assert wait(lambda: set(f.versions().values()) == {1})
        d = f.rollout.status()["decisions"][-1]
        assert d["decision"] == "rolled back" and "only 0 of 2 canary episodes" in d["reason"]
    finally:
        f.close()


def test_fraction_zero_sends_the_latest_to_everyone(tmp_path):
    f = Fleet(tmp_path, CanaryConfig(fraction=0.0))
    try:
        f.publish()
        assert wait(lambda: set(f.versions().values()) == {2})
        assert all(s.stage == "stable" for s in f.robots.values())
    finally:
        f.close()


# -- the decision rule, without the network ----------------------------------------------------
class _Registry:
    def __init__(self, root, latest=1):
        self.root, self._latest, self.min_version = root, latest, 0

    def latest(self):
        return self._latest


def _records(robot, version, outcomes, clamped=0, start=0):
    out = []
    for i, success in enumerate(outcomes):
        r = simple_record(robot, f"{robot}-{version}-{start + i}", start + i, version=version,
                          done=True, success=success)
        r.verifier.actions_clamped = clamped
        out.append(r)
    return out


def test_decisions_follow_the_thresholds(tmp_path):
    reg = _Registry(tmp_path)
    now = [0.0]
    c = RolloutController(reg, None, CanaryConfig(fraction=0.5, episodes=4), clock=lambda: now[0])
    for r in ("a", "b", "c", "d"):
        c.join(r)
    reg._latest = 2
    assert c.assignment("a").version in (1, 2)
    assert {c.assignment(r).stage for r in "abcd"} == {"canary", "stable"}
    assert sum(c.assignment(r).version == 2 for r in "abcd") == 2
    c.observe(_records("x", 1, [True] * 8 + [False] * 2))   # stable: 80 %
    c.observe(_records("y", 2, [True, False, False]))
    assert c.evaluate() is None                               # 3 of 4 episodes
    c.observe(_records("y", 2, [True], start=10))            # 2/4: upper bound 0.72 >= 0.55
    assert c.evaluate() == "promoted" and c.stable == 2
    reg._latest = 3
    assert c.assignment("a").version in (2, 3)
    c.observe(_records("y", 3, [False] * 4, start=20))       # 0/4: upper bound 0.2 < 0.5 - 0.25
    assert c.evaluate() == "rolled back" and c.stable == 2 and c.rolled_back == {3}
    assert {c.assignment(r).version for r in "abcd"} == {2}
    reg._latest = 4                                           # safety alone can roll back too
    c.assignment("a")
    c.observe(_records("y", 4, [True] * 4, clamped=2, start=30))
    assert c.evaluate() == "rolled back" and "interventions per chunk" in c.decisions[-1]["reason"]
    assert wilson_upper(0, 0, 1.0) == 1.0 and abs(wilson_upper(2, 2, 1.0) - 1.0) < 1e-9


def test_one_robot_is_its_own_canary_and_min_version_never_exceeds_the_assignment(tmp_path):
    reg = _Registry(tmp_path)
    c = RolloutController(reg, None, CanaryConfig(fraction=0.25, episodes=1))
    c.join("solo")
    reg._latest, reg.min_version = 2, 2
    a = c.assignment("solo")
    assert (a.version, a.stage, a.min_version) == (2, "canary", 2)
    c.join("late")  # joined after the canary started: stays on stable, gated at most there
    b = c.assignment("late")
    assert (b.version, b.stage, b.min_version) == (1, "stable", 1)
    with pytest.raises(ValueError, match="--canary-fraction"):
        CanaryConfig(fraction=1.5)


def test_measuring_from_the_stores_columns_matches_the_records(tmp_path):
    """``poll_store`` reads typed columns (no record parsing); it must see what the records say:
    episodes, successes and interventions per version, in store order, across polls."""
    store = ExperienceStore(tmp_path / "experience")
    recs = (_records("x", 1, [True, False, True]) + _records("y", 2, [False, True], clamped=3)
            + _records("y", 2, [True], clamped=1, start=5))
    recs[1].verifier.rejected = 2
    recs[-1].human_intervention = True  # an operator finished that episode: not version 2's
    for i, r in enumerate(recs):
        store.append(pb.ExperienceBatch(robot_id=r.robot_id, batch_seq=i + 1, records=[r]))
    from_store = RolloutController(_Registry(tmp_path), store, CanaryConfig(fraction=0.5))
    assert from_store.poll_store(limit=4) == 4 and from_store.poll_store(limit=4) == 2
    assert from_store.poll_store() == 0
    direct = RolloutController(_Registry(tmp_path), None, CanaryConfig(fraction=0.5))
    direct.observe(recs)
    for v in (1, 2):
        a, b = from_store._stats[v], direct._stats[v]
        assert (a.chunks, a.interventions, a.episodes, a.successes) == \
               (b.chunks, b.interventions, b.episodes, b.successes)
    assert from_store._stats[2].interventions == 3 + 3 and from_store._stats[1].interventions == 2
    assert (from_store._stats[2].episodes, from_store._stats[2].chunks) == (2, 2)
    store.close()


def test_an_operators_chunks_and_the_episodes_they_finish_are_not_the_versions(tmp_path):
    c = RolloutController(_Registry(tmp_path), None, CanaryConfig(fraction=0.5))
    own = simple_record("r", "ep-1", 1, version=2)
    took_over = simple_record("r", "ep-1", 2, version=2, done=True, success=True)
    took_over.human_intervention = True
    alone = simple_record("r", "ep-2", 3, version=2, done=True, success=False)
    c.observe([own, took_over, alone])
    s = c._stats[2]
    # the operator's success is not the version's; its own failing episode still counts
    assert (s.episodes, s.successes, s.chunks) == (1, 0, 2)


def test_the_rollout_pins_its_stable_and_canary_versions_against_retention(tmp_path):
    artifact, ckpt, model = make_artifact(tmp_path)
    reg = Registry(tmp_path / "reg", keep_versions=2)
    reg.import_initial(artifact, ckpt)
    model = ReferenceVLA(config_from_manifest(reg.manifest(1)))
    model.load_state_dict(reg.load_checkpoint(1)["model"])
    c = RolloutController(reg, None, CanaryConfig(fraction=0.5, episodes=1))
    for r in ("a", "b"):
        c.join(r)
    reg.publish(model)
    assert {c.assignment(r).version for r in "ab"} == {1, 2}  # v2 the canary, v1 stable
    for _ in range(4):  # the trainer goes on publishing while the canary is out
        reg.publish(model)
    assert reg.versions() == [1, 2, 5, 6]
    assert {c.assignment(r).version for r in "ab"} == {1, 2}
    assert verify_artifact(reg.artifact_dir(2)).version == 2
    c.observe(_records("x", 2, [True]))
    assert c.evaluate() == "promoted" and c.stable == 2
    assert c.canary.version == 6  # the next canary: the newest version
    reg.publish(model)
    assert reg.versions() == [1, 2, 6, 7]  # v2 stable and v6 canary kept, v5 went
