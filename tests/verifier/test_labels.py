"""The fleet's safety labels: the recorder counts envelope interventions beyond plain
saturation, so routine saturation at the action bounds never makes a chunk "unsafe"."""
import numpy as np

from robots.base import Observation
from robots.description import RobotDescription, load_description
from runtime.recorder import Recorder
from runtime.spool import Spool
from runtime.types import Chunk, TickRecord
from verifier.envelope import Envelope

SAWYER = load_description("sawyer_metaworld")
TIGHT = RobotDescription.from_dict({**SAWYER.to_dict(), "name": "tight",
                                    "max_delta": [0.3, 0.3, 0.3, 0.5],
                                    "max_delta2": [0.2, 0.2, 0.2, 0.5], "cameras": []})
INSIDE = np.array([0.0, 0.7, 0.2, 0.5], np.float32)
H, A = 8, 4


def _chunk(chunk_id, start_tick, wanted):
    obs = Observation(images={}, state=INSIDE, instruction="reach", timestamp=0.0)
    actions = np.zeros((H, A), np.float32)
    actions[:len(wanted)] = wanted
    return Chunk(chunk_id=chunk_id, epoch=0, policy_version=1, weight_sha256="ab" * 32,
                 observation=obs, start_tick=start_tick, actions=actions, mean=actions.copy(),
                 log_std=np.zeros((H, A), np.float32), prefix=np.zeros((H, A), np.float32),
                 prefix_len=0)


def _run(envelope, recorder, chunks):
    """Each chunk's rows go through the envelope, then to the recorder, as the control loop
    does on one thread."""
    recorder.start_episode()
    last, tick = None, 0
    for c, rows in chunks:
        for offset in range(rows):
            sent, clamped, _ = envelope.apply(c.actions[offset], last, INSIDE)
            last = sent
            recorder.on_tick(TickRecord(tick=tick, chunk=c, offset=offset, action=sent,
                                        clamped=clamped, reward=0.0, terminated=False,
                                        truncated=False, success=False))
            tick += 1
    recorder.end_episode()
    return [r for _, b in recorder.spool.peek(100) for r in b.records]


def test_saturation_is_not_an_intervention_but_a_velocity_clamp_is(tmp_path):
    env = Envelope(SAWYER)
    rec = Recorder(Spool(tmp_path, "r"), "r", "reach", background=False, envelope=env)
    saturating = _chunk(1, 0, [[0.0, 0.0, 0.0, 1.6], [0.0, 0.0, 0.0, 1.9]])  # gripper at its bound
    jumping = _chunk(2, 2, [[-0.9, 0.0, 0.0, 1.0], [0.9, 0.0, 0.0, 1.0]])    # 1.8 in one tick
    r1, r2 = _run(env, rec, [(saturating, 2), (jumping, 2)])
    assert env.actions_clamped == 3  # the envelope changed three of those commands
    assert r1.verifier.actions_clamped == 0 and r2.verifier.actions_clamped == 1


def test_without_an_envelope_every_clamp_counts(tmp_path):
    env = Envelope(TIGHT)
    rec = Recorder(Spool(tmp_path, "r"), "r", "reach", background=False)
    (r1,) = _run(env, rec, [(_chunk(1, 0, [[0.0, 0.0, 0.0, 1.6], [0.0, 0.0, 0.0, 1.9]]), 2)])
    assert r1.verifier.actions_clamped == 2
