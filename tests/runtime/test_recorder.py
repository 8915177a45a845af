"""The recorder: spans of ticks become chunk records with exact behaviour log-probs."""
import time

import numpy as np
import pytest

from robots.base import Observation
from runtime import tensors
from runtime.distributions import gaussian_log_prob
from runtime.recorder import Recorder
from runtime.spool import Spool
from runtime.types import Chunk, TickRecord, VerifierVerdict

H, A = 6, 3


def _chunk(chunk_id, start_tick, rng, epoch=0):
    obs = Observation(images={"front": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)},
                      state=rng.normal(size=4).astype(np.float32),
                      instruction=f"reach {chunk_id}", timestamp=0.1 * chunk_id)
    mean = rng.normal(size=(H, A)).astype(np.float32)
    return Chunk(chunk_id=chunk_id, epoch=epoch, policy_version=7, weight_sha256="ab" * 32,
                 observation=obs, start_tick=start_tick, actions=mean.copy(), mean=mean,
                 log_std=np.full((H, A), -0.5, np.float32),
                 prefix=np.zeros((H, A), np.float32), prefix_len=2,
                 verdict=VerifierVerdict(candidates=4, chosen=2, rejected=1,
                                         scores=(0.9, 0.2, 0.8, 0.1), seconds=0.01, rounds=2,
                                         advantages=(0.5, -1.0, 0.25, 0.0)))


def _tick(tick, chunk, offset, rng, reward=1.0, clamped=False, **done):
    action = (chunk.mean[offset] + 0.1 * rng.normal(size=A)).astype(np.float32) if chunk \
        else np.zeros(A, np.float32)
    return TickRecord(tick=tick, chunk=chunk, offset=offset, action=action, clamped=clamped,
                      reward=reward, terminated=done.get("terminated", False),
                      truncated=done.get("truncated", False), success=done.get("success", False))


def _all_records(spool):
    return [r for _, b in spool.peek(1000) for r in b.records]


def test_spans_become_records_with_exact_log_prob(tmp_path):
    rng = np.random.default_rng(0)
    spool = Spool(tmp_path, "r1")
    rec = Recorder(spool, "r1", "reach-v3", batch_records=100, background=False)
    ep = rec.start_episode()
    assert ep.startswith("r1-")
    c1, c2 = _chunk(1, 0, rng), _chunk(2, 3, rng)
    ticks = [_tick(0, c1, 0, rng), _tick(1, c1, 1, rng, clamped=True), _tick(2, c1, 2, rng),
             _tick(3, c2, 1, rng), _tick(4, c2, 2, rng, reward=5.0, terminated=True, success=True)]
    for t in ticks:
        rec.on_tick(t)
    assert _all_records(spool) == []  # nothing spooled before the batch fills or the episode ends
    rec.end_episode()
    r1, r2 = _all_records(spool)
    assert (rec.records, rec.transitions, rec.episodes) == (2, 2, 1)
    assert r1.seq < r2.seq and r1.episode_id == r2.episode_id == ep
    assert list(r1.offsets) == [0, 1, 2] and list(r2.offsets) == [1, 2]
    acts = tensors.from_proto(r1.actions)
    assert acts.shape == (3, A) and np.array_equal(acts, np.stack([t.action for t in ticks[:3]]))
    direct = gaussian_log_prob(c1.mean, c1.log_std, acts, np.array([0, 1, 2]))
    assert r1.behaviour_log_prob == pytest.approx(direct, rel=1e-12)
    z = (acts - c1.mean[:3]) / np.exp(-0.5)
    closed_form = np.sum(-0.5 * z ** 2 + 0.5 - 0.5 * np.log(2 * np.pi))
    assert r1.behaviour_log_prob == pytest.approx(closed_form, rel=1e-5)
    assert (r1.reward, r2.reward) == (3.0, 6.0)
    # a policy with correlated rows: its chunks say so and the log-prob is the joint one
    import dataclasses
    c3 = dataclasses.replace(_chunk(3, 5, rng), row_correlation=0.8)
    rec.start_episode()
    rec.on_tick(_tick(5, c3, 0, rng))
    rec.on_tick(_tick(6, c3, 1, rng, terminated=True))
    rec.end_episode()
    r3 = _all_records(spool)[-1]
    acts3 = tensors.from_proto(r3.actions)
    assert r3.behaviour_log_prob == pytest.approx(
        gaussian_log_prob(c3.mean, c3.log_std, acts3, np.array([0, 1]), 0.8), rel=1e-12)
    assert r3.behaviour_log_prob != pytest.approx(
        gaussian_log_prob(c3.mean, c3.log_std, acts3, np.array([0, 1])), rel=1e-3)
    assert not r1.terminated and r2.terminated and r2.success
    assert (r1.start_tick, r2.start_tick) == (0, 3)
    assert r1.verifier.actions_clamped == 1 and r2.verifier.actions_clamped == 0
    assert r1.verifier.candidates == 4 and r1.verifier.chosen == 2
    assert list(r1.verifier.scores) == pytest.approx([0.9, 0.2, 0.8, 0.1])
    assert r1.verifier.rounds == 2 and not r1.verifier.veto_overridden
    assert list(r1.verifier.advantages) == pytest.approx([0.5, -1.0, 0.25, 0.0])
    assert (r1.policy_version, r1.weight_sha256, r1.task) == (7, "ab" * 32, "reach-v3")
    obs = r2.observation
    assert obs.instruction == "reach 2" and obs.timestamp == pytest.approx(0.2)
    assert np.array_equal(tensors.from_proto(obs.images["front"]), c2.observation.images["front"])
    assert np.array_equal(tensors.from_proto(obs.state), c2.observation.state)
    assert r1.prefix_len == 2 and tensors.from_proto(r1.prefix).shape == (H, A)


def test_records_keep_the_policys_rows_and_weigh_them_not_the_enveloped_commands(tmp_path):
    """The envelope saturated or rate-limited the executed command; the record keeps the row
    the policy proposed next to it, and the behaviour probability is that row's."""
    import dataclasses
    rng = np.random.default_rng(4)
    spool = Spool(tmp_path, "r1")
    rec = Recorder(spool, "r1", "t", batch_records=100, background=False)
    rec.start_episode()
    c1 = _chunk(1, 0, rng)
    proposed = (c1.mean[:3] + 0.3 * rng.normal(size=(3, A))).astype(np.float32)
    ticks = [dataclasses.replace(_tick(i, c1, i, rng, terminated=i == 2), clamped=True,
                                 action=np.clip(proposed[i], -0.2, 0.2), policy_action=proposed[i])
             for i in range(3)]
    for t in ticks:
        rec.on_tick(t)
    rec.end_episode()
    (r,) = _all_records(spool)
    executed = tensors.from_proto(r.actions)
    assert np.array_equal(executed, np.clip(proposed, -0.2, 0.2))
    assert np.array_equal(tensors.from_proto(r.policy_actions), proposed)
    offsets = np.arange(3)
    assert r.behaviour_log_prob == pytest.approx(
        gaussian_log_prob(c1.mean, c1.log_std, proposed, offsets), rel=1e-12)
    assert r.behaviour_log_prob != pytest.approx(
        gaussian_log_prob(c1.mean, c1.log_std, executed, offsets), rel=1e-3)


def test_underrun_ticks_are_attributed(tmp_path):
    rng = np.random.default_rng(1)
    spool = Spool(tmp_path, "r1")
    rec = Recorder(spool, "r1", "t", background=False)
    rec.start_episode("ep-1")
    c1, c2 = _chunk(1, 2, rng), _chunk(2, 6, rng)
    # two holds before any chunk -> first record; one hold mid-span -> that span
    for t in [_tick(0, None, 0, rng), _tick(1, None, 0, rng), _tick(2, c1, 0, rng),
              _tick(3, None, 0, rng), _tick(4, c1, 2, rng), _tick(5, c2, 0, rng),
              _tick(6, None, 0, rng, truncated=True)]:
        rec.on_tick(t)
    rec.end_episode()
    r1, r2 = _all_records(spool)
    assert (r1.underrun_ticks, r2.underrun_ticks) == (3, 1)
    assert list(r1.offsets) == [0, 2] and list(r2.offsets) == [0]
    assert r1.start_tick == 2 and r1.reward == 5.0 and r2.reward == 2.0
    assert r2.truncated and not r1.truncated  # the span's last tick (a hold) decides


def test_batches_every_n_records_and_flushes_at_episode_end(tmp_path):
    rng = np.random.default_rng(2)
    spool = Spool(tmp_path, "r1")
    rec = Recorder(spool, "r1", "t", batch_records=2)
    rec.start_episode()
    chunks = [_chunk(i, i, rng) for i in range(6)]
    for i, c in enumerate(chunks[:3]):
        rec.on_tick(_tick(i, c, 0, rng))
    assert rec.flush(5.0)  # flush() also spools the partial buffer; count what batching did first
    rec.start_episode()    # ends the first episode (its last span)
    for i, c in enumerate(chunks[3:]):
        rec.on_tick(_tick(10 + i, c, 0, rng))
    rec.close()
    sizes = [len(b.records) for _, b in spool.peek(100)]
    assert sum(sizes) == 6 and rec.episodes == 2 and rec.records == 6
    assert max(sizes) <= 2
    records = _all_records(spool)
    assert [r.seq for r in records] == sorted({r.seq for r in records})
    assert len({r.episode_id for r in records}) == 2


def test_new_epoch_with_same_chunk_id_starts_a_new_record(tmp_path):
    rng = np.random.default_rng(3)
    spool = Spool(tmp_path, "r1")
    rec = Recorder(spool, "r1", "t", background=False)
    rec.start_episode()
    rec.on_tick(_tick(0, _chunk(1, 0, rng, epoch=0), 0, rng))
    rec.on_tick(_tick(1, _chunk(1, 1, rng, epoch=1), 0, rng))
    rec.end_episode()
    assert len(_all_records(spool)) == 2


class SlowSpool(Spool):
    """A spool on a disk whose fsync takes 100 ms (a busy SD card)."""

    def append(self, records):
        time.sleep(0.1)
        return super().append(records)


def test_on_tick_never_waits_for_the_disk(tmp_path):
    rng = np.random.default_rng(4)
    spool = SlowSpool(tmp_path, "r1")
    rec = Recorder(spool, "r1", "t", batch_records=1)
    rec.start_episode()
    ticks = [_tick(i, _chunk(i, i, rng), 0, rng) for i in range(20)]
    worst = 0.0
    for t in ticks:
        t0 = time.perf_counter()
        rec.on_tick(t)  # every tick closes a span and hands a batch to the writer
        worst = max(worst, time.perf_counter() - t0)
    rec.close()
    assert spool.pending() == 20 and rec.records_dropped == 0
    assert worst < 0.05, f"on_tick took {worst * 1e3:.1f} ms; the writer thread should absorb it"


def _operator_tick(tick, rng, observation=True, chunk=None, **done):
    obs = (Observation(images={"front": rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)},
                       state=rng.normal(size=4).astype(np.float32), instruction="op",
                       timestamp=0.01 * tick) if observation else None)
    return TickRecord(tick=tick, chunk=chunk, offset=0, action=rng.normal(size=A).astype(np.float32),
                      clamped=False, reward=0.5, terminated=done.get("terminated", False),
                      truncated=False, success=done.get("success", False), operator=True,
                      observation=obs)


def test_operator_ticks_become_human_intervention_records(tmp_path):
    rng = np.random.default_rng(3)
    spool = Spool(tmp_path, "r1")
    rec = Recorder(spool, "r1", "t", batch_records=100, background=False)
    rec.start_episode("ep-op")
    c1 = _chunk(1, 0, rng)
    policy_ticks = [_tick(0, c1, 0, rng), _tick(1, c1, 1, rng)]
    # the operator takes over for H + 2 ticks (the policy's chunk keeps arriving, ignored),
    # lets go for one policy tick, then takes over again until the episode succeeds
    op1 = [_operator_tick(2 + i, rng, chunk=c1 if i < 2 else None) for i in range(H + 2)]
    back = _tick(2 + H + 2, c1, 3, rng)
    op2 = [_operator_tick(H + 5, rng), _operator_tick(H + 6, rng, terminated=True, success=True)]
    for t in policy_ticks + op1 + [back] + op2:
        rec.on_tick(t)
    rec.end_episode()
    recs = _all_records(spool)
    assert [r.human_intervention for r in recs] == [False, True, True, False, True]
    assert rec.interventions == 3
    own, h1, h2, again, h3 = recs
    assert list(own.offsets) == [0, 1] and own.behaviour_log_prob != 0.0
    # an intervention record: the observation before the operator's first tick, its commands
    # as rows 0, 1, ... (at most a horizon per record), no prefix, no behaviour probability
    assert list(h1.offsets) == list(range(H)) and list(h2.offsets) == [0, 1]
    assert np.array_equal(tensors.from_proto(h1.actions), np.stack([t.action for t in op1[:H]]))
    assert np.array_equal(tensors.from_proto(h2.actions), np.stack([t.action for t in op1[H:]]))
    assert np.array_equal(tensors.from_proto(h1.observation.state), op1[0].observation.state)
    assert np.array_equal(tensors.from_proto(h2.observation.state), op1[H].observation.state)
    assert h1.prefix_len == 0 and tensors.from_proto(h1.prefix).shape == (H, A)
    assert h1.behaviour_log_prob == 0.0 and h1.policy_version == c1.policy_version
    assert not h1.HasField("policy_actions") and own.HasField("policy_actions")
    assert (h1.reward, h1.start_tick) == (0.5 * H, 2)
    assert list(again.offsets) == [3] and not again.human_intervention
    assert h3.terminated and h3.success and list(h3.offsets) == [0, 1]
    assert [r.seq for r in recs] == sorted(r.seq for r in recs)


def test_operator_ticks_without_an_observation_or_a_chunk_count_as_held(tmp_path):
    rng = np.random.default_rng(4)
    spool = Spool(tmp_path, "r1")
    rec = Recorder(spool, "r1", "t", background=False)
    rec.start_episode("ep")
    c1 = _chunk(1, 1, rng)
    # before any chunk the record's shape is unknown; a tick without an observation has
    # nothing to imitate from: both are held ticks of the next record
    for t in [_operator_tick(0, rng), _operator_tick(1, rng, observation=False),
              _tick(2, c1, 0, rng, truncated=True)]:
        rec.on_tick(t)
    rec.end_episode()
    (only,) = _all_records(spool)
    assert not only.human_intervention and only.underrun_ticks == 2 and rec.interventions == 0
