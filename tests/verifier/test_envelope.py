import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from robots.description import RobotDescription, load_description
from verifier.verdict import VerifierVerdict
from verifier.envelope import Envelope
from verifier.gate import ChunkGate

SAWYER = load_description("sawyer_metaworld")
TIGHT = RobotDescription.from_dict({**SAWYER.to_dict(), "name": "tight",
                                    "max_delta": [0.3, 0.3, 0.3, 0.5],
                                    "max_delta2": [0.2, 0.2, 0.2, 0.5],
                                    "cameras": []})
INSIDE = np.array([0.0, 0.7, 0.2, 0.5], np.float32)
TOL = 1e-5


def test_nonfinite_becomes_the_hold_action():
    env = Envelope(SAWYER)
    last = np.array([0.2, 0.0, 0.0, 0.7], np.float32)
    out, clamped, why = env.apply(np.array([np.nan, 0, np.inf, 0]), last, INSIDE)
    assert clamped and "nonfinite" in why
    np.testing.assert_allclose(out, [0, 0, 0, 0.7])  # delta mode: stop, gripper keeps its command
    assert env.counts["nonfinite"] == 1 and env.actions_clamped == 1


def test_bounds_and_gripper_are_clamped_and_counted():
    env = Envelope(SAWYER)
    out, clamped, why = env.apply(np.array([0.5, -0.5, 0.0, 1.8]), None, INSIDE)
    np.testing.assert_allclose(out, [0.5, -0.5, 0.0, 1.0])
    assert clamped and why == ("gripper",)
    out, _, why = env.apply(np.array([0.5, -3.0, 0.0, 1.0]), out, INSIDE)
    assert out[1] == pytest.approx(-1.0) and "bounds" in why


def test_a_safe_command_passes_unchanged():
    env = Envelope(SAWYER)
    cmd = np.array([0.3, -0.2, 0.1, 0.5], np.float32)
    out, clamped, why = env.apply(cmd, None, INSIDE)
    np.testing.assert_array_equal(out, cmd)
    assert not clamped and why == ()


def test_velocity_and_acceleration_limits():
    env = Envelope(TIGHT)
    out1, _, why = env.apply(np.array([1.0, 0, 0, 0]), None, INSIDE)
    assert out1[0] == pytest.approx(0.3) and "velocity" in why
    # a sudden stop: velocity allows 0.0, acceleration only slowing by 0.2: 0.3 + 0.3 - 0.2
    out2, _, why = env.apply(np.array([0.0, 0, 0, 0]), out1, INSIDE)
    assert out2[0] == pytest.approx(0.4) and why == ("acceleration",)
    out3, _, why = env.apply(np.array([1.0, 0, 0, 0]), out2, INSIDE)
    assert out3[0] == pytest.approx(0.7) and "velocity" in why


def test_workspace_clamps_delta_commands_at_the_edge():
    env = Envelope(SAWYER)
    state = np.array([0.495, 0.7, 0.2, 0.0], np.float32)  # 5 mm from the +x wall
    out, clamped, why = env.apply(np.array([1.0, 0.0, 0.0, 0.0]), None, state)
    assert clamped and "workspace" in why
    assert state[0] + SAWYER.ee_scale * out[0] <= SAWYER.workspace_high[0] + 1e-6
    # moving back inside is not limited
    env.reset()
    out, clamped, _ = env.apply(np.array([-0.5, 0.0, 0.0, 0.0]), None, state)
    assert not clamped and out[0] == pytest.approx(-0.5)


def test_outside_the_workspace_it_may_not_move_further_out():
    env = Envelope(SAWYER)
    state = np.array([0.0, 0.7, 0.0, 0.0], np.float32)  # below workspace_low z = 0.05
    out, _, _ = env.apply(np.array([0.0, 0.0, -1.0, 0.0]), None, state)
    assert out[2] >= 0.0
    out, _, _ = env.apply(np.array([0.0, 0.0, 1.0, 0.0]), out, state)
    assert out[2] == pytest.approx(1.0)


def test_reject_mode_sends_the_hold_action():
    env = Envelope(SAWYER, on_violation="reject")
    last = np.array([0.1, 0.1, 0.0, -0.4], np.float32)
    out, clamped, why = env.apply(np.array([5.0, 0.0, 0.0, 0.0]), last, INSIDE)
    assert clamped and "bounds" in why
    np.testing.assert_allclose(out, [0, 0, 0, -0.4])


def test_wrong_command_width_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        Envelope(SAWYER).apply(np.zeros(3), None, INSIDE)


anything = st.floats(allow_nan=True, allow_infinity=True, width=32)
command = st.lists(anything, min_size=4, max_size=4)
positions = st.tuples(st.floats(-0.7, 0.7), st.floats(0.2, 1.2), st.floats(-0.1, 0.7),
                      st.floats(0.0, 1.0))


@settings(max_examples=200, deadline=None)
@given(commands=st.lists(command, min_size=1, max_size=12), state=positions,
       tight=st.booleans(), reject=st.booleans())
def test_any_command_sequence_stays_inside_every_limit(commands, state, tight, reject):
    desc = TIGHT if tight else SAWYER
    env = Envelope(desc, on_violation="reject" if reject else "clamp")
    state = np.asarray(state, np.float32)
    lo_b, hi_b = desc.bounds()
    ee = state[:3].astype(np.float64)
    w_lo, w_hi = np.asarray(desc.workspace_low), np.asarray(desc.workspace_high)
    last, last2 = None, None
    for c in commands:
        out, _, why = env.apply(np.asarray(c, np.float32), last, state)
        assert out.dtype == np.float32 and out.shape == (4,)
        assert np.all(np.isfinite(out))
        assert np.all(out >= lo_b - TOL) and np.all(out <= hi_b + TOL)
        moved = ee + desc.ee_scale * out[:3]
        # inside the box, or (already outside) not further out than where it was
        assert np.all(moved >= np.minimum(w_lo, ee) - TOL)
        assert np.all(moved <= np.maximum(w_hi, ee) + TOL)
        prev = np.zeros(4) if last is None else last
        if "infeasible" not in why:
            assert np.all(np.abs(out - prev) <= np.asarray(desc.max_delta) + TOL)
            if last is not None and last2 is not None:
                acc = (out - last) - (last - last2)
                assert np.all(np.abs(acc) <= np.asarray(desc.max_delta2) + TOL)
        last2, last = prev, out.astype(np.float64)


def test_gate_rejects_bad_chunks_and_counts():
    gate = ChunkGate(Envelope(SAWYER))
    ok = gate.check(np.zeros((8, 4)), 8, 4)
    assert isinstance(ok, VerifierVerdict) and ok.accepted and ok.rejected == 0
    bad = np.zeros((8, 4))
    bad[3, 1] = np.inf
    assert not gate.check(bad, 8, 4).accepted
    assert not gate.check(np.zeros((7, 4)), 8, 4).accepted
    assert gate.chunks_checked == 3 and gate.chunks_rejected == 2
    scored = ChunkGate(Envelope(SAWYER), scorer=lambda a: (0.1, False))
    v = scored.check(np.zeros((8, 4)), 8, 4)
    assert not v.accepted and v.scores == (0.1,)


def test_interventions_beyond_saturation_are_measured_apart_from_clamps():
    """Saturating at the action bounds is routine; the verifier's "unsafe" label counts only
    commands the envelope moved further than that (``intervened``)."""
    env = Envelope(SAWYER)
    out, clamped, why = env.apply(np.array([0.5, -3.0, 0.0, 1.8]), None, INSIDE)
    assert clamped and {"bounds", "gripper"} <= set(why)
    assert env.last_intervention == pytest.approx(0.0) and not env.intervened()
    tight = Envelope(TIGHT)
    out, clamped, why = tight.apply(np.array([1.0, 0, 0, 0]), None, INSIDE)  # velocity: 1.0 -> 0.3
    assert clamped and tight.last_intervention == pytest.approx(0.7) and tight.intervened()
    out, clamped, _ = tight.apply(np.array([0.75, 0, 0, 0]), out, INSIDE)  # 0.15 over: tolerated
    assert clamped and not tight.intervened()
    tight.apply(np.array([np.nan, 0, 0, 0]), out, INSIDE)
    assert tight.last_intervention == float("inf") and tight.intervened()
    assert tight.stats()["interventions"] == tight.interventions == 2
    assert Envelope(SAWYER, intervention_tol=0.0).intervention_tol == 0.0
    with pytest.raises(ValueError, match="intervention_tol"):
        Envelope(SAWYER, intervention_tol=-1.0)
