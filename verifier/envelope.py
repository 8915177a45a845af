"""The safety envelope: the last thing between the policy and the actuators. Always on.

Every command passes ``Envelope.apply``. Per component, the allowed interval is the
intersection of
  hard limits   action bounds (the gripper's too) and, for delta commands, the workspace box:
                the end effector at ``state[0:3] + ee_scale * cmd[0:3]`` must stay inside it
                (already outside: it may not move further out);
  velocity      ``|cmd - last| <= max_delta``;
  acceleration  ``|(cmd - last) - (last - last2)| <= max_delta2``.
When the limits contradict each other (a robot that must brake harder than ``max_delta2``
allows) hard limits win over velocity, and velocity over acceleration; that is counted as
``infeasible``. A NaN/inf command becomes the description's hold action first.

``on_violation="clamp"`` moves a violating command to the nearest allowed one;
``"reject"`` sends the (limited) hold action instead.

Saturating at the action bounds is routine for many policies and is not what a safety label
should learn from, so besides counting every change (``actions_clamped``) the envelope measures
how far it moved each command beyond plain saturation (``last_intervention``, command units;
inf for a non-finite command) and counts the commands moved more than ``intervention_tol``
(``interventions``): those are the interventions the verifier's "unsafe" label is made of.
"""
from __future__ import annotations

import collections

import numpy as np

from robots.description import RobotDescription

REASONS = ("nonfinite", "bounds", "gripper", "workspace", "velocity", "acceleration",
           "infeasible")
_TOL = 1e-6


class Envelope:
    def __init__(self, description: RobotDescription, on_violation: str = "clamp",
                 intervention_tol: float = 0.2):
        if on_violation not in ("clamp", "reject"):
            raise ValueError(f"on_violation must be 'clamp' or 'reject', got {on_violation!r}")
        if not intervention_tol >= 0:
            raise ValueError(f"intervention_tol must be >= 0 (command units), "
                             f"got {intervention_tol}")
        self.intervention_tol = float(intervention_tol)
        self.interventions = 0
        self.last_intervention = 0.0
        self.description = description
        self.on_violation = on_violation
        self.low, self.high = description.bounds()
        self.max_delta = np.asarray(description.max_delta, np.float64)
        self.max_delta2 = np.asarray(description.max_delta2, np.float64)
        self.counts: collections.Counter[str] = collections.Counter()
        self.commands = 0
        self.actions_clamped = 0
        self._last2: np.ndarray | None = None
        self._last: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the command history (a new episode starts from rest)."""
        self._last2 = self._last = None

    def hold(self, last: np.ndarray | None) -> np.ndarray:
        return self.description.hold_action(last)

    # -- limits ------------------------------------------------------------------------------
    def _hard(self, state: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.low.astype(np.float64), self.high.astype(np.float64)
        d = self.description
        if (d.workspace_low is not None and d.command_mode == "delta" and d.ee_scale > 0
                and state is not None and len(state) >= 3 and np.all(np.isfinite(state[:3]))):
            ee = np.asarray(state[:3], np.float64)
            w_lo = np.minimum((np.asarray(d.workspace_low) - ee) / d.ee_scale, 0.0)
            w_hi = np.maximum((np.asarray(d.workspace_high) - ee) / d.ee_scale, 0.0)
            lo[:3], hi[:3] = np.maximum(lo[:3], w_lo), np.minimum(hi[:3], w_hi)
            # bounds that exclude zero could leave nothing; then the bounds alone decide
            bad = lo > hi
            lo[bad], hi[bad] = self.low[bad], self.high[bad]
        return lo, hi

    def limits(self, last: np.ndarray | None, state: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(low, high, infeasible) per component for the next command."""
        lo, hi = self._hard(state)
        infeasible = np.zeros(lo.shape, bool)
        if last is None:
            return lo, hi, infeasible
        last = np.asarray(last, np.float64)
        v_lo, v_hi = last - self.max_delta, last + self.max_delta
        for extra_lo, extra_hi in ((v_lo, v_hi), self._accel(last)):
            if extra_lo is None:
                continue
            n_lo, n_hi = np.maximum(lo, extra_lo), np.minimum(hi, extra_hi)
            ok = n_lo <= n_hi
            infeasible |= ~ok
            lo, hi = np.where(ok, n_lo, lo), np.where(ok, n_hi, hi)
        return lo, hi, infeasible

    def _accel(self, last: np.ndarray):
        if self._last2 is None or self._last is None or not np.allclose(last, self._last):
            return None, None
        centre = 2 * last - self._last2
        return centre - self.max_delta2, centre + self.max_delta2

    # -- the one entry point -----------------------------------------------------------------
    def apply(self, command: np.ndarray, last_command: np.ndarray | None = None,
              state: np.ndarray | None = None) -> tuple[np.ndarray, bool, tuple[str, ...]]:
        """Return (safe command, clamped?, reasons). ``last_command``: the command sent on the
        previous tick (None at the start of an episode: the robot is at rest)."""
        self.commands += 1
        last = self._last if last_command is None else np.asarray(last_command, np.float64)
        if last is not None and not np.all(np.isfinite(last)):
            last = None
        if last is None and self.description.command_mode == "delta":
            last = self.hold(None).astype(np.float64)
        cmd = np.asarray(command, np.float64).reshape(-1)
        reasons: list[str] = []
        if cmd.shape != self.low.shape:
            raise ValueError(f"command has shape {cmd.shape}, the robot takes "
                             f"{self.low.shape} ({self.description.joints})")
        wanted = cmd
        if not np.all(np.isfinite(cmd)):
            reasons.append("nonfinite")
            cmd = self.hold(None if last is None else last).astype(np.float64)
        lo, hi, infeasible = self.limits(last, state)
        out = np.clip(cmd, lo, hi)
        changed = np.abs(out - cmd) > _TOL
        if changed.any():
            reasons.extend(self._why(cmd, changed, last, state))
            if self.on_violation == "reject":
                hold = self.hold(None if last is None else last).astype(np.float64)
                out = np.clip(hold, lo, hi)
        if infeasible.any():
            reasons.append("infeasible")
        out = out.astype(np.float32)
        self.last_intervention = (float(np.max(np.abs(np.clip(wanted, self.low, self.high) - out)))
                                  if np.all(np.isfinite(wanted)) else float("inf"))
        self.interventions += int(self.intervened())
        clamped = bool(reasons)
        for r in reasons:
            self.counts[r] += 1
        self.actions_clamped += int(clamped)
        self._last2 = None if last is None else np.asarray(last, np.float64)
        self._last = out.astype(np.float64)
        return out, clamped, tuple(dict.fromkeys(reasons))

    def intervened(self) -> bool:
        """Whether the last command was moved beyond plain saturation (by > intervention_tol)."""
        return self.last_intervention > self.intervention_tol

    def _why(self, cmd, changed, last, state) -> list[str]:
        """Which limits a command broke, for the intervention counters."""
        why = []
        g = self.description.gripper_index
        out_of_bounds = (cmd < self.low - _TOL) | (cmd > self.high + _TOL)
        if g is not None and out_of_bounds[g]:
            why.append("gripper")
            out_of_bounds[g] = False
        if out_of_bounds.any():
            why.append("bounds")
        h_lo, h_hi = self._hard(state)
        if np.any(((cmd < h_lo - _TOL) | (cmd > h_hi + _TOL)) & ~((cmd < self.low - _TOL)
                                                                | (cmd > self.high + _TOL))):
            why.append("workspace")
        if last is not None:
            if np.any(np.abs(cmd - last) > self.max_delta + _TOL):
                why.append("velocity")
            a_lo, a_hi = self._accel(last)
            if a_lo is not None and np.any((cmd < a_lo - _TOL) | (cmd > a_hi + _TOL)):
                why.append("acceleration")
        return why or ["bounds"]

    def stats(self) -> dict:
        return {"commands": self.commands, "actions_clamped": self.actions_clamped,
                "interventions": self.interventions,
                **{f"by_{r}": int(self.counts[r]) for r in REASONS}}
